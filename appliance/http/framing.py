"""Answers given below the app, in the API's JSON error shape: requests whose body framing
is ambiguous, and the errors hypercorn makes itself (a malformed request line, headers
over its limit, an app that never answered), which it sends with an empty body."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any, Final

import h11
import msgspec
import trio
from hypercorn.protocol.events import Body, EndBody, Response
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream

from appliance.http.errors import error_body

LOGGER = logging.getLogger("appliance.http")

REQUEST_ID_HEADER: Final = b"x-request-id"
# How long a refused request's body is read before the answer (see RejectAmbiguousFraming).
DRAIN_SECONDS: Final = 5.0
# hypercorn's status for each protocol error (h11's hint), and what the client should do.
_PROTOCOL_ERRORS: Final = {
    400: (
        "malformed_request",
        "the request is not valid HTTP/1.1 (its request line, a header or the body framing); "
        "the connection is closed",
    ),
    404: ("unknown_server_name", "no site of that name is served here"),
    431: (
        "headers_too_large",
        "the request's headers are over {limit} bytes in all; send fewer or shorter headers",
    ),
    500: ("internal_error", "internal error; the log has details"),
    501: (
        "unsupported_transfer_encoding",
        "only Transfer-Encoding: chunked is supported; or send the body with Content-Length",
    ),
}


def _request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def protocol_error(status: int, header_limit: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and JSON body of an error hypercorn answers itself; the connection closes."""
    code, message = _PROTOCOL_ERRORS.get(
        status, ("protocol_error", f"the request cannot be served (HTTP {status})")
    )
    request_id = _request_id()
    body = msgspec.json.encode(
        error_body(status, code, message.format(limit=header_limit), request_id=request_id)
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (REQUEST_ID_HEADER, request_id.encode()),
    ]
    return headers, body


async def _h11_error_response(self: H11Protocol, status_code: int) -> None:
    headers, body = protocol_error(status_code, self.config.h11_max_incomplete_size)
    headers += self.config.response_headers("h11")
    await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


async def _stream_error_response(self: HTTPStream, status_code: int) -> None:
    headers, body = protocol_error(status_code, self.config.h11_max_incomplete_size)
    await self.send(Response(stream_id=self.stream_id, headers=headers, status_code=status_code))
    await self.send(Body(stream_id=self.stream_id, data=body))
    await self.send(EndBody(stream_id=self.stream_id))
    self.state = ASGIHTTPState.CLOSED
    await self.config.log.access(
        self.scope, {"status": status_code, "headers": []}, time.time() - self.start_time
    )


def use_json_protocol_errors() -> None:
    """Make hypercorn's own error answers JSON. hypercorn has no hook for them: its two
    `_send_error_response` methods (HTTP/1.1 parsing errors; a request the app left
    unanswered) are replaced, with the same events plus a body. Idempotent."""
    H11Protocol._send_error_response = _h11_error_response  # type: ignore[method-assign]
    HTTPStream._send_error_response = _stream_error_response  # type: ignore[method-assign]


async def _drain(receive: Any, limit: int) -> None:
    taken = 0
    with trio.move_on_after(DRAIN_SECONDS):
        while taken <= limit:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return
            taken += len(message.get("body", b""))


def ambiguous_framing(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Content-Length together with Transfer-Encoding: two answers to where the body ends,
    the shape of request smuggling (RFC 9112 section 6.3 says reject, and close)."""
    names = {name.lower() for name, _ in headers}
    return b"content-length" in names and b"transfer-encoding" in names


class RejectAmbiguousFraming:
    """ASGI middleware: 400 and close for a request framed both ways. Nothing after it on
    the connection is taken as another request: the answer closes the connection."""

    def __init__(self, app: Any, body_limit: int) -> None:
        self.app = app
        self.body_limit = body_limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not ambiguous_framing(scope["headers"]):
            await self.app(scope, receive, send)
            return
        # Let hypercorn finish reading this request first (bounded): answering while it
        # still parses the rest of the bytes races its close of the connection against
        # the answer, and the client may get nothing at all.
        await _drain(receive, self.body_limit)
        request_id = _request_id()
        LOGGER.warning(
            "refused %s %r: both Content-Length and Transfer-Encoding (request smuggling shape)",
            scope["method"],
            scope["path"][:200],
            extra={"request_id": request_id, "status": 400},
        )
        body = msgspec.json.encode(
            error_body(
                400,
                "ambiguous_framing",
                "the request has both Content-Length and Transfer-Encoding; send one of them "
                "(the connection is closed)",
                request_id=request_id,
            )
        )
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    (REQUEST_ID_HEADER, request_id.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
