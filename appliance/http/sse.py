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
    body = StreamBody(
        chunks,
        events,
        stall_seconds=state.settings.stream_stall_seconds,
        peer=(tuple(client), tuple(server)) if client and server else None,
    )
    current_app.add_background_task(body.watch)
    g.stream_body = body
    return Response(body, mimetype="text/event-stream", headers={"Cache-Control": "no-store"})


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    body = data if isinstance(data, bytes) else _JSON.encode(data)
    return head + b"data: " + body + b"\n\n"


def sse_template(
    body_with: Callable[[str], Any], event: str | None = None
) -> Callable[[str], bytes]:
    """`lambda text: sse(body_with(text), event)`, for a stream whose events differ in one
    string only (a token's text): the rest is encoded once and each text, JSON-escaped on
    its own, is spliced in. The bytes are the same as sse's."""
    head, found, tail = sse(body_with(_MARKER), event).partition(_MARKER_JSON)
    if not found or _MARKER_JSON in tail:
        raise ValueError("the event body must hold the text exactly once")
    encode = _JSON.encode

    def event_of(text: str) -> bytes:
        return head + encode(text) + tail

    return event_of


def sse_error(error: ApiError, request_id: str) -> bytes:
    body = error_body(error.status, error.code, error.message, error.param, request_id)
    return sse(body, event="error")
