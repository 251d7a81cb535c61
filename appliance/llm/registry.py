"""The model registry: GGUF files named `<name>.gguf` directly in `APPLIANCE_MODELS_DIR`.

`manifest.json` next to them records what was learnt about each file (size, mtime, SHA-256,
header fields, state), so a scan only re-reads files whose size or mtime changed. The first
SHA-256 recorded for a name is its reference: a later scan or `verify` that computes another
one marks the model failed ("checksum changed since import") until it is verified clean or
imported again. The manifest file itself (its records' shape, tolerant reading, atomic and
locked writing, merging with another writer) is `appliance.llm.manifest`, the names a model
may have and the untrusting read of its file are `appliance.llm.model_files`; this module
decides what goes in the manifest: scanning, hashing, import, verify, remove and the default
model.

Everything here is blocking file work. Error messages are one line and name models, never
absolute paths.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import math
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Final

import msgspec

from appliance.llm.gguf_header import GGUF_MAGIC, GGUFHeader, GGUFHeaderError, check_gguf_header
from appliance.llm.manifest import FILE_MODE as FILE_MODE
from appliance.llm.manifest import LOCK_NAME as LOCK_NAME
from appliance.llm.manifest import MANIFEST_NAME as MANIFEST_NAME
from appliance.llm.manifest import MANIFEST_VERSION as MANIFEST_VERSION
from appliance.llm.manifest import MAX_MANIFEST_BYTES as MAX_MANIFEST_BYTES
from appliance.llm.manifest import Manifest as Manifest
from appliance.llm.manifest import ManifestError as ManifestError
from appliance.llm.manifest import ModelRecord as ModelRecord
from appliance.llm.manifest import ModelState as ModelState
from appliance.llm.manifest import RegistryError as RegistryError
from appliance.llm.manifest import (
    fsync_dir,
    manifest_lock,
    merge_records,
    read_manifest,
    save_manifest,
)
from appliance.llm.model_defaults import ModelDefaults, known_defaults, updated
from appliance.llm.model_files import SUFFIX as SUFFIX
from appliance.llm.model_files import InvalidModelName as InvalidModelName
from appliance.llm.model_files import (
    hash_stream,
    name_problem,
    open_regular,
    os_reason,
)
from appliance.llm.model_files import validate_model_name as validate_model_name

LOGGER = logging.getLogger("appliance.llm")

MAX_REASON_CHARS: Final = 300
IMPORT_HINT: Final = "appliance models import PATH"
VERIFY_HINT: Final = "appliance models verify"

CHECKSUM_CHANGED: Final = "checksum changed since import"
NOT_GGUF: Final = "not a GGUF file (it does not begin with 'GGUF'); expected a .gguf model"
# What the header check quotes from a file (key and tensor names, as repr() writes them).
_QUOTED: Final = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
OUTSIDE_DIR: Final = "it is a symlink to a file outside the models directory"

Progress = Callable[[int, int], None]


class UnknownModel(RegistryError, LookupError):
    """No model of that name is installed."""


class ModelUnavailable(RegistryError):
    """The model is installed but must not be loaded (failed check, crash, escaping symlink)."""


class ModelExists(RegistryError):
    """An import would replace an installed model."""


class ImportRefused(RegistryError):
    """The file offered for import is not a usable GGUF model, or cannot be copied."""


class VerifyResult(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    state: ModelState
    reason: str | None
    previous_state: ModelState | None  # None: the registry had no record of it yet

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def _one_line(text: str) -> str:
    # Reasons come from exceptions and the worker; the manifest and CLI want one short line.
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 3] + "..."


def _unechoed(reason: str) -> str:
    """The header check's reason with the names it quotes from the file left out: a file
    offered for import lies outside the models dir, and nothing of it is ever echoed."""
    return _QUOTED.sub("<a name in the file>", reason)


def _unchanged(record: ModelRecord, info: os.stat_result) -> bool:
    return record.size == info.st_size and record.mtime == info.st_mtime


class ModelRegistry:
    """The models in one directory. Cheap to create; every call reads the directory afresh."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self._warned: set[str] = set()
        # What the latest scan found, and when (time.monotonic): `recent_defaults`.
        self._scanned: tuple[float, dict[str, ModelRecord]] = (-math.inf, {})

    # -- queries -------------------------------------------------------------------------

    def scan(self) -> builtins.list[ModelRecord]:
        """Sync the manifest with the files; only new or changed files are read."""
        found = self._files()
        if not found and not self.models_dir.is_dir():
            return []
        before = self._read()
        known = {} if before is None else before
        fresh = {name: self._refresh(name, known.get(name)) for name in found}
        records = self._commit(before, fresh, strict=False)
        self._scanned = (time.monotonic(), {record.name: record for record in records})
        return records

    def recent_defaults(self, name: str, max_age: float) -> ModelDefaults | None:
        """The model's defaults as a scan at most `max_age` seconds ago found them, None if
        none did. Reads no file: the event loop may call it (a request's model was just
        checked with `usable`, which scans)."""
        scanned_at, records = self._scanned
        record = records.get(name)
        if record is None or time.monotonic() - scanned_at > max_age:
            return None
        return record.defaults

    def list(self) -> builtins.list[ModelRecord]:
        return sorted(self.scan(), key=lambda record: record.name)

    def get(self, name: str) -> ModelRecord:
        validate_model_name(name)
        records = {record.name: record for record in self.scan()}
        if name not in records:
            raise UnknownModel(_unknown_message(name, records))
        return records[name]

    def usable(self, name: str) -> ModelRecord:
        record = self.get(name)
        if not record.ok:
            raise ModelUnavailable(_unavailable_message(record))
        return record

    def path_of(self, record: ModelRecord) -> Path:
        """The checked real path to load; refuses a file that now escapes the directory."""
        validate_model_name(record.name)
        real = self._real_path(record.name)
        if real is None:
            raise ModelUnavailable(f"model {record.name!r} is unavailable: {OUTSIDE_DIR}")
        return real

    def default_name(self, configured: str | None) -> str | None:
        """The configured default (its name checked, not its state), else the first usable."""
        if configured:
            return validate_model_name(configured)
        usable = [record.name for record in self.list() if record.ok]
        return usable[0] if usable else None

    # -- changes -------------------------------------------------------------------------

    def mark_failed(self, name: str, reason: str) -> ModelRecord:
        """Persist a failure (e.g. the worker died loading it) until `verify` or a re-import."""
        record = self.get(name)
        failed = msgspec.structs.replace(
            record, state="failed", reason=_one_line(reason), checked_at=time.time()
        )
        with manifest_lock(self.models_dir):
            current = self._load()
            current[name] = failed
            save_manifest(self.models_dir, current)
        LOGGER.warning("model %s marked failed: %s", name, failed.reason)
        return failed

    def verify(
        self, name: str | None = None, progress: Progress | None = None
    ) -> builtins.list[VerifyResult]:
        """Re-read and re-hash every model (or one); a model that passes again is reset to ok."""
        found = self._files()
        before = self._read()
        known = {} if before is None else before
        if name is not None:
            validate_model_name(name)
            if name not in found:
                raise UnknownModel(_unknown_message(name, found))
            found = {name: found[name]}
        total = sum(self._size(path) for path in found.values())
        done = reported = 0

        def report(value: int) -> None:
            nonlocal reported
            if progress is not None and value != reported:  # each value once: bars end on total
                reported = value
                progress(value, total)

        def advance(count: int) -> None:
            nonlocal done
            done += count
            report(done)

        fresh: dict[str, ModelRecord] = {}
        for model in sorted(found):
            start = done
            fresh[model] = self._inspect(model, known.get(model), advance)
            done = start + self._size(found[model])  # a file refused unread still counts
            report(done)
        self._commit(before, fresh, strict=True)
        results = []
        for model, record in fresh.items():
            old = known.get(model)
            results.append(
                VerifyResult(
                    name=model,
                    state=record.state,
                    reason=record.reason,
                    previous_state=old.state if old is not None else None,
                )
            )
            if not record.ok:
                LOGGER.warning("model %s failed verification: %s", model, record.reason)
        return results

    def import_file(
        self, source: Path, name: str | None = None, progress: Progress | None = None
    ) -> ModelRecord:
        """Copy a checked GGUF in as `<name>.gguf`; a temp file until complete, never half."""
        source = Path(source)
        name = self._import_name(source, name)
        self._check_source(source)
        if os.path.lexists(self._file(name)):
            raise ModelExists(_exists_message(name))
        self.models_dir.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self.models_dir, prefix=f".{name}{SUFFIX}.importing-")
        try:
            with open(fd, "wb") as target:
                sha256 = self._copy(source, target.write, progress)
                os.fchmod(target.fileno(), FILE_MODE)
                target.flush()
                os.fsync(target.fileno())
            header = self._header(Path(temp))  # what was written, not what was checked
            if isinstance(header, str):
                raise ImportRefused(f"cannot import {name!r}: {_unechoed(header)}")
            with manifest_lock(self.models_dir):
                return self._install(name, Path(temp), header, sha256)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise

    def install_download(self, temp: Path, name: str, sha256: str, source: str) -> ModelRecord:
        """Register a complete download (a temp file in the models dir, its SHA-256 computed
        as it came): its header is checked, then it is renamed into place. A refused file
        is left for the caller to delete."""
        validate_model_name(name)
        header = self._header(temp)
        if isinstance(header, str):
            raise ImportRefused(f"cannot install {name!r}: {_unechoed(header)}")
        with manifest_lock(self.models_dir):
            return self._install(name, temp, header, sha256, source)

    def exists(self, name: str) -> bool:
        """Whether `<name>.gguf` is in the models directory (whatever its state)."""
        return os.path.lexists(self._file(validate_model_name(name)))

    def set_defaults(self, name: str, changes: dict[str, object]) -> ModelRecord:
        """Apply `changes` (checked; None clears a key) to the model's defaults."""
        self.get(name)  # an unknown name is refused, and the record is current
        with manifest_lock(self.models_dir):
            current = self._load()
            record = current.get(name)
            if record is None:
                raise UnknownModel(_unknown_message(name, current))
            changed = msgspec.structs.replace(record, defaults=updated(record.defaults, changes))
            current[name] = changed
            save_manifest(self.models_dir, current)
        LOGGER.info("model %s defaults: %s", name, changed.defaults.describe() or "none")
        return changed

    def defaults_of(self, name: str) -> ModelDefaults:
        """The model's defaults as the manifest holds them (no scan: a request's path)."""
        records = self._read(warn=False) or {}
        record = records.get(name)
        return record.defaults if record is not None else ModelDefaults()

    def remove(self, name: str) -> None:
        validate_model_name(name)
        with manifest_lock(self.models_dir):
            current = self._load()
            path = self._file(name)
            present = os.path.lexists(path)
            if not present and name not in current:
                raise UnknownModel(_unknown_message(name, current))
            if present:
                try:
                    path.unlink()  # a symlink itself, never its target
                except OSError as exc:
                    raise RegistryError(f"cannot remove model {name!r}: {exc.strerror}") from None
                fsync_dir(self.models_dir)
            current.pop(name, None)
            save_manifest(self.models_dir, current)
        LOGGER.info("model %s removed", name)

    # -- files ---------------------------------------------------------------------------

    def _file(self, name: str) -> Path:
        return self.models_dir / f"{name}{SUFFIX}"

    def _files(self) -> dict[str, Path]:
        """`<name>.gguf` entries by name; hidden and temp files are skipped silently."""
        try:
            entries = builtins.list(os.scandir(self.models_dir))
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise RegistryError(f"cannot read the models directory: {exc.strerror}") from None
        found: dict[str, Path] = {}
        for entry in entries:
            if not entry.name.endswith(SUFFIX) or entry.name.startswith("."):
                continue
            name = entry.name[: -len(SUFFIX)]
            problem = name_problem(name)
            if problem is None:
                found[name] = Path(entry.path)
            elif entry.name not in self._warned:
                self._warned.add(entry.name)  # once per registry, not on every scan
                LOGGER.warning("ignoring a model file with an invalid name: %s", problem)
        return found

    def _real_path(self, name: str) -> Path | None:
        """The file's real path, or None when a symlink takes it out of the directory."""
        base = os.path.realpath(self.models_dir)
        real = os.path.realpath(self._file(name))
        if os.path.dirname(real) == base or real.startswith(base + os.sep):
            return Path(real)
        return None

    def _size(self, path: Path) -> int:
        try:
            return path.stat().st_size if self._real_path(path.stem) is not None else 0
        except OSError:
            return 0

    def _refresh(self, name: str, old: ModelRecord | None) -> ModelRecord:
        """The manifest's record when the file looks unchanged, else a fresh inspection."""
        real = self._real_path(name)
        if old is not None and real is not None:
            try:
                info = os.stat(real)
            except OSError:
                info = None
            if info is not None and stat.S_ISREG(info.st_mode) and _unchanged(old, info):
                return old
        return self._inspect(name, old, None)

    def _inspect(
        self, name: str, old: ModelRecord | None, on_chunk: Callable[[int], None] | None
    ) -> ModelRecord:
        """Check the header and hash the file; the state follows from what was found."""
        reference = old.sha256 if old is not None else ""
        real = self._real_path(name)
        if real is None:
            return self._failed(name, old, OUTSIDE_DIR, sha256=reference)
        try:
            fd = open_regular(real, follow=False)
        except OSError as exc:
            return self._failed(name, old, os_reason(exc), sha256=reference)
        try:
            info = os.fstat(fd)
            header = self._header(real)
            if isinstance(header, str):
                return self._failed(name, old, header, sha256=reference, info=info)
            sha256 = hash_stream(fd, None, on_chunk)
        except OSError as exc:
            return self._failed(name, old, os_reason(exc), sha256=reference)
        finally:
            os.close(fd)
        if reference and reference != sha256:
            return self._failed(name, old, CHECKSUM_CHANGED, sha256=reference, info=info)
        return _record(name, header, sha256, info, state="ok", reason=None, old=old)

    def _failed(
        self,
        name: str,
        old: ModelRecord | None,
        reason: str,
        *,
        sha256: str,
        info: os.stat_result | None = None,
    ) -> ModelRecord:
        if info is None:  # never opened: describe the directory entry itself
            with contextlib.suppress(OSError):
                info = os.lstat(self._file(name))
        regular = info is not None and stat.S_ISREG(info.st_mode)
        record = ModelRecord(
            name=name,
            file=f"{name}{SUFFIX}",
            size=info.st_size if info is not None and regular else 0,
            sha256=sha256,
            state="failed",
            reason=_one_line(reason),
            architecture=None,
            context_length=None,
            has_chat_template=False,
            checked_at=time.time(),
            mtime=info.st_mtime if info is not None else 0.0,
            defaults=old.defaults if old is not None else ModelDefaults(),
            source=old.source if old is not None else None,
        )
        if old is not None and msgspec.structs.replace(old, checked_at=0.0) == (
            msgspec.structs.replace(record, checked_at=0.0)
        ):
            return old  # same verdict: keep the manifest as it is instead of rewriting it
        return record

    @staticmethod
    def _header(path: Path) -> GGUFHeader | str:
        """The header, or the reason it is refused."""
        try:
            return check_gguf_header(path)
        except GGUFHeaderError as exc:
            return str(exc)
        except OSError as exc:
            return os_reason(exc)

    # -- import --------------------------------------------------------------------------

    @staticmethod
    def _import_name(source: Path, name: str | None) -> str:
        if name is not None:
            return validate_model_name(name)
        try:
            return validate_model_name(source.stem)
        except InvalidModelName as exc:
            raise InvalidModelName(f"{exc} (the file name gives the name; pass one)") from None

    def _check_source(self, source: Path) -> None:
        try:
            fd = open_regular(source, follow=True)
        except OSError as exc:
            raise ImportRefused(f"cannot read {source.name!r}: {os_reason(exc)}") from None
        try:
            magic = os.pread(fd, len(GGUF_MAGIC), 0)
        except OSError as exc:
            raise ImportRefused(f"cannot read {source.name!r}: {os_reason(exc)}") from None
        finally:
            os.close(fd)
        if magic != GGUF_MAGIC:
            raise ImportRefused(f"cannot import {source.name!r}: {NOT_GGUF}")
        header = self._header(source)
        if isinstance(header, str):
            raise ImportRefused(f"cannot import {source.name!r}: {_unechoed(header)}")

    def _copy(
        self, source: Path, write: Callable[[memoryview], object], progress: Progress | None
    ) -> str:
        """Stream `source` into `write`, hashing what was read; returns the SHA-256."""
        try:
            fd = open_regular(source, follow=True)
        except OSError as exc:
            raise ImportRefused(f"cannot read {source.name!r}: {os_reason(exc)}") from None
        try:
            total = os.fstat(fd).st_size
            free = shutil.disk_usage(self.models_dir).free
            if total > free:
                raise ImportRefused(
                    f"not enough disk space for {source.name!r}: it needs {_mb(total)} MB "
                    f"and {_mb(free)} MB are free"
                )
            done = 0

            def advance(count: int) -> None:
                nonlocal done
                done += count
                if progress is not None:
                    progress(done, total)

            if progress is not None:
                progress(0, total)
            try:
                sha256 = hash_stream(fd, write, advance)
            except OSError as exc:
                raise ImportRefused(f"cannot copy {source.name!r}: {os_reason(exc)}") from None
            if done != total:
                raise ImportRefused(f"{source.name!r} changed size while it was being copied")
            return sha256
        finally:
            os.close(fd)

    def _install(
        self,
        name: str,
        temp: Path,
        header: GGUFHeader,
        sha256: str,
        source: str | None = None,
    ) -> ModelRecord:
        """Rename the complete temp file into place and record it; the caller holds the lock."""
        target = self._file(name)
        if os.path.lexists(target):  # another import won the race while we copied
            raise ModelExists(_exists_message(name))
        os.rename(temp, target)
        fsync_dir(self.models_dir)
        record = _record(
            name, header, sha256, target.stat(), state="ok", reason=None, source=source
        )
        current = self._load()
        current[name] = record
        save_manifest(self.models_dir, current)
        LOGGER.info("model %s imported (%s, sha256 %s)", name, header.architecture, sha256)
        return record

    # -- manifest ------------------------------------------------------------------------

    def _load(self) -> dict[str, ModelRecord]:
        """The manifest's records; a missing or unusable manifest has none (scan rebuilds)."""
        records = self._read()
        return {} if records is None else records

    def _read(self, *, warn: bool = True) -> dict[str, ModelRecord] | None:
        """The manifest's records, or None when a manifest is there but unusable (rewrite it).

        Records whose name is invalid or whose file is not `<name>.gguf` are left out.
        """
        records = read_manifest(self.models_dir, warn=warn)
        if records is None:
            return None
        return {
            record.name: record
            for record in records
            if name_problem(record.name) is None and record.file == f"{record.name}{SUFFIX}"
        }

    def _commit(
        self,
        before: dict[str, ModelRecord] | None,
        fresh: dict[str, ModelRecord],
        *,
        strict: bool,
    ) -> builtins.list[ModelRecord]:
        """Merge `fresh` into the manifest as it is now and save it when anything changed.

        `before` is the manifest the caller read (None: unusable, so it is rewritten). A record
        another writer changed since then (a `mark_failed` during a long scan) wins over ours.
        Records whose file is gone are dropped. Without `strict`, a manifest that cannot be
        written is logged and the records are still returned, so a read-only models directory
        can still be listed.
        """
        known = {} if before is None else before
        if before is not None and all(
            known.get(name) == fresh.get(name) for name in set(known) | set(fresh)
        ):
            return builtins.list(fresh.values())
        try:
            with manifest_lock(self.models_dir):
                read = self._read(warn=before is not None)  # the caller warned already
                current = {} if read is None else read
                merged = merge_records(
                    known, current, fresh, lambda name: os.path.lexists(self._file(name))
                )
                if read is None or merged != current:
                    save_manifest(self.models_dir, merged)
                return builtins.list(merged.values())
        except ManifestError as exc:
            if strict:
                raise
            LOGGER.warning("model manifest not updated: %s", exc)
            return builtins.list(fresh.values())


def _record(
    name: str,
    header: GGUFHeader,
    sha256: str,
    info: os.stat_result,
    *,
    state: ModelState,
    reason: str | None,
    old: ModelRecord | None = None,
    source: str | None = None,
) -> ModelRecord:
    """A record of what was found; the defaults and source of the record it replaces stay,
    and a model seen for the first time gets the defaults known for its SHA-256."""
    return ModelRecord(
        name=name,
        file=f"{name}{SUFFIX}",
        size=info.st_size,
        sha256=sha256,
        state=state,
        reason=reason,
        architecture=header.architecture,
        context_length=header.context_length,
        has_chat_template=header.chat_template is not None,
        checked_at=time.time(),
        mtime=info.st_mtime,
        defaults=old.defaults if old is not None else known_defaults(sha256),
        source=old.source if old is not None else source,
    )


def _mb(size: int) -> int:
    return -(-size // (1024 * 1024))


def _unknown_message(name: str, installed: Collection[str]) -> str:
    if not installed:
        return f"no models are installed; import one with: {IMPORT_HINT}"
    return f"model {name!r} is not installed; installed: {', '.join(sorted(installed))}"


def _unavailable_message(record: ModelRecord) -> str:
    return (
        f"model {record.name!r} is unavailable: {record.reason or 'it failed its checks'}; "
        f"check it with: {VERIFY_HINT} {record.name}, or import it again"
    )


def _exists_message(name: str) -> str:
    return (
        f"model {name!r} is already installed; remove it first with: appliance models remove {name}"
    )
