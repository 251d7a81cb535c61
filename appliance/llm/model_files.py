"""Model files: the names a model may have (`<name>.gguf` directly in the models
directory), and reading a file that should be a model without trusting it: only a regular
file is opened, and an error names no path."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final

from appliance.llm.manifest import RegistryError

SUFFIX: Final = ".gguf"
CHUNK_BYTES: Final = 1024 * 1024
MAX_NAME_CHARS: Final = 64
NOT_REGULAR: Final = "it is not a regular file"

_NAME_CHARS: Final = re.compile(r"[A-Za-z0-9._-]+")
NAME_RULE: Final = (
    f"use 1-{MAX_NAME_CHARS} characters from A-Z a-z 0-9 . _ -, "
    "not starting with '.' or '-' and without '..'"
)


class InvalidModelName(RegistryError, ValueError):
    """A model name that cannot name a file directly in the models directory."""


class NotRegular(OSError):
    """A FIFO, device or directory where a model file should be; it is never read."""


def validate_model_name(name: str) -> str:
    """Return `name` if it can name `<name>.gguf` in the models directory, else raise."""
    problem = name_problem(name)
    if problem is not None:
        raise InvalidModelName(f"invalid model name: {problem}; {NAME_RULE}")
    return name


def name_problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if "/" in name or "\\" in name:
        return "it contains a path separator"  # never echoed: it may be an absolute path
    shown = repr(name) if len(name) <= 80 else repr(name[:77] + "...")
    if len(name) > MAX_NAME_CHARS:
        return f"{shown} is {len(name)} characters"
    if not _NAME_CHARS.fullmatch(name):
        return f"{shown} has other characters"
    if name[0] in ".-":
        return f"{shown} starts with {name[0]!r}"
    if ".." in name:
        return f"{shown} contains '..'"
    return None


def open_regular(path: Path, *, follow: bool) -> int:
    """Open a regular file for reading; anything else is refused before it is opened.

    The fstat after opening catches a swap between the two; O_NONBLOCK keeps even that
    case from hanging on a FIFO.
    """
    if not stat.S_ISREG(os.stat(path, follow_symlinks=follow).st_mode):
        raise NotRegular(NOT_REGULAR)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegular(NOT_REGULAR)
    return fd


def hash_stream(
    fd: int, sink: Callable[[memoryview], object] | None, on_chunk: Callable[[int], None] | None
) -> str:
    """SHA-256 of the rest of `fd`, read in CHUNK_BYTES pieces, each also given to `sink`."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(fd, "rb", buffering=0, closefd=False) as source:
        while count := source.readinto(buffer):
            digest.update(view[:count])
            if sink is not None:
                sink(view[:count])
            if on_chunk is not None:
                on_chunk(count)
    return digest.hexdigest()


def os_reason(exc: OSError) -> str:
    # strerror, not str(exc): the latter carries the absolute path.
    if isinstance(exc, NotRegular):
        return NOT_REGULAR
    return f"cannot read the file: {exc.strerror or type(exc).__name__}"
