"""The gzip layer: parallel compression into independent members, streaming decompression.

Writing cuts the tar stream into blocks of a few MiB and compresses each into a gzip member
of its own in a thread pool (zlib releases the GIL), then writes the members in order.
Concatenated members are one valid .gz for `gzip -d`, `tar xzf` and Python; the ratio lost
at block edges (deflate's window is 32 KiB) is negligible. Reading decompresses in a
thread of its own (`read_ahead`), so inflating overlaps with hashing and writing.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, TypeVar

from appliance.backup.manifest import BackupError

LEVEL: Final = 6  # gzip's default, so sizes compare with `tar czf`
BLOCK_BYTES: Final = 4 * 1024 * 1024
MAX_WORKERS: Final = 4
OUTPUT_CHUNK: Final = 1024 * 1024  # bounds what one inflate step makes (a gzip bomb)
GZIP_MAGIC: Final = b"\x1f\x8b"
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS
_HANDOFF_POLL: Final = 0.1

T = TypeVar("T")

DAMAGED: Final = "the archive is truncated or damaged"


def _gzip_member(block: memoryview) -> tuple[bytes, bytes]:
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, _GZIP_WBITS)
    return compressor.compress(block), compressor.flush()


def default_workers() -> int:
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


class GzipBlockWriter:
    """Compresses what is written to it and hands the gzip bytes to `sink`, in order.

    Callers fill `space()` in place (reading a file straight into it, no copy) and `commit`
    what they put there, or `write` small pieces. `close` flushes the last block; `abort`
    drops the work in flight.
    """

    def __init__(self, sink: Callable[[bytes], object], *, workers: int | None = None) -> None:
        self._sink = sink
        self._workers = workers or default_workers()
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="backup-gzip")
        self._pending: deque[Future[tuple[bytes, bytes]]] = deque()
        self._block = bytearray(BLOCK_BYTES)
        self._used = 0
        self.total_in = 0  # uncompressed bytes committed so far

    def space(self) -> memoryview:
        return memoryview(self._block)[self._used :]

    def commit(self, count: int) -> None:
        self._used += count
        self.total_in += count
        if self._used == len(self._block):
            self._submit()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            space = self.space()
            count = min(len(space), len(view))
            space[:count] = view[:count]
            view = view[count:]
            self.commit(count)

    def close(self) -> None:
        if self._used:
            self._submit()
        while self._pending:
            self._emit(self._pending.popleft())
        self._pool.shutdown()

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self) -> None:
        block = memoryview(self._block)[: self._used]
        self._pending.append(self._pool.submit(_gzip_member, block))
        self._block = bytearray(BLOCK_BYTES)
        self._used = 0
        # Enough in flight to keep every worker busy; beyond that wait, bounding memory.
        while self._pending and (self._pending[0].done() or len(self._pending) > 2 * self._workers):
            self._emit(self._pending.popleft())

    def _emit(self, future: Future[tuple[bytes, bytes]]) -> None:
        for part in future.result():
            if part:
                self._sink(part)


def gunzip(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The decompressed bytes of a gzip stream of one or more members, checked end to end.

    zlib checks each member's CRC-32 and length; a stream that stops inside a member, or has
    anything but gzip members in it, is a BackupError.
    """
    inflater = zlib.decompressobj(_GZIP_WBITS)
    fed = False
    first = True
    for chunk in chunks:
        if first and chunk:
            if not chunk.startswith(GZIP_MAGIC[: len(chunk)]):
                raise BackupError("not a backup archive (not gzip-compressed data)")
            first = False
        data = chunk
        while data:
            fed = True
            try:
                out = inflater.decompress(data, OUTPUT_CHUNK)
            except zlib.error as exc:
                raise BackupError(f"{DAMAGED} (gzip: {exc})") from None
            if out:
                yield out
            if inflater.eof:
                data = inflater.unused_data
                inflater = zlib.decompressobj(_GZIP_WBITS)
                fed = False
            else:
                data = inflater.unconsumed_tail
    if first:
        raise BackupError("the archive is empty (truncated or damaged)")
    if fed:
        try:
            out = inflater.flush()
        except zlib.error as exc:
            raise BackupError(f"{DAMAGED} (gzip: {exc})") from None
        if out:
            yield out
        if not inflater.eof:
            raise BackupError(f"{DAMAGED} (the compressed stream ends early)")


def file_chunks(read: Callable[[int], bytes], size: int = OUTPUT_CHUNK) -> Iterator[bytes]:
    while chunk := read(size):
        yield chunk


class _Done:
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


@contextlib.contextmanager
def read_ahead(source: Iterator[T], depth: int = 4) -> Iterator[Iterator[T]]:
    """`source` run in a thread of its own, `depth` items ahead of the consumer.

    Exceptions from `source` come out of the consumer's iterator. Leaving the block stops
    the thread and waits for it, so whatever `source` reads from may be closed after it.
    """
    handoff: queue.Queue[T | _Done] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: T | _Done) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=_HANDOFF_POLL)
            except queue.Full:
                continue
            return True
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(_Done())
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_Done(exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def consume() -> Iterator[T]:
        while not isinstance(item := handoff.get(), _Done):
            yield item
        if item.error is not None:
            raise item.error

    thread = threading.Thread(target=produce, name="backup-read", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()
