"""Idempotent file and directory steps of `appliance install`: each says what it did.

Every step returns an outcome: `created ...`, `kept (exists)`, `fixed (...)` or
`updated (...)`; only `kept` means nothing changed. Symlinks are never followed: inside an
alternate root a link could point anywhere on the host.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from appliance.ops.accounts import InstallError

PARENT_MODE: Final = 0o755
KEPT: Final = "kept (exists)"


@dataclass(frozen=True)
class Owner:
    """Numeric ids for chown and names for the operator's report."""

    uid: int
    gid: int
    names: str  # "root:appliance"


def changed(outcome: str) -> bool:
    return not outcome.startswith("kept")


class Report:
    """One line per step; counts the steps that changed something."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self.changes = 0

    def step(self, subject: object, outcome: str) -> None:
        if changed(outcome):
            self.changes += 1
        print(f"{subject!s:<48} {outcome}", file=self._out, flush=True)

    def note(self, subject: object, text: str) -> None:
        print(f"{subject!s:<48} {text}", file=self._out, flush=True)


def ensure_directory(path: Path, mode: int, owner: Owner) -> str:
    """Create `path` (and missing parents, 0755 root) or bring its mode and owner in line."""
    info = _lstat(path)
    if info is None:
        make_parents(path.parent)
        try:
            path.mkdir()
        except OSError as exc:
            raise _write_error(path, exc) from None
        _set_attributes(path, mode, owner)
        return f"created ({mode:04o} {owner.names})"
    if not stat.S_ISDIR(info.st_mode):
        raise InstallError(
            f"{path} exists but is not a directory (or is a symlink); move it away and re-run"
        )
    return _align(path, info, mode, owner)


def ensure_attributes(path: Path, mode: int, owner: Owner, what: str = KEPT) -> str:
    """Keep an existing regular file's content; fix only its mode and owner."""
    info = _lstat(path)
    if info is None or not stat.S_ISREG(info.st_mode):
        raise InstallError(f"{path} is not a regular file (a symlink?); move it away and re-run")
    outcome = _align(path, info, mode, owner)
    return what if outcome == KEPT else outcome


def ensure_file(path: Path, text: str, mode: int, owner: Owner) -> str:
    """Write `text` to `path` unless it already holds exactly that; atomic replacement."""
    info = _lstat(path)
    if info is not None:
        if not stat.S_ISREG(info.st_mode):
            raise InstallError(
                f"{path} exists but is not a regular file (or is a symlink); move it away"
            )
        try:
            current = path.read_bytes()
        except OSError as exc:
            raise InstallError(f"cannot read {path}: {exc.strerror}") from None
        if current == text.encode("utf-8"):
            return _align(path, info, mode, owner)
    make_parents(path.parent)
    _write_atomically(path, text, mode, owner)
    return "created" if info is None else "updated (its content was different)"


def make_parents(path: Path) -> None:
    """Create missing directories down to `path`, each 0755 and owned by root."""
    missing: list[Path] = []
    current = path
    while _lstat(current) is None:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except OSError as exc:
            raise _write_error(directory, exc) from None
        _set_attributes(directory, PARENT_MODE, Owner(0, 0, "root:root"))


def _write_atomically(path: Path, text: str, mode: int, owner: Owner) -> None:
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _set_attributes(Path(temp), mode, owner)
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise _write_error(path, exc) from None


def _align(path: Path, info: os.stat_result, mode: int, owner: Owner) -> str:
    was_mode = stat.S_IMODE(info.st_mode)
    if was_mode == mode and (info.st_uid, info.st_gid) == (owner.uid, owner.gid):
        return KEPT
    _set_attributes(path, mode, owner)
    return f"fixed (was {was_mode:04o} {info.st_uid}:{info.st_gid}, now {mode:04o} {owner.names})"


def _set_attributes(path: Path, mode: int, owner: Owner) -> None:
    # Through a descriptor opened without following a symlink: chown and chmod act on
    # exactly the file that was checked.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        os.fchown(fd, owner.uid, owner.gid)
        os.fchmod(fd, mode)
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        os.close(fd)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InstallError(f"cannot look at {path}: {exc.strerror}") from None


def _write_error(path: Path, exc: OSError) -> InstallError:
    return InstallError(f"cannot write {path}: {exc.strerror}; run appliance install as root")
