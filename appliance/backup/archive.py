"""Write, verify and extract backup archives: the public face of `appliance.backup`.

An archive is a gzip-compressed tar whose first member is `manifest.json` (size, SHA-256
and mode of every other member, and the key id of the appliance that made it), followed by
`manifest.auth` (a keyed hash of the manifest under that appliance's key: see
`authenticity`), readable by `tar xzf`. Sources are hashed before the
manifest is written and hashed again as they stream into the tar, so a file that changes
during the backup fails it rather than leaving an archive whose manifest lies. Archives
appear atomically (`catalog.publish`); with a passphrase the whole file is sealed
(`sealed`). Readers check everything the manifest promises and refuse anything but
plain regular files with safe relative names, so a hostile archive can neither escape
`dest` nor plant links.

Everything here is blocking file work: the daemon calls it through `trio.to_thread`.
Errors are `BackupError`, one line, named after the archive when reading one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from appliance import __version__
from appliance.backup.authenticity import AUTH_MODE, ManifestKeys, encode_auth
from appliance.backup.catalog import (
    ARCHIVE_PREFIX,
    FILE_MODE,
    BackupInfo,
    archive_name,
    list_backups,
    partial_path,
    prune_backups,
    publish,
    read_passphrase_file,
    record_verified,
    remove_partials,
)
from appliance.backup.compress import GzipBlockWriter
from appliance.backup.extract import Extractor
from appliance.backup.manifest import (
    AUTH_NAME,
    FORMAT_VERSION,
    MANIFEST_MODE,
    MANIFEST_NAME,
    PERMISSION_BITS,
    BackupError,
    Manifest,
    MemberEntry,
    encode_manifest,
    file_and_dir,
    name_problem,
    show,
)
from appliance.backup.members import end_of_archive, member_header, padding
from appliance.backup.reader import Admit, Checked, Progress, open_archive, read_members
from appliance.backup.sealed import SealedWriter

__all__ = [
    "ARCHIVE_PREFIX",
    "FORMAT_VERSION",
    "BackupError",
    "BackupInfo",
    "Checked",
    "Manifest",
    "MemberEntry",
    "Source",
    "archive_name",
    "extract_archive",
    "list_backups",
    "prune_backups",
    "read_passphrase_file",
    "remove_partials",
    "verify_archive",
    "write_archive",
]

READ_BYTES: Final = 1024 * 1024


@dataclass(frozen=True)
class Source:
    """One regular file to back up, stored as `arcname` (a relative posix path)."""

    arcname: str
    path: Path


def write_archive(
    backup_dir: Path,
    sources: list[Source],
    meta: dict[str, str],
    *,
    keys: ManifestKeys,
    when: datetime,
    passphrase: bytes | None = None,
    progress: Progress | None = None,
) -> Path:
    """Back `sources` up into a new archive in `backup_dir`, authenticated under the current
    key of `keys`; its path.

    `progress(done, total)` counts source bytes as they are written. On any failure no
    archive and no partial file remain.
    """
    _check_sources(sources)
    final = backup_dir / archive_name(when, sealed=passphrase is not None)
    if final.exists():
        raise BackupError(f"{final.name} already exists; run the backup again")
    entries = [_hash_source(source) for source in sources]
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        appliance_version=__version__,
        created=when.timestamp(),
        created_utc=when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        members=entries,
        meta=dict(meta),
        key_id=keys.current_id,
    )
    temp = partial_path(final)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, FILE_MODE)
    except OSError as exc:
        raise BackupError(
            f"cannot write {temp.name} in the backup directory: {exc.strerror}"
        ) from None
    try:
        with open(fd, "wb") as file:
            sealer = SealedWriter(file.write, passphrase) if passphrase is not None else None
            gzip = GzipBlockWriter(sealer.write if sealer is not None else file.write)
            try:
                _write_tar(gzip, manifest, keys, sources, progress)
                gzip.close()
            except BaseException:
                gzip.abort()
                raise
            if sealer is not None:
                sealer.close()
            file.flush()
            os.fsync(file.fileno())
        publish(temp, final)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise BackupError(
                f"cannot write {final.name}: {exc.strerror}; check the free space and "
                "permissions of the backup directory"
            ) from None
        raise
    return final


def verify_archive(
    path: Path,
    *,
    keys: ManifestKeys,
    admit: Admit | None = None,
    passphrase: bytes | None = None,
    progress: Progress | None = None,
    record: bool = True,
) -> Checked:
    """Read the whole archive and check everything (and what `admit` checks, as a restore
    would); with `record`, leave a `.verified` when it is authenticated for the box that
    `keys` belong to."""
    with open_archive(path, passphrase) as (reader, status):
        checked = read_members(reader, progress, None, keys, admit)
    if record and checked.authenticity.for_this_box:
        try:
            record_verified(path, status, datetime.now(UTC))
        except OSError as exc:
            raise BackupError(
                f"{path.name} is good, but its verification could not be recorded: "
                f"{exc.strerror}; check the backup directory's permissions"
            ) from None
    return checked


def extract_archive(
    path: Path,
    dest: Path,
    *,
    keys: ManifestKeys,
    admit: Admit | None = None,
    passphrase: bytes | None = None,
    progress: Progress | None = None,
) -> Checked:
    """Check and extract the archive's members into `dest` (new, or an empty directory).

    `admit` may refuse the archive for what its manifest says before anything is written.
    On any failure everything created under `dest` is removed again.
    """
    extractor = Extractor(dest)
    try:
        with open_archive(path, passphrase) as (reader, _):
            checked = read_members(reader, progress, extractor, keys, admit)
        extractor.sync()
    except BaseException as exc:
        extractor.undo()
        if isinstance(exc, OSError):
            raise BackupError(f"cannot extract {path.name} into {dest}: {exc.strerror}") from None
        raise
    finally:
        extractor.close()
    return checked


def _check_sources(sources: list[Source]) -> None:
    names = set()
    for source in sources:
        problem = name_problem(source.arcname)
        if problem is not None:
            raise ValueError(f"source {show(source.arcname)} {problem}")
        if source.arcname in (MANIFEST_NAME, AUTH_NAME) or source.arcname in names:
            raise ValueError(f"source {show(source.arcname)} is given twice or is the manifest")
        names.add(source.arcname)
    clash = file_and_dir(names)
    if clash is not None:
        raise ValueError(f"source {show(clash)} is a file and a directory of other sources")


def _open_source(source: Source) -> tuple[int, os.stat_result]:
    """An open descriptor of a regular file, and its status."""
    try:
        # O_NONBLOCK: opening a FIFO must not hang; it is refused below.
        fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        status = os.fstat(fd)
    except OSError as exc:
        raise BackupError(f"cannot read {source.arcname} for the backup: {exc.strerror}") from None
    if not stat.S_ISREG(status.st_mode):
        os.close(fd)
        raise BackupError(f"{source.arcname} is not a regular file; it cannot be backed up")
    return fd, status


def _read_into(fd: int, buffer: memoryview | bytearray, source: Source) -> int:
    # Only reading errors are the source's: a write error is the backup directory's.
    try:
        return os.readv(fd, [buffer])
    except OSError as exc:
        raise BackupError(f"cannot read {source.arcname} for the backup: {exc.strerror}") from None


def _hash_source(source: Source) -> MemberEntry:
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    fd, status = _open_source(source)
    try:
        while count := _read_into(fd, buffer, source):
            digest.update(view[:count])
            size += count
    finally:
        os.close(fd)
    return MemberEntry(
        name=source.arcname,
        size=size,
        sha256=digest.hexdigest(),
        mode=stat.S_IMODE(status.st_mode) & PERMISSION_BITS,
    )


def _write_tar(
    gzip: GzipBlockWriter,
    manifest: Manifest,
    keys: ManifestKeys,
    sources: list[Source],
    progress: Progress | None,
) -> None:
    mtime = int(manifest.created)
    data = encode_manifest(manifest)
    gzip.write(member_header(MANIFEST_NAME, len(data), MANIFEST_MODE, mtime))
    gzip.write(data + padding(len(data)))
    auth = encode_auth(keys, data)
    gzip.write(member_header(AUTH_NAME, len(auth), AUTH_MODE, mtime))
    gzip.write(auth + padding(len(auth)))
    total = manifest.total_size
    done = 0
    if progress is not None:
        progress(0, total)
    for source, entry in zip(sources, manifest.members, strict=True):
        gzip.write(member_header(entry.name, entry.size, entry.mode, mtime))
        done = _copy_source(gzip, source, entry, done, total, progress)
        gzip.write(padding(entry.size))
    gzip.write(end_of_archive(gzip.total_in))


def _copy_source(
    gzip: GzipBlockWriter,
    source: Source,
    entry: MemberEntry,
    done: int,
    total: int,
    progress: Progress | None,
) -> int:
    """Stream one source into the tar, hashing it again; the running byte count."""
    changed = BackupError(
        f"{source.arcname} changed while it was being backed up; run the backup again"
    )
    digest = hashlib.sha256()
    left = entry.size
    fd, _ = _open_source(source)
    try:
        while left:
            space = gzip.space()
            view = space[: min(left, len(space))]
            count = _read_into(fd, view, source)  # straight into the compressor's block
            if not count:
                raise changed  # shrank
            digest.update(view[:count])
            gzip.commit(count)
            left -= count
            done += count
            if progress is not None:
                progress(done, total)
        if _read_into(fd, bytearray(1), source) or digest.hexdigest() != entry.sha256:
            raise changed  # grew, or other bytes than the manifest promises
    finally:
        os.close(fd)
    return done
