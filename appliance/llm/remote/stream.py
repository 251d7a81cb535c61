"""Reading the remote LLM's answers: whole bodies and streams, under the idle timeout.

Every read of a body waits at most `timeout` seconds for its next piece; a response is
closed at once, shielded, when it is done with or abandoned, so that an early close of a
stream (our client went away) closes the upstream connection too.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Final, NamedTuple

import httpx
import trio

from appliance.llm.remote.errors import (
    RemoteError,
    Scrub,
    malformed,
    timeout_error,
    transport_error,
    went_away,
)
from appliance.llm.remote.wire import (
    RemoteDelta,
    RemoteDone,
    RemoteText,
    RemoteUsage,
    SSEDecoder,
    WireUsage,
    decode_chunk,
    finish_reason_of,
    usage_of,
)

LOGGER = logging.getLogger("appliance.remote")

MAX_EVENT_BYTES: Final = 1024 * 1024
CLOSE_SECONDS: Final = 2.0


class Upstream(NamedTuple):
    """What reading an answer needs to know about the remote."""

    timeout: float
    origin: str  # scheme://host:port, for messages
    host: str
    price_per_1k: float

    def cost(self, usage: RemoteUsage) -> float:
        return usage.total_tokens / 1000 * self.price_per_1k


async def next_chunk(chunks: AsyncIterator[bytes], upstream: Upstream) -> bytes | None:
    """The next piece of a body (None at its end), within the idle timeout."""
    with trio.move_on_after(upstream.timeout):
        try:
            return await anext(chunks, None)
        except httpx.TimeoutException:
            raise timeout_error(upstream.timeout) from None
        except httpx.HTTPError as exc:
            raise transport_error(exc, upstream.origin, upstream.host, started=True) from None
    raise timeout_error(upstream.timeout)


async def read_body(
    response: httpx.Response, upstream: Upstream, limit: int, *, truncate: bool = False
) -> bytes:
    """The whole body, at most `limit` bytes (more is malformed, or cut with `truncate`)."""
    body = bytearray()
    chunks = response.aiter_bytes()
    while (chunk := await next_chunk(chunks, upstream)) is not None:
        body += chunk
        if len(body) > limit:
            if truncate:
                return bytes(body[:limit])
            raise malformed(f"a response over {limit} bytes")
    return bytes(body)


async def close_response(response: httpx.Response, chunks: AsyncIterator[bytes] | None) -> None:
    """Close a response now (a partly read one closes its connection), shielded, briefly."""
    with trio.move_on_after(CLOSE_SECONDS) as scope:
        scope.shield = True
        closer = getattr(chunks, "aclose", None)
        if closer is not None:
            await closer()
        await response.aclose()


def log_success(usage: RemoteUsage, seconds: float, *, streamed: bool) -> None:
    LOGGER.info(
        "remote LLM answered%s: %d prompt + %d completion tokens%s in %.2f s",
        " (streamed)" if streamed else "",
        usage.prompt_tokens,
        usage.completion_tokens,
        " (estimated)" if usage.estimated else "",
        seconds,
    )


def log_failure(error: RemoteError) -> None:
    # Status and code only: the message may quote upstream text.
    LOGGER.warning("remote LLM request failed: %d %s", error.status, error.code)


class RemoteStream:
    """The deltas of one streamed remote completion: `RemoteText`s, then one `RemoteDone`
    (also kept as `done`). `sent_messages` is what was sent, redacted.

    A stream that ends without `[DONE]` or a finish reason raises RemoteError 502 ("went
    away mid-stream") after the text that did arrive; a gap longer than the timeout raises
    504. `aclose` (or leaving `async with`) closes the upstream connection at once,
    shielded: call it from the caller's cleanup.
    """

    def __init__(
        self,
        upstream: Upstream,
        response: httpx.Response,
        sent: list[dict[str, str]],
        scrub: Scrub,
        begun: float,
    ) -> None:
        self.sent_messages: Final = sent
        self.done: RemoteDone | None = None
        self._upstream = upstream
        self._response = response
        self._chunks = response.aiter_bytes()
        self._scrub = scrub
        self._begun = begun
        self._decoder = SSEDecoder(MAX_EVENT_BYTES)
        self._pending: deque[RemoteDelta] = deque()
        self._text: list[str] = []
        self._finish: str | None = None
        self._wire_usage: WireUsage | None = None
        self._error: RemoteError | None = None
        self._over = False

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> RemoteDelta:
        while not self._pending:
            if self._error is not None:
                raise self._error
            if self._over:
                raise StopAsyncIteration
            try:
                self._take(await next_chunk(self._chunks, self._upstream))
            except RemoteError as error:
                log_failure(error)
                self._error = error
            if self._over or self._error is not None:
                await close_response(self._response, self._chunks)
        return self._pending.popleft()

    def _take(self, chunk: bytes | None) -> None:
        events = self._decoder.feed(chunk) if chunk is not None else self._decoder.close()
        for event in events:
            if event.data.strip() == b"[DONE]":
                self._finished()
                return
            parsed = decode_chunk(event.data, self._scrub, event.event)
            if parsed.usage is not None:
                self._wire_usage = parsed.usage
            if parsed.choices:
                choice = parsed.choices[0]
                if choice.delta.content:
                    self._text.append(choice.delta.content)
                    self._pending.append(RemoteText(choice.delta.content))
                if choice.finish_reason:
                    self._finish = choice.finish_reason
        if chunk is None:
            if self._finish is None:
                raise went_away()
            self._finished()

    def _finished(self) -> None:
        text = "".join(self._text)
        usage = usage_of(self._wire_usage, self.sent_messages, text, len(self._text))
        self.done = RemoteDone(finish_reason_of(self._finish), usage, self._upstream.cost(usage))
        self._pending.append(self.done)
        self._over = True
        log_success(usage, trio.current_time() - self._begun, streamed=True)

    async def aclose(self) -> None:
        self._over = True
        self._pending.clear()
        await close_response(self._response, self._chunks)

    async def __aenter__(self) -> RemoteStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
