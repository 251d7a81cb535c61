"""The backup directory: archive names, listing, pruning, partial files and sidecars.

An archive is `data-backup-YYYYMMDD-HHMMSS.tar.gz` (UTC), `.sealed` appended when sealed
with a passphrase. While it is written it is `.data-backup-...partial-<pid>`, a name no
listing matches. A successful verification leaves `<archive>.verified`, which counts only
while the archive's size and mtime are still those it records.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec

from appliance.backup.manifest import BackupError

ARCHIVE_PREFIX: Final = "data-backup-"
ARCHIVE_SUFFIX: Final = ".tar.gz"
SEALED_SUFFIX: Final = ".sealed"
VERIFIED_SUFFIX: Final = ".verified"
PARTIAL_MARK: Final = ".partial-"
TIME_FORMAT: Final = "%Y%m%d-%H%M%S"
FILE_MODE: Final = 0o600  # archives hold every secret of the box
MAX_PASSPHRASE_BYTES: Final = 64 * 1024
_SIDECAR_MAX_BYTES: Final = 4096
_ARCHIVE_RE: Final = re.compile(
    rf"{re.escape(ARCHIVE_PREFIX)}(\d{{8}}-\d{{6}}){re.escape(ARCHIVE_SUFFIX)}"
    rf"({re.escape(SEALED_SUFFIX)})?"
)
_PARTIAL_RE: Final = re.compile(
    rf"\.{_ARCHIVE_RE.pattern}(?:{re.escape(VERIFIED_SUFFIX)})?{re.escape(PARTIAL_MARK)}\d+"
)


@dataclass(frozen=True)
class BackupInfo:
    name: str
    path: Path
    size: int
    created: datetime
    sealed: bool
    verified_at: datetime | None


class Verified(msgspec.Struct, frozen=True):
    """The `.verified` sidecar: which state of the archive file was found good, and when."""

    size: int
    mtime_ns: int
    verified_at: float


def archive_name(when: datetime, sealed: bool) -> str:
    if when.tzinfo is None:
        raise ValueError("when must be timezone-aware (UTC)")
    stamp = when.astimezone(UTC).strftime(TIME_FORMAT)
    return f"{ARCHIVE_PREFIX}{stamp}{ARCHIVE_SUFFIX}{SEALED_SUFFIX if sealed else ''}"


def partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{PARTIAL_MARK}{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: Path, final: Path) -> None:
    """Give the finished `temp` its final name, never replacing a file that has it."""
    try:
        os.link(temp, final)  # fails when `final` exists, unlike rename
    except FileExistsError:
        raise BackupError(f"{final.name} already exists; run the backup again") from None
    except OSError:
        # A file system without hard links (FAT on a USB disk): check, then rename.
        if final.exists():
            raise BackupError(f"{final.name} already exists; run the backup again") from None
        os.rename(temp, final)
    else:
        os.unlink(temp)
    fsync_dir(final.parent)


def record_verified(archive: Path, status: os.stat_result, when: datetime) -> None:
    """Write the sidecar atomically: temp file, fsync, rename, fsync the directory."""
    sidecar = archive.with_name(archive.name + VERIFIED_SUFFIX)
    temp = partial_path(sidecar)
    data = msgspec.json.encode(Verified(status.st_size, status.st_mtime_ns, when.timestamp()))
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
        with open(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, sidecar)
        fsync_dir(archive.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _verified_at(archive: Path, status: os.stat_result) -> datetime | None:
    try:
        with open(archive.with_name(archive.name + VERIFIED_SUFFIX), "rb") as file:
            record = msgspec.json.decode(file.read(_SIDECAR_MAX_BYTES), type=Verified)
    except (OSError, msgspec.DecodeError):
        return None
    if (record.size, record.mtime_ns) != (status.st_size, status.st_mtime_ns):
        return None  # the archive changed since it was verified
    return datetime.fromtimestamp(record.verified_at, UTC)


def list_backups(backup_dir: Path) -> list[BackupInfo]:
    """The archives in `backup_dir`, newest first (by the time in their names)."""
    found = []
    try:
        entries = list(os.scandir(backup_dir))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise BackupError(f"cannot list the backup directory: {exc.strerror}") from None
    for entry in entries:
        match = _ARCHIVE_RE.fullmatch(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            created = datetime.strptime(match[1], TIME_FORMAT).replace(tzinfo=UTC)
            status = entry.stat(follow_symlinks=False)
        except (ValueError, OSError):
            continue  # a name with an impossible date, or gone since the scan
        path = Path(entry.path)
        found.append(
            BackupInfo(
                name=entry.name,
                path=path,
                size=status.st_size,
                created=created,
                sealed=match[2] is not None,
                verified_at=_verified_at(path, status),
            )
        )
    found.sort(key=lambda info: (info.created, info.name), reverse=True)
    return found


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise BackupError(
            f"cannot delete {path.name}: {exc.strerror}; check the backup directory's permissions"
        ) from None
    return True


def prune_backups(backup_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` archives and their sidecars; the archives deleted."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    deleted = []
    for info in list_backups(backup_dir)[keep:]:
        if _remove(info.path):
            deleted.append(info.path)
        _remove(info.path.with_name(info.name + VERIFIED_SUFFIX))
    if deleted:
        fsync_dir(backup_dir)
    return deleted


def remove_partials(backup_dir: Path) -> list[Path]:
    """Delete what killed backups and verifications left; the caller holds the backup lock."""
    try:
        names = os.listdir(backup_dir)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise BackupError(f"cannot list the backup directory: {exc.strerror}") from None
    deleted = [
        backup_dir / name
        for name in sorted(names)
        if _PARTIAL_RE.fullmatch(name) and _remove(backup_dir / name)
    ]
    if deleted:
        fsync_dir(backup_dir)
    return deleted


def read_passphrase_file(path: Path) -> bytes:
    """The passphrase: the file's bytes less one trailing newline.

    Refused when unreadable, empty, not a regular file, or open to group or others (like
    ssh with a private key: a passphrase anyone on the box can read protects nothing).
    """
    try:
        # O_NONBLOCK: a FIFO put there by mistake must not hang the backup.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        with open(fd, "rb") as file:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise BackupError(f"the passphrase file {path} is not a regular file")
            if status.st_mode & 0o077:
                raise BackupError(
                    f"the passphrase file {path} is open to group or others (mode "
                    f"{stat.S_IMODE(status.st_mode):04o}); run: chmod 600 {path}"
                )
            data = file.read(MAX_PASSPHRASE_BYTES + 1)
    except OSError as exc:
        raise BackupError(f"cannot read the passphrase file {path}: {exc.strerror}") from None
    if len(data) > MAX_PASSPHRASE_BYTES:
        raise BackupError(
            f"the passphrase file {path} is over {MAX_PASSPHRASE_BYTES} bytes; it should hold "
            "one passphrase"
        )
    if data.endswith(b"\n"):
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    if not data:
        raise BackupError(f"the passphrase file {path} is empty; write the passphrase into it")
    return data
