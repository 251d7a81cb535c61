"""How the remote LLM's failures become `RemoteError`s that say what went wrong and what
to do. Upstream text passes through a `Scrub` (the API key removed, redacted, one line,
trimmed) before it is put into an error; the key itself is never part of a message.
"""

from __future__ import annotations

import contextlib
import email.utils
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final

import httpx
import msgspec

from appliance.outbound import exception_chain

# Upstream text quoted in an error (a 400's message) is cut to this many characters.
UPSTREAM_MESSAGE_CHARS: Final = 200

Scrub = Callable[[str], str]


class RemoteError(Exception):
    """The remote LLM failed; `status` and `code` are what our API answers with.

    `retry_after` is the upstream's Retry-After (429), passed through to our client.
    """

    def __init__(self, status: int, code: str, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": self.retry_after} if self.retry_after else {}


def malformed(what: str) -> RemoteError:
    return RemoteError(
        502,
        "remote_malformed",
        f"the remote LLM sent {what} that this appliance cannot read; "
        "check that APPLIANCE_REMOTE_LLM_URL is an OpenAI-compatible /v1 endpoint",
    )


def message_of(error: Any) -> str:
    """The human part of an error body: OpenAI's {"error": {"message"}}, {"error": "..."},
    {"message": ...} or FastAPI's {"detail": ...}."""
    for _ in range(3):
        if isinstance(error, dict):
            for name in ("error", "message", "detail"):
                if name in error:
                    error = error[name]
                    break
            else:
                break
    if isinstance(error, str):
        return error
    return msgspec.json.encode(error).decode() if error is not None else ""


def timeout_error(timeout: float) -> RemoteError:
    return RemoteError(
        504,
        "remote_timeout",
        f"the remote LLM did not answer within {timeout:g} s (APPLIANCE_REMOTE_TIMEOUT)",
    )


def _reason(exc: BaseException, host: str) -> str | None:
    for link in exception_chain(exc):
        if isinstance(link, ssl.SSLCertVerificationError):
            return f"its TLS certificate was not accepted ({link.verify_message})"
        if isinstance(link, ssl.SSLError):
            return "the TLS handshake failed (is it really https?)"
        if isinstance(link, socket.gaierror):
            return f"the host name {host} does not resolve"
        if isinstance(link, ConnectionRefusedError):
            return "the connection was refused (is the server running?)"
        if isinstance(link, ConnectionResetError):
            return "the connection was reset"
    return None


def transport_error(exc: httpx.HTTPError, origin: str, host: str, *, started: bool) -> RemoteError:
    """A transport failure: before the response (cannot be reached) or in its body (went
    away mid-stream). Timeouts are the caller's: they become `timeout_error`."""
    if isinstance(exc, httpx.DecodingError):
        return malformed("a body with a broken content encoding")
    reason = _reason(exc, host)
    if started:
        return went_away(reason or "the connection closed before the answer was complete")
    if reason is None and isinstance(exc, httpx.RemoteProtocolError):
        reason = "it closed the connection without an HTTP answer"
    return RemoteError(
        502,
        "remote_unreachable",
        f"the remote LLM at {origin} cannot be reached: {reason or type(exc).__name__}",
    )


def went_away(reason: str = "the answer ended before it was complete") -> RemoteError:
    return RemoteError(502, "remote_went_away", f"the remote LLM went away mid-stream ({reason})")


def status_error(
    status: int, body: bytes, headers: httpx.Headers, model: str, scrub: Scrub
) -> RemoteError:
    """An upstream answer other than 2xx, as what our API should answer."""
    try:
        detail = scrub(message_of(msgspec.json.decode(body))) if body else ""
    except msgspec.DecodeError:
        detail = scrub(body.decode("utf-8", "replace"))
    said = f": {detail}" if detail else ""
    if status in (401, 403):
        return RemoteError(
            502,
            "remote_auth_failed",
            f"the remote LLM refused the appliance's credentials (HTTP {status}); "
            "check APPLIANCE_REMOTE_LLM_KEY_FILE",
        )
    if status == 429:
        retry_after = _retry_after(headers.get("retry-after", ""))
        when = f"retry after {retry_after}" if retry_after else "retry later"
        if retry_after and retry_after.isdigit():
            when += " s"
        return RemoteError(
            429,
            "remote_rate_limited",
            f"the remote LLM is rate-limiting this appliance{said}; {when}",
            retry_after,
        )
    if status == 404:
        return RemoteError(
            502,
            "remote_not_found",
            f"the remote LLM does not know this endpoint or model {model!r} (HTTP 404){said}; "
            "check APPLIANCE_REMOTE_LLM_URL and APPLIANCE_REMOTE_LLM_MODEL",
        )
    if 300 <= status < 400:
        return RemoteError(
            502,
            "remote_redirect",
            f"the remote LLM answered with a redirect (HTTP {status}); set "
            "APPLIANCE_REMOTE_LLM_URL to the address it redirects to",
        )
    if 400 <= status < 500:
        return RemoteError(
            502, "remote_rejected", f"the remote LLM rejected the request (HTTP {status}){said}"
        )
    return RemoteError(502, "remote_failed", f"the remote LLM failed (HTTP {status}){said}")


def _retry_after(value: str) -> str | None:
    """A Retry-After worth passing on: delay-seconds or an HTTP-date, else None."""
    value = value.strip()
    if value.isdigit() and len(value) <= 9:
        return value
    if len(value) <= 64:
        with contextlib.suppress(TypeError, ValueError, IndexError):
            email.utils.parsedate_to_datetime(value)
            return value
    return None


def scrubber(api_key: str, redact: Callable[[str], str]) -> Scrub:
    """Upstream text made fit for an error: the key removed, redacted, one line, trimmed."""

    def scrub(text: str) -> str:
        text = " ".join(text.replace(api_key, "[SECRET]").split())
        text = redact(text[: UPSTREAM_MESSAGE_CHARS * 4])
        if len(text) > UPSTREAM_MESSAGE_CHARS:
            text = text[: UPSTREAM_MESSAGE_CHARS - 1] + "…"
        return text

    return scrub
