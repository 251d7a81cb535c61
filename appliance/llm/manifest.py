"""`manifest.json` in the models directory: the file the registry keeps its records in.

This module owns the file itself: the records' msgspec shape, reading it with tolerance (a
missing manifest is empty; an unreadable, oversized or invalid one is reported as unusable so
the caller rebuilds it), writing it atomically (temp file, fsync, rename, fsync of the
directory), the flock-based lock file that serialises writers (the daemon, through
`trio.to_thread`, and the CLI use the same directory) and the rule for merging with another
writer. Which records belong in it is the registry's business (`appliance.llm.registry`).

`RegistryError` is defined here because `ManifestError` is one; the registry re-exports both.
Everything here is blocking file work. Error messages are one line and never name absolute
paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, Literal

import msgspec

from appliance.llm.model_defaults import ModelDefaults

LOGGER = logging.getLogger("appliance.llm")

MANIFEST_NAME: Final = "manifest.json"
LOCK_NAME: Final = ".manifest.lock"
MANIFEST_VERSION: Final = 1
MAX_MANIFEST_BYTES: Final = 16 * 1024 * 1024  # far beyond any real manifest; refuses a bomb
FILE_MODE: Final = 0o644  # weights and manifest are not secret; the directory guards access

ModelState = Literal["ok", "failed"]


class RegistryError(Exception):
    """Base of every registry error; the message is one line and safe to show to a client."""


class ManifestError(RegistryError):
    """The manifest could not be written."""


class ModelRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the registry knows about one `<name>.gguf`; `sha256` is "" until it is hashed."""

    name: str
    file: str
    size: int
    sha256: str
    state: ModelState
    reason: str | None
    architecture: str | None
    context_length: int | None
    has_chat_template: bool
    checked_at: float
    mtime: float
    # What `appliance models set` (or the admin API) gave it, or what comes with a model
    # the appliance knows (appliance.llm.model_defaults).
    defaults: ModelDefaults = ModelDefaults()
    # The URL it was pulled from (`appliance models pull`); None when imported or copied.
    source: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == "ok"


class Manifest(msgspec.Struct, kw_only=True):
    version: int = MANIFEST_VERSION
    models: list[ModelRecord] = []


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def manifest_lock(models_dir: Path) -> Iterator[None]:
    """Exclusive across processes and threads (flock is per open file description)."""
    try:
        fd = os.open(models_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise ManifestError(f"cannot lock the model manifest: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_manifest(models_dir: Path, *, warn: bool = True) -> list[ModelRecord] | None:
    """The manifest's records as stored, or None when a manifest is there but unusable.

    A missing manifest has no records. An unusable one is logged (a warning, or only a debug
    line without `warn`) and should be rewritten by the caller.
    """
    log = LOGGER.warning if warn else LOGGER.debug
    try:
        with open(models_dir / MANIFEST_NAME, "rb") as file:
            data = file.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log("cannot read the model manifest (%s); rebuilding it", exc.strerror)
        return None
    if len(data) > MAX_MANIFEST_BYTES:
        log("the model manifest is over %d bytes; rebuilding it", MAX_MANIFEST_BYTES)
        return None
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except msgspec.DecodeError as exc:
        log("the model manifest is not valid (%s); rebuilding it", exc)
        return None
    return manifest.models


def save_manifest(models_dir: Path, records: dict[str, ModelRecord]) -> None:
    """Write atomically: temp file in the same directory, fsync, rename, fsync the dir."""
    manifest = Manifest(models=sorted(records.values(), key=lambda record: record.name))
    data = msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n"
    try:
        fd, temp = tempfile.mkstemp(dir=models_dir, prefix=f".{MANIFEST_NAME}.")
    except OSError as exc:
        raise ManifestError(f"cannot write the model manifest: {exc.strerror}") from None
    try:
        with open(fd, "wb") as file:
            file.write(data)
            os.fchmod(file.fileno(), FILE_MODE)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, models_dir / MANIFEST_NAME)
        fsync_dir(models_dir)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise ManifestError(f"cannot write the model manifest: {exc.strerror}") from None
        raise


def merge_records(
    known: dict[str, ModelRecord],
    current: dict[str, ModelRecord],
    fresh: dict[str, ModelRecord],
    present: Callable[[str], bool],
) -> dict[str, ModelRecord]:
    """Merge `fresh` into `current`, the manifest as it is now under the lock.

    `known` is the manifest the caller read before computing `fresh`: a record another writer
    changed since then (a `mark_failed` during a long scan) wins over ours. Names for which
    `present` is false (their file is gone) are dropped.
    """
    merged: dict[str, ModelRecord] = {}
    for name in set(current) | set(fresh):
        if not present(name):
            continue
        if name in current and current[name] != known.get(name):
            merged[name] = current[name]
        else:
            merged[name] = fresh[name] if name in fresh else current[name]
    return merged
