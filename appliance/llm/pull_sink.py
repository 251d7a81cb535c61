"""Where a pull's bytes go: received buffers written to the file and hashed, off the
receiving thread.

The receiving thread fills a buffer from the socket and hands it on; a writing thread puts
it in the file and passes it to a hashing thread, which gives it back to be filled again. So
receiving, writing and hashing overlap on separate cores (recv_into, os.write and hashlib
let go of the GIL for big buffers), and no buffer is allocated per chunk. As the file grows
the writing thread starts its write-back (sync_file_range, which does not wait for the
disk), so the fsync before the file is listed has little left to do. The digest is of what
was written, also when a write fails part-way.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Final

BUFFER_BYTES: Final = 1024 * 1024
# Buffers in flight between the three threads (memory: BUFFERS * BUFFER_BYTES).
BUFFERS: Final = 8
# Bytes written between two starts of write-back: large, as each start costs the writing
# thread time in the filesystem, and what is left for the fsync is at most this much.
WRITEBACK_BYTES: Final = 64 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE: Final = 2

_Chunk = tuple[memoryview, int]


@functools.cache
def _writeback() -> Callable[[int, int, int], object] | None:
    """Linux's sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE), or None where
    libc has none (then the final fsync does all the writing back)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return lambda fd, offset, count: function(fd, offset, count, _SYNC_FILE_RANGE_WRITE)


class Sink:
    """Writes and hashes the buffers it hands out, in the order they are added, to the end
    of the file `fd` (opened with O_APPEND) and into `digest`."""

    def __init__(self, fd: int, digest: hashlib._Hash) -> None:
        self._fd = fd
        self._digest = digest
        self._end = os.fstat(fd).st_size  # where the next write lands
        self._written_back = self._end  # write-back started up to here
        self._failure: Exception | None = None
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            self._free.put(memoryview(bytearray(BUFFER_BYTES)))
        self._to_write: queue.SimpleQueue[_Chunk | None] = queue.SimpleQueue()
        self._to_hash: queue.SimpleQueue[_Chunk | None] = queue.SimpleQueue()
        self._threads = (
            threading.Thread(target=self._write_all, name="pull-write", daemon=True),
            threading.Thread(target=self._hash_all, name="pull-hash", daemon=True),
        )
        for thread in self._threads:
            thread.start()

    def buffer(self) -> memoryview:
        """A free buffer to fill; raises the error of a write that failed."""
        buffer = self._free.get()
        if self._failure is not None:
            self._free.put(buffer)
            self.check()
        return buffer

    def add(self, buffer: memoryview, count: int) -> None:
        """Write and hash the first `count` bytes of `buffer`, then reuse it."""
        self._to_write.put((buffer, count))

    def give_back(self, buffer: memoryview) -> None:
        self._free.put(buffer)

    def finish(self) -> hashlib._Hash:
        """The digest once everything added is written (or a write failed) and hashed."""
        self._to_write.put(None)
        for thread in self._threads:
            thread.join()
        return self._digest

    def check(self) -> None:
        """Raise the error of a write that failed (an OSError, or a fault of ours); the file
        holds what came before it."""
        if self._failure is not None:
            raise self._failure

    def _write_all(self) -> None:
        try:
            while (item := self._to_write.get()) is not None:
                buffer, count = item
                written = 0
                if self._failure is None:
                    try:
                        written = self._write(buffer, count)
                    except Exception as exc:  # never leave the receiver waiting for a buffer
                        self._failure = exc
                if written:
                    self._to_hash.put((buffer, written))
                else:
                    self._free.put(buffer)
        finally:
            self._to_hash.put(None)

    def _write(self, buffer: memoryview, count: int) -> int:
        """Bytes of `buffer` written; a failure is kept for the receiving thread."""
        written = 0
        try:
            while written < count:
                written += os.write(self._fd, buffer[written:count])
        except OSError as exc:
            self._failure = exc
        self._end += written
        start = _writeback()
        if start is not None and self._end - self._written_back >= WRITEBACK_BYTES:
            # A hint only: errors surface at the fsync that makes the file durable.
            start(self._fd, self._written_back, self._end - self._written_back)
            self._written_back = self._end
        return written

    def _hash_all(self) -> None:
        while (item := self._to_hash.get()) is not None:
            buffer, count = item
            self._digest.update(buffer[:count])
            self._free.put(buffer)
