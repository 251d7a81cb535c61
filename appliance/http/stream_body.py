"""The body of a streamed (SSE) answer, and what happens to a client that stops reading.

Hypercorn writes each chunk with a shielded send that waits for room in the socket's
buffer. A client that stops reading (its receive window closed) holds the response's task
in that send for as long as it keeps the connection open: beyond any cancel scope
(Quart's RESPONSE_TIMEOUT included), and with it the generation's slot, its budget
reservation and the key's stream count. So a watch task runs beside each body: when one
chunk has waited APPLIANCE_STREAM_STALL_SECONDS for the client, it ends the generation
(which frees all three) and aborts the connection, which is what ends the blocked send.

Once its first chunks are on their way, a body with a handoff (appliance.llm.handoff) gives
the generation a duplicate of the connection's socket, for its worker to write the token
events itself; bytes the worker gives back are written here, ahead of the next chunk.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import AsyncGenerator, Callable
from typing import Any, Final, Protocol

import psutil
import trio

from appliance.llm.handoff import Handoff

LOGGER = logging.getLogger("appliance.http")

# Chunks the server writes before the generation is handed to its worker: the headers go
# with the first, and the connection's lookup stays out of the way of the first token
# (a chat completion's first chunk only says the role).
HAND_OVER_AFTER: Final = 2
# SO_LINGER on, 0 seconds: closing sends a reset and drops what the client never took.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)

Address = tuple[Any, ...]


class Closable(Protocol):
    async def aclose(self) -> None: ...


class ClientGone(Exception):
    """The connection failed while this body wrote to it itself: the stream ends."""


class StreamBody:
    """The chunks of one streamed answer and the generation behind them (`events`).

    Quart closes a response body when it is done with it, also when the client left before
    the first byte; closing an async generator that never started skips its `finally`, so
    this closes the generation's events itself (its stream slot and budget reservation are
    let go either way). `watch` (run it beside the response) ends a stalled stream;
    callbacks given to `after_close` run once the body is closed, however it ends.
    """

    __slots__ = (
        "_after_close",
        "_chunks",
        "_closed",
        "_closing",
        "_connection",
        "_events",
        "_handed_at",
        "_handed_out",
        "_handoff",
        "_peer",
        "_stall_seconds",
        "_stalled",
        "_with_client",
    )

    def __init__(
        self,
        chunks: AsyncGenerator[bytes, None],
        events: Closable,
        *,
        stall_seconds: float,
        peer: tuple[Address, Address] | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        self._chunks = chunks
        self._events = events
        self._stall_seconds = stall_seconds
        # (client, server) addresses of the connection, to abort it when the client stalls.
        self._peer = peer
        # The headers go first: they are on their way to the client from the start.
        self._with_client = True
        self._handed_at = trio.current_time()
        self._closing = False
        self._closed = trio.Event()
        self._stalled = False
        self._after_close: list[Callable[[], None]] = []
        # Given to the generation once HAND_OVER_AFTER chunks have gone to the connection,
        # where the route wanted it.
        self._handoff = handoff if peer is not None else None
        self._connection: socket.socket | None = None
        self._handed_out = 0  # chunks given to the server

    def after_close(self, callback: Callable[[], None]) -> None:
        if self._closed.is_set():
            callback()
        else:
            self._after_close.append(callback)

    def __aiter__(self) -> StreamBody:
        return self

    async def __anext__(self) -> bytes:
        if self._stalled:
            raise StopAsyncIteration
        self._with_client = False
        if self._handoff is not None and self._handed_out >= HAND_OVER_AFTER:
            self._hand_over(self._handoff)
        try:
            return await self._chunks.__anext__()
        except ClientGone:
            raise StopAsyncIteration from None
        finally:
            self._handed_out += 1
            # Whatever comes back (a chunk, the end), the server sends it next.
            self._handed_at = trio.current_time()
            self._with_client = True

    def _hand_over(self, handoff: Handoff) -> None:
        """Give the generation the connection, once (a body without its peer has none).
        Looked up on the loop: a few system calls per descriptor of this process, 0.25 ms
        for 70 of them, once per stream."""
        self._handoff = None
        if not handoff.wanted or self._peer is None:
            return
        connection = find_connection(*self._peer)
        if connection is not None:
            self._connection = connection
            handoff.connection = connection
            handoff.write_back = self._write_back

    async def _write_back(self, data: bytes) -> None:
        """Write framed bytes the worker gave back, waiting for the client as the server
        would (the stall watch applies); ClientGone if the connection fails."""
        connection = self._connection
        assert connection is not None
        self._with_client = True
        self._handed_at = trio.current_time()
        try:
            while data:
                try:
                    data = data[connection.send(data, socket.MSG_NOSIGNAL) :]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(connection)
        except (OSError, trio.ClosedResourceError):
            raise ClientGone from None
        finally:
            self._with_client = False

    async def aclose(self) -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            try:
                await self._chunks.aclose()
            finally:
                with trio.CancelScope(shield=True):
                    await self._events.aclose()
        finally:
            if self._connection is not None:
                trio.lowlevel.notify_closing(self._connection)
                self._connection.close()  # the duplicate only
            self._closed.set()
            callbacks, self._after_close = self._after_close, []
            for callback in callbacks:
                callback()

    async def watch(self) -> None:
        """Until the body is closed: end the stream once a chunk (or the headers) has waited
        for the client `stall_seconds`. One wakeup per stall period, none per token."""
        stall = self._stall_seconds
        while not self._closed.is_set():
            if self._with_client:
                deadline = self._handed_at + stall
                if trio.current_time() >= deadline:
                    await self._stall_out()
                    return
            else:
                deadline = trio.current_time() + stall
            with trio.move_on_at(deadline):
                await self._closed.wait()

    async def _stall_out(self) -> None:
        self._stalled = True
        LOGGER.warning(
            "stream stalled: the client took no data for %.0f s "
            "(APPLIANCE_STREAM_STALL_SECONDS); its generation is cancelled, its slot and "
            "budget reservation freed, and the connection closed",
            self._stall_seconds,
        )
        try:
            await self.aclose()
        finally:
            if self._peer is not None:
                with trio.CancelScope(shield=True):
                    found = await trio.to_thread.run_sync(abort_connection, *self._peer)
                if not found:
                    LOGGER.info("the stalled stream's connection was already closed")


def find_connection(client: Address, server: Address) -> socket.socket | None:
    """A duplicate of this process's TCP connection from `server` to `client`, or None.
    Its blocking flag is the connection's own (hypercorn's: non-blocking), never to be
    changed through it."""
    wanted = (tuple(client)[:2], tuple(server)[:2])
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in names:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            duplicate = os.dup(int(name))
        except (OSError, ValueError):
            continue
        sock = socket.socket(fileno=duplicate)
        try:
            ends = (sock.getpeername()[:2], sock.getsockname()[:2])
            if sock.family in (socket.AF_INET, socket.AF_INET6) and ends == wanted:
                return sock
        except OSError:
            pass
        sock.close()
    return None


def abort_connection(client: Address, server: Address) -> bool:
    """Reset this process's TCP connection from `server` to `client` (their addresses as
    the ASGI scope gives them); False when there is none. The socket is hypercorn's: it is
    found among this process's descriptors and shut down through a duplicate, so that the
    send blocked on it fails at once and hypercorn closes the connection."""
    client, server = tuple(client), tuple(server)
    try:
        connections = psutil.Process().net_connections(kind="tcp")
    except psutil.Error:
        return False
    for connection in connections:
        if connection.fd < 0 or not connection.raddr:
            continue
        if connection.raddr[1] != client[1] or connection.laddr[1] != server[1]:
            continue
        try:
            duplicate = os.dup(connection.fd)
        except OSError:
            continue
        sock = socket.socket(fileno=duplicate)
        try:
            # The descriptor may have been closed and reused since it was listed.
            if sock.getpeername()[:2] != client[:2] or sock.getsockname()[:2] != server[:2]:
                continue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.shutdown(socket.SHUT_RDWR)
            return True
        except OSError:
            continue
        finally:
            sock.close()  # the duplicate only
    return False
