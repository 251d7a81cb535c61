"""How a search provider's failures become `SearchError`s naming the provider: 504 when it
does not answer within APPLIANCE_SEARCH_TIMEOUT, 502 when it cannot be reached, refuses,
or answers what cannot be read (garbage, or more than a search answer can be).
"""

from __future__ import annotations

import socket
import ssl
from typing import Final

import httpx

from appliance.outbound import exception_chain

TIMEOUT_CODE: Final = "search_timeout"


class SearchError(Exception):
    """A search failed; `status` and `code` are what our API answers with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def timeout_error(provider: str, timeout: float) -> SearchError:
    return SearchError(
        504,
        TIMEOUT_CODE,
        f"the search provider {provider} did not answer within {timeout:g} s "
        "(APPLIANCE_SEARCH_TIMEOUT)",
    )


def malformed(provider: str, what: str) -> SearchError:
    return SearchError(
        502,
        "search_malformed",
        f"the search provider {provider} answered {what}, which is not a search answer; "
        "check APPLIANCE_SEARCH_URL and APPLIANCE_SEARCH_PROVIDER",
    )


def too_large(provider: str, limit: int) -> SearchError:
    return SearchError(
        502,
        "search_malformed",
        f"the search provider {provider} answered more than {limit // 1024} KiB; a search "
        "answer is far smaller, so it was refused unread",
    )


def _reason(exc: BaseException, host: str) -> str:
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
    if isinstance(exc, httpx.RemoteProtocolError):
        return "it closed the connection without a complete HTTP answer"
    return type(exc).__name__


def transport_error(provider: str, exc: httpx.HTTPError, host: str) -> SearchError:
    if isinstance(exc, httpx.DecodingError):
        return malformed(provider, "a body with a broken content encoding")
    return SearchError(
        502,
        "search_unreachable",
        f"the search provider {provider} cannot be reached: {_reason(exc, host)}",
    )


def status_error(provider: str, status: int, hint: str = "") -> SearchError:
    """An answer other than 2xx. `hint` is the provider's own advice for this status."""
    if 300 <= status < 400:
        detail = "a redirect, which is not followed; set APPLIANCE_SEARCH_URL to its target"
    elif status == 429:
        detail = "it is rate-limiting this appliance; retry later"
    elif status in (401, 403):
        detail = hint or "it refused the request; check APPLIANCE_SEARCH_API_KEY"
    else:
        detail = hint or "it failed"
    return SearchError(
        502, "search_failed", f"the search provider {provider} answered HTTP {status}: {detail}"
    )
