"""Writing an archive's members under a destination directory, and undoing it on failure.

Every path is opened relative to a directory descriptor, one component at a time, with
O_NOFOLLOW, and files with O_EXCL: nothing outside `dest` is ever touched, whatever names
the archive holds. Only what this extraction created is removed again by `undo`.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final

from appliance.backup.manifest import BackupError, Manifest, MemberEntry, show

DIR_MODE: Final = 0o700
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Extractor:
    """Creates `dest` (or takes it when it is an empty directory) and fills it."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self._made_dest = False
        self._dirs: dict[str, int] = {}  # relative path ("" is dest) -> open descriptor
        self._created: list[tuple[str, bool]] = []  # (relative path, is a directory)
        self._file: BinaryIO | None = None
        try:
            os.mkdir(dest, DIR_MODE)
            self._made_dest = True
        except FileExistsError:
            if dest.is_symlink() or not dest.is_dir() or any(dest.iterdir()):
                raise BackupError(
                    f"{dest} exists and is not an empty directory; restore into a new or "
                    "empty directory"
                ) from None
        except OSError as exc:
            raise BackupError(f"cannot create {dest}: {exc.strerror}") from None
        try:
            self._dirs[""] = os.open(dest, _DIR_FLAGS)
        except OSError as exc:
            self.undo()
            raise BackupError(f"cannot open {dest}: {exc.strerror}") from None

    def start(self, manifest: Manifest) -> None:
        """Refuse at once when the members cannot fit, rather than fill the disk."""
        free = shutil.disk_usage(self.dest).free
        if manifest.total_size > free:
            raise BackupError(
                f"the backup needs {manifest.total_size // 2**20} MiB but {self.dest} has "
                f"{free // 2**20} MiB free; free some space or restore elsewhere"
            )

    def open(self, entry: MemberEntry) -> Callable[[memoryview], object]:
        parent, base = posixpath.split(entry.name)
        parent_fd = self._dir(parent, entry.name)
        try:
            fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=parent_fd)
        except (FileExistsError, IsADirectoryError):
            raise BackupError(
                f"member {show(entry.name)} collides with a directory of the same name; the "
                "archive was altered"
            ) from None
        self._created.append((entry.name, False))
        self._file = open(fd, "wb")  # noqa: SIM115 - closed by finish, or by close on failure
        return self._file.write

    def finish(self, entry: MemberEntry) -> None:
        file, self._file = self._file, None
        assert file is not None
        with file:
            file.flush()
            os.fchmod(file.fileno(), entry.mode)
            os.fsync(file.fileno())

    def sync(self) -> None:
        """Make the new directory entries durable (the files were synced one by one)."""
        for fd in self._dirs.values():
            os.fsync(fd)
        if self._made_dest:
            fd = os.open(self.dest.parent, _DIR_FLAGS)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def undo(self) -> None:
        """Remove what this extraction created, newest first; never anything else."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for relative, is_dir in reversed(self._created):
            parent, base = posixpath.split(relative)
            with contextlib.suppress(OSError):
                if is_dir:
                    os.rmdir(base, dir_fd=self._dirs[parent])
                else:
                    os.unlink(base, dir_fd=self._dirs[parent])
        if self._made_dest:
            with contextlib.suppress(OSError):
                os.rmdir(self.dest)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def _dir(self, relative: str, member: str) -> int:
        """The descriptor of directory `relative` under dest, created as needed."""
        fd = self._dirs.get(relative)
        if fd is not None:
            return fd
        parent, base = posixpath.split(relative)
        parent_fd = self._dir(parent, member)
        try:
            os.mkdir(base, DIR_MODE, dir_fd=parent_fd)
            self._created.append((relative, True))
        except FileExistsError:
            pass  # made for an earlier member; a file by that name fails to open below
        try:
            fd = os.open(base, _DIR_FLAGS, dir_fd=parent_fd)
        except (NotADirectoryError, OSError):
            raise BackupError(
                f"member {show(member)} needs {show(relative)} to be a directory, but the "
                "archive has a file by that name; it was altered"
            ) from None
        self._dirs[relative] = fd
        return fd
