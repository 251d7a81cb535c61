"""Requests multiplexed over one inference worker's socket.

Frames out go one at a time (several generations run at once). Frames in have no reader
task of their own: a request that waits for one reads the socket itself while no other
does, and hands frames for other requests to them, so a token costs one task wakeup and
one recv, not a reader task's wakeup plus a channel hop to the request's task.
"""

from __future__ import annotations

import array
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Final

import trio

from appliance.llm.errors import WorkerCrashed
from appliance.llm.protocol import (
    FrameBuffer,
    FromWorker,
    ProtocolError,
    ToWorker,
    decode_from_worker,
    encode_frame,
)

LOGGER = logging.getLogger("appliance.llm")

RECEIVE_BYTES: Final = 65536
# After the socket ends, how long a request waits for the exit watcher to say how the
# worker ended (it notices within milliseconds; this only bounds the wait).
EXIT_GRACE: Final = 2.0


class Pending:
    """One request's frames that another task read off the socket, or why none will come."""

    __slots__ = ("error", "frames", "wakeup")

    def __init__(self) -> None:
        self.frames: deque[FromWorker] = deque()
        self.error: BaseException | None = None
        # Set while the request waits for a frame that another task is reading.
        self.wakeup: trio.Event | None = None

    def wake(self) -> None:
        if self.wakeup is not None:
            self.wakeup.set()


class WorkerLink:
    """The supervisor's end of one worker's socket and the requests waiting on it.

    `on_invalid_frame` is called when the worker sends something that is not a frame (the
    caller kills it: the stream cannot be trusted any more).
    """

    def __init__(self, sock: socket.socket, on_invalid_frame: Callable[[], None]) -> None:
        self.sock = sock
        self._on_invalid_frame = on_invalid_frame
        self._pending: dict[int, Pending] = {}
        self._failed: BaseException | None = None
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self.frames = FrameBuffer()
        # Several generations run at once: one frame out at a time.
        self.send_lock = trio.Lock()
        self.reading = False  # a request waits on the socket; any other waits for it
        self.ended = False  # closed, EOF or an invalid frame: no more frames will come

    async def _read_body(self) -> bytes | None:
        """The next frame's body; None once the socket has ended. Raises ProtocolError."""
        body = self.frames.pop()
        while body is None and not self.ended:
            # Readiness first, then one recv: one system call per token, where trio's
            # receive_some would try a recv first and fail while the worker decodes.
            try:
                await trio.lowlevel.wait_readable(self.sock)
                data = self.sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                continue
            except (OSError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.ended = True
                return None
            self.frames.push(data)
            body = self.frames.pop()
        return body

    def open(self, request_id: int) -> Pending:
        """Start waiting for `request_id`'s frames (fails at once on a failed link)."""
        pending = Pending()
        if self._failed is not None:
            pending.error = self._failed
        else:
            self._pending[request_id] = pending
        return pending

    def forget(self, request_id: int) -> None:
        """No more frames for `request_id` are wanted; any that come are dropped."""
        self._pending.pop(request_id, None)

    def fail(self, error: BaseException) -> None:
        """The worker is gone: every waiting request, and any opened later, gets `error`."""
        if self._failed is None:
            self._failed = error
        for pending in self._pending.values():
            if pending.error is None:
                pending.error = error
            pending.wake()
        self._pending.clear()

    async def send(self, message: ToWorker, descriptor: int | None = None) -> None:
        """Send a frame; `descriptor` goes with its first byte (SCM_RIGHTS), a duplicate
        of it into the worker."""
        data = encode_frame(message)
        try:
            async with self.send_lock:
                if descriptor is not None:
                    fds = array.array("i", [descriptor])
                    try:
                        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                        data = data[await self.stream.socket.sendmsg([data], rights) :]
                    except OSError:
                        raise trio.BrokenResourceError from None
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise WorkerCrashed("the worker is gone") from None

    async def receive(self, request_id: int, pending: Pending) -> FromWorker:
        """The request's next frame (frames of requests no longer waiting, such as one that
        gave up on a cancel, are dropped)."""
        while True:
            if pending.frames:
                return pending.frames.popleft()
            if pending.error is not None:
                raise pending.error
            if self.reading:
                await _wait(pending)
                continue
            message = await self._read_frame()
            if message is None:
                # The worker is gone: its exit watcher says how in a moment.
                with trio.move_on_after(EXIT_GRACE):
                    while pending.error is None:
                        await _wait(pending)
                raise pending.error or WorkerCrashed("the worker closed its connection")
            if message.id == request_id:
                return message
            other = self._pending.get(message.id)
            if other is not None:
                other.frames.append(message)
                other.wake()

    async def aclose(self) -> None:
        self.ended = True
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    async def _read_frame(self) -> FromWorker | None:
        """The next frame off the socket, whoever it is for; None once it has ended."""
        self.reading = True
        try:
            body = await self._read_body()
            return None if body is None else decode_from_worker(body)
        except ProtocolError as exc:
            self.ended = True
            LOGGER.error("worker sent an invalid frame (%s); restarting it", exc)
            self._on_invalid_frame()
            return None
        finally:
            self.reading = False
            # Hand the socket on to any other request waiting for a frame.
            for pending in self._pending.values():
                pending.wake()


async def _wait(pending: Pending) -> None:
    pending.wakeup = wakeup = trio.Event()
    try:
        await wakeup.wait()
    finally:
        pending.wakeup = None
