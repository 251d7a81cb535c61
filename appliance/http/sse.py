"""Server-sent events: the framing of a streamed answer and the response that carries it.

A stream's chunks go through `StreamBody`, which ends a stream whose client stopped
reading and closes the generation however the response ends.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any, Final

import msgspec
from quart import Response, current_app, g, request

from appliance.http.context import Runtime
from appliance.http.errors import ApiError, error_body
from appliance.http.generation import Events
from appliance.http.proxies import PEER
from appliance.http.stream_body import StreamBody

_JSON = msgspec.json.Encoder()
# Stands for the text in an SSE template; no field of an event body holds NUL characters.
_MARKER: Final = "\x00text\x00"
_MARKER_JSON: Final = _JSON.encode(_MARKER)


def stream_response(
    state: Runtime, chunks: AsyncGenerator[bytes, None], events: Events
) -> Response:
    """The SSE response of a generation; a watch beside it ends the stream when its client
    stops reading (APPLIANCE_STREAM_STALL_SECONDS), and the request's access line waits
    for the body's end (`g.stream_body`), so that its duration is the stream's."""
    scope: dict[str, Any] = request.scope  # type: ignore[assignment]
    # The connection's own ends (behind a trusted proxy "client" is the one behind it).
    client, server = scope.get(PEER) or scope.get("client"), scope.get("server")
    # The worker may write to the connection only where the bytes on it are the body's
    # own, in chunked framing: plain HTTP/1.1 (not TLS, not HTTP/2 or 1.0).
    plain = scope.get("scheme") == "http" and scope.get("http_version") == "1.1"
    body = StreamBody(
        chunks,
        events,
        stall_seconds=state.settings.stream_stall_seconds,
        peer=(tuple(client), tuple(server)) if client and server else None,
        handoff=events.handoff if plain else None,
    )
    current_app.add_background_task(body.watch)
    g.stream_body = body
    return Response(body, mimetype="text/event-stream", headers={"Cache-Control": "no-store"})


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    body = data if isinstance(data, bytes) else _JSON.encode(data)
    return head + b"data: " + body + b"\n\n"


class SseTemplate:
    """`lambda text: sse(body_with(text), event)`, for a stream whose events differ in one
    string only (a token's text): the rest is encoded once (`head`, `tail`) and each text,
    JSON-escaped on its own, is spliced in. The bytes are the same as sse's."""

    __slots__ = ("_encode", "head", "tail")

    def __init__(self, body_with: Callable[[str], Any], event: str | None = None) -> None:
        head, found, tail = sse(body_with(_MARKER), event).partition(_MARKER_JSON)
        if not found or _MARKER_JSON in tail:
            raise ValueError("the event body must hold the text exactly once")
        self.head, self.tail = head, tail
        self._encode = _JSON.encode

    def __call__(self, text: str) -> bytes:
        return self.head + self._encode(text) + self.tail

    def hand_over(self, events: Events) -> None:
        """Let the worker write the stream's token events itself, where it can
        (appliance.llm.handoff): for a stream whose every token event is this template's."""
        if events.handoff is not None:
            events.handoff.offer(self.head, self.tail)


def sse_error(error: ApiError, request_id: str) -> bytes:
    body = error_body(error.status, error.code, error.message, error.param, request_id)
    return sse(body, event="error")
