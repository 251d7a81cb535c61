"""Huge pages for a worker's weights: the environment that asks glibc for them.

A decode step reads every weight of the model once (Gemma 3 270M: 250 MB a token). Mapped
from the GGUF file, the weights sit in 4 KB pages of the page cache, and the walk through
them misses the TLB tens of thousands of times a token; in a virtual machine each miss walks
two page tables. Read into memory instead (`open_model` loads without mmap) and allocated
by glibc with MADV_HUGEPAGE (its `glibc.malloc.hugetlb=1` tunable, glibc 2.35 and later),
the weights, KV cache and compute buffers lie in 2 MB pages wherever the kernel's
transparent huge pages are "always" or "madvise": measured on a 2-core VM, a decode step 6
to 9% shorter for SmolLM2 and Gemma 3 (bench `llm`). Where the kernel
says "never", or glibc is older, the tunable changes nothing and the weights are still in
ordinary pages. The tunable is read by the dynamic loader, so it is set in the
environment a worker starts with; an operator's own `glibc.malloc.hugetlb` is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

TUNABLES: Final = "GLIBC_TUNABLES"
HUGE_PAGES_TUNABLE: Final = "glibc.malloc.hugetlb"
# 1: madvise(MADV_HUGEPAGE) on the memory malloc maps (transparent huge pages).
HUGE_PAGES_VALUE: Final = "1"
KERNEL_MODE: Final = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def kernel_mode() -> str:
    """The kernel's transparent huge page mode: "always", "madvise" or "never" ("" where
    the kernel has none)."""
    try:
        modes = KERNEL_MODE.read_text()
    except OSError:
        return ""
    return modes.partition("[")[2].partition("]")[0]


def huge_pages_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """GLIBC_TUNABLES for a worker: the operator's tunables (from `environ`) with
    glibc.malloc.hugetlb added unless they set it themselves."""
    current = environ.get(TUNABLES, "")
    tunables = [part for part in current.split(":") if part]
    if any(part.split("=", 1)[0] == HUGE_PAGES_TUNABLE for part in tunables):
        return {}
    return {TUNABLES: ":".join([*tunables, f"{HUGE_PAGES_TUNABLE}={HUGE_PAGES_VALUE}"])}
