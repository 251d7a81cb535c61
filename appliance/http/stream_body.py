"""The body of a streamed (SSE) answer, and what happens to a client that stops reading.

Hypercorn writes each chunk with a shielded send that waits for room in the socket's
buffer. A client that stops reading (its receive window closed) holds the response's task
in that send for as long as it keeps the connection open: beyond any cancel scope
(Quart's RESPONSE_TIMEOUT included), and with it the generation's slot, its budget
reservation and the key's stream count. So a watch task runs beside each body: when one
chunk has waited APPLIANCE_STREAM_STALL_SECONDS for the client, it ends the generation
(which frees all three) and aborts the connection, which is what ends the blocked send.
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

LOGGER = logging.getLogger("appliance.http")

# SO_LINGER on, 0 seconds: closing sends a reset and drops what the client never took.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)

Address = tuple[Any, ...]


class Closable(Protocol):
    async def aclose(self) -> None: ...


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
        "_events",
        "_handed_at",
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
        try:
            return await self._chunks.__anext__()
        finally:
            # Whatever comes back (a chunk, the end), the server sends it next.
            self._handed_at = trio.current_time()
            self._with_client = True

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
