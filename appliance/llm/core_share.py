"""The CPU cores shared by the workers of the resident models.

Each worker runs llama.cpp with APPLIANCE_THREADS threads (by default every usable core).
Two workers decoding at once would run twice as many threads as there are cores, and
llama.cpp's threads wait for each other at every step of a graph: on 2 cores, 2 streams
to 2 models gave a third of the tokens/s of 2 streams to one model. So every worker of a
daemon has a record in one small table (a file in the runtime dir, mapped into each
worker) saying whether it is decoding now, and before each decode step a worker takes its
share of the threads: the configured count divided by the workers decoding, at least 1.

A worker that was killed leaves its record behind; records of processes that no longer
exist count as idle, and the next worker to start takes their place.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import struct
from pathlib import Path
from typing import Final

LOGGER = logging.getLogger(__name__)

# In the runtime dir; it holds pids and flags only, and goes with the dir.
CORE_SHARE_FILE: Final = "core-share"
SLOTS: Final = 64
# One record per worker: its pid (0: free) and whether it is decoding now.
RECORD: Final = struct.Struct("<ii")
SIZE: Final = SLOTS * RECORD.size


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class CoreShare:
    """This worker's record in the shared table; `threads()` is its share now."""

    def __init__(self, path: Path, threads: int) -> None:
        self.configured: Final = max(1, threads)
        self._pid: Final = os.getpid()
        self._busy = False
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # two workers starting at once take two slots
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)
            self._table = mmap.mmap(fd, SIZE)
            self._slot = self._claim()
        finally:
            # The mapping holds a duplicate of the descriptor: unlock, or the lock stays.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _claim(self) -> int | None:
        for slot in range(SLOTS):
            pid, _ = RECORD.unpack_from(self._table, slot * RECORD.size)
            if pid == 0 or not _alive(pid):
                RECORD.pack_into(self._table, slot * RECORD.size, self._pid, 0)
                return slot
        LOGGER.warning("more than %d workers: this one does not share its cores", SLOTS)
        return None

    def threads(self) -> int:
        """Mark this worker as decoding; the threads it should use for its next step."""
        if self._slot is None:
            return self.configured
        if not self._busy:
            RECORD.pack_into(self._table, self._slot * RECORD.size, self._pid, 1)
            self._busy = True
        decoding = 1
        for slot, (pid, busy) in enumerate(RECORD.iter_unpack(self._table)):
            if busy and slot != self._slot and _alive(pid):
                decoding += 1
        return max(1, self.configured // decoding)

    def idle(self) -> None:
        """This worker has nothing to decode (cheap to call when it is idle already)."""
        if self._busy and self._slot is not None:
            RECORD.pack_into(self._table, self._slot * RECORD.size, self._pid, 0)
        self._busy = False

    def close(self) -> None:
        """Give the record back (the model is unloaded or the worker ends)."""
        if self._slot is not None:
            RECORD.pack_into(self._table, self._slot * RECORD.size, 0, 0)
            self._slot = None
        with contextlib.suppress(ValueError, BufferError):
            self._table.close()
