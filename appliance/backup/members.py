"""The tar layer: member headers for writing, and a strict streaming reader.

Headers come from `tarfile.TarInfo` (GNU format: sizes past 8 GiB and long names work in
every tar). The reader parses one 512-byte header at a time with `TarInfo.frombuf` rather
than `tarfile.open`, so it decides what a hostile archive may do: only regular files and
GNU long names (bounded) are accepted, and member data comes out as views of the
decompressed chunks, without copies.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from typing import Final

from appliance.backup.compress import DAMAGED
from appliance.backup.manifest import MAX_NAME_BYTES, BackupError, show

BLOCK: Final = tarfile.BLOCKSIZE  # 512
RECORD: Final = tarfile.RECORDSIZE  # 10240: tar pads the end of an archive to whole records
MAX_TRAILING_ZEROS: Final = 1024 * 1024  # end padding we accept; more is a zero bomb
_ZEROS: Final = bytes(RECORD)
_REGULAR: Final = (tarfile.REGTYPE, tarfile.AREGTYPE)
_NOT_REGULAR: Final = {
    tarfile.SYMTYPE: "is a symlink",
    tarfile.LNKTYPE: "is a hardlink",
    tarfile.CHRTYPE: "is a character device",
    tarfile.BLKTYPE: "is a block device",
    tarfile.FIFOTYPE: "is a fifo",
    tarfile.DIRTYPE: "is a directory",
    tarfile.CONTTYPE: "is a contiguous file",
    tarfile.GNUTYPE_SPARSE: "is a sparse file",
    tarfile.GNUTYPE_LONGLINK: "has a long link name",
    tarfile.XHDTYPE: "is a pax extended header",
    tarfile.XGLTYPE: "is a pax global header",
    tarfile.SOLARIS_XHDTYPE: "is a Solaris extended header",
}


def padding(size: int) -> bytes:
    return _ZEROS[: -size % BLOCK]


def member_header(name: str, size: int, mode: int, mtime: int) -> bytes:
    """A regular file's header with ownership normalized (root, no user or group names)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = mtime
    info.type = tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "strict")


def end_of_archive(written: int) -> bytes:
    """Two zero blocks, then zeros up to a whole record, as `tar` writes it."""
    end = written + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % RECORD))


class TarReader:
    """Regular-file members of a tar stream given as chunks; checks the stream to its end."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._view = memoryview(b"")

    def next_member(self) -> tarfile.TarInfo | None:
        """The next member's header (a regular file), or None after the end of the archive.

        A member's data must be read with `data` before the next call.
        """
        long_name: str | None = None
        while True:
            block = self._read(BLOCK)
            if not any(block):
                if long_name is not None:
                    raise BackupError(f"{DAMAGED} (a long name has no member)")
                self._finish()
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise BackupError(f"{DAMAGED} (tar header: {exc})") from None
            if info.size < 0:  # base-256 sizes can be negative
                raise BackupError(f"{DAMAGED} (a tar header has a negative size)")
            if info.type == tarfile.GNUTYPE_LONGNAME:
                if long_name is not None:
                    raise BackupError(f"{DAMAGED} (two long names in a row)")
                if info.size > MAX_NAME_BYTES + 1:
                    raise BackupError(
                        f"a member name is longer than {MAX_NAME_BYTES} bytes; the archive "
                        "was not made by the appliance"
                    )
                data = self._read(info.size + len(padding(info.size)))[: info.size]
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            if long_name is not None:
                info.name = long_name
            if info.type not in _REGULAR:
                problem = _NOT_REGULAR.get(info.type, f"has tar type {info.type!r}")
                raise BackupError(
                    f"member {show(info.name)} {problem}; backup archives hold regular files "
                    "only, so this one was not made by the appliance or was altered"
                )
            return info

    def data(self, size: int) -> Iterator[memoryview]:
        """A member's `size` bytes as views of the stream's chunks, then skips its padding."""
        left = size
        while left:
            view = self._take(left)
            left -= len(view)
            yield view
        self._read(len(padding(size)))

    def _take(self, most: int) -> memoryview:
        while not self._view:
            chunk = next(self._chunks, None)
            if chunk is None:
                raise BackupError(f"{DAMAGED} (the tar stream ends early)")
            self._view = memoryview(chunk)
        piece, self._view = self._view[:most], self._view[most:]
        return piece

    def _read(self, size: int) -> bytes:
        if len(self._view) >= size:
            piece, self._view = self._view[:size], self._view[size:]
            return piece.tobytes()
        parts = []
        left = size
        while left:
            piece = self._take(left)
            left -= len(piece)
            parts.append(piece)
        return b"".join(parts)

    def _finish(self) -> None:
        # The second zero block, then zero padding up to the end of the stream: reading to
        # the end is what makes gzip check its last CRC, and nothing may hide after the end.
        if any(self._read(BLOCK)):
            raise BackupError(f"{DAMAGED} (data after a lone end-of-archive block)")
        trailing = 0
        while True:
            if not self._view:
                chunk = next(self._chunks, None)
                if chunk is None:
                    return
                self._view = memoryview(chunk)
            trailing += len(self._view)
            if trailing > MAX_TRAILING_ZEROS or self._view.tobytes().strip(b"\0"):
                raise BackupError(f"{DAMAGED} (data after the end of the archive)")
            self._view = memoryview(b"")
