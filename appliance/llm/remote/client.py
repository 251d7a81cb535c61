"""Forwarding chat completions to a remote OpenAI-compatible server (REMOTE_LLM_ENABLED).

`RemoteLLM` is a supervised service (name "remote", not critical) that owns one
`httpx.AsyncClient` for as long as it runs; creating the client opens no connection, so
nothing leaves the box until `complete` or `stream` is called. Every message is passed
through the caller's `redact` before it is sent, and what was sent is kept on the result
(`sent_messages`). Failures are `RemoteError`s carrying the status our API answers with:
504 when the remote does not answer within `timeout` (connect and first byte, then each
gap between stream chunks), 502 when it cannot be reached, breaks off or refuses, 429 with
its Retry-After when it rate-limits. The API key is never part of a message or a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
import msgspec
import trio

from appliance import __version__
from appliance.llm.remote.config import (
    DEFAULT_TIMEOUT_SECONDS,
    RemoteConfig,
    RemoteConfigError,
    load_api_key,
)
from appliance.llm.remote.errors import (
    RemoteError,
    Scrub,
    malformed,
    scrubber,
    status_error,
    timeout_error,
    transport_error,
)
from appliance.llm.remote.stream import (
    RemoteStream,
    Upstream,
    close_response,
    log_failure,
    log_success,
    read_body,
)
from appliance.llm.remote.wire import (
    RemoteDelta,
    RemoteDone,
    RemoteText,
    RemoteUsage,
    decode_completion,
    estimate_prompt_tokens,
    finish_reason_of,
    usage_of,
)
from appliance.outbound import HttpClientService, loopback
from appliance.privacy.redaction import INLINE_REDACT_CHARS

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "RemoteConfig",
    "RemoteConfigError",
    "RemoteDelta",
    "RemoteDone",
    "RemoteError",
    "RemoteLLM",
    "RemoteResult",
    "RemoteStream",
    "RemoteText",
    "RemoteUsage",
    "estimate_prompt_tokens",
    "load_api_key",
]

LOGGER = logging.getLogger("appliance.remote")

MAX_RESPONSE_BYTES: Final = 8 * 1024 * 1024
MAX_ERROR_BODY_BYTES: Final = 16 * 1024
# The OpenAI parameters that are forwarded; anything else is a caller's mistake.
PARAMS: Final = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "response_format",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
    }
)

Redact = Callable[[str], str]


class RemoteResult(msgspec.Struct, frozen=True, kw_only=True):
    """One non-streamed remote completion and what was sent for it (already redacted)."""

    text: str
    finish_reason: str
    usage: RemoteUsage
    cost: float
    model: str
    sent_messages: list[dict[str, str]]


class RemoteLLM(HttpClientService):
    """The client of the remote LLM. Run it as a service (`await nursery.start(remote.run)`
    returns it once ready) or use it as an async context manager; either way it owns its
    `httpx.AsyncClient` and closes it when it ends."""

    name = "remote"
    critical = False

    def __init__(self, config: RemoteConfig) -> None:
        self.config: Final = config
        self._endpoint: Final = config.url.rstrip("/") + "/chat/completions"
        parts = urlsplit(config.url)
        self._upstream: Final = Upstream(
            config.timeout,
            f"{parts.scheme}://{parts.netloc}",
            parts.hostname or "",
            config.price_per_1k,
        )
        self._client: httpx.AsyncClient | None = None

    @property
    def model(self) -> str:
        """The model name that clients use for the remote LLM (and that is sent upstream)."""
        return self.config.model

    async def __aenter__(self) -> RemoteLLM:
        if self._client is not None:
            raise RuntimeError("this RemoteLLM is already open")
        # No proxies or .netrc from the environment: what leaves the box is what is configured.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.config.timeout),
            trust_env=False,
            follow_redirects=False,
            headers={"User-Agent": f"appliance/{__version__}"},
        )
        host = self._upstream.host
        if urlsplit(self.config.url).scheme == "http" and not loopback(host):
            LOGGER.warning(
                "APPLIANCE_REMOTE_LLM_URL uses plain http to %s: the API key and the (redacted) "
                "messages cross the network unencrypted",
                host,
            )
        return self

    def cost(self, usage: RemoteUsage) -> float:
        """What `usage` costs at APPLIANCE_REMOTE_PRICE_PER_1K_TOKENS."""
        return self._upstream.cost(usage)

    async def complete(
        self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any], *, redact: Redact
    ) -> RemoteResult:
        """One completion, not streamed. `redact` (e.g. `lambda t: redactor.redact(t).text`)
        is applied to every message content before it leaves the box."""
        sent = await _redacted(messages, redact)
        scrub = scrubber(self.config.api_key, redact)
        begun = trio.current_time()
        response = await self._send(self._body(sent, params, stream=False), scrub, stream=False)
        try:
            raw = await read_body(response, self._upstream, MAX_RESPONSE_BYTES)
            text, finish, wire_usage = decode_completion(raw)
        except RemoteError as error:
            log_failure(error)
            raise
        finally:
            await close_response(response, None)
        usage = usage_of(wire_usage, sent, text, 0)
        result = RemoteResult(
            text=text,
            finish_reason=finish_reason_of(finish),
            usage=usage,
            cost=self.cost(usage),
            model=self.config.model,
            sent_messages=sent,
        )
        log_success(usage, trio.current_time() - begun, streamed=False)
        return result

    async def stream(
        self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any], *, redact: Redact
    ) -> RemoteStream:
        """A streamed completion, returned once the remote has accepted it (so that a
        refusal is raised here, before the caller starts its own response). Iterate the
        stream for `RemoteText`s and a last `RemoteDone`; close it (`aclose` or `async
        with`) when done early, which closes the upstream connection."""
        sent = await _redacted(messages, redact)
        scrub = scrubber(self.config.api_key, redact)
        begun = trio.current_time()
        response = await self._send(self._body(sent, params, stream=True), scrub, stream=True)
        try:
            kind = response.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                wrong = malformed(f"{kind[:64] or 'an untyped body'} for a streamed request")
                log_failure(wrong)
                raise wrong
            return RemoteStream(self._upstream, response, sent, scrub, begun)
        except BaseException:
            await close_response(response, None)
            raise

    def _body(
        self, sent: list[dict[str, str]], params: Mapping[str, Any], *, stream: bool
    ) -> bytes:
        unknown = sorted(set(params) - PARAMS)
        if unknown:
            raise ValueError(
                f"remote LLM parameters {', '.join(unknown)} are not forwarded; "
                f"pass only: {', '.join(sorted(PARAMS))}"
            )
        body: dict[str, Any] = {"model": self.config.model, "messages": sent}
        body.update((k, v) for k, v in params.items() if v is not None and v != [])
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return msgspec.json.encode(body)

    async def _send(self, body: bytes, scrub: Scrub, *, stream: bool) -> httpx.Response:
        """The upstream response once its status line and headers are in, or RemoteError."""
        client = self._client
        if client is None:
            raise RemoteError(
                503,
                "remote_unavailable",
                "the remote LLM client is not running (service 'remote' is starting or "
                "restarting); retry shortly",
            )
        request = client.build_request(
            "POST",
            self._endpoint,
            content=body,
            headers={
                "Authorization": f"Bearer {self.config.api_key}",
                "Content-Type": "application/json",
                "Accept": "text/event-stream" if stream else "application/json",
            },
        )
        response: httpx.Response | None = None
        try:
            with trio.move_on_after(self.config.timeout):
                try:
                    response = await client.send(request, stream=True)
                except httpx.TimeoutException:
                    raise timeout_error(self.config.timeout) from None
                except httpx.HTTPError as exc:
                    raise transport_error(
                        exc, self._upstream.origin, self._upstream.host, started=False
                    ) from None
            if response is None:
                raise timeout_error(self.config.timeout)
        except RemoteError as failure:
            log_failure(failure)
            raise
        if response.is_success:
            return response
        try:
            raw = await read_body(response, self._upstream, MAX_ERROR_BODY_BYTES, truncate=True)
        except RemoteError:
            raw = b""
        finally:
            await close_response(response, None)
        refusal = status_error(response.status_code, raw, response.headers, self.model, scrub)
        log_failure(refusal)
        raise refusal


async def _redacted(messages: Sequence[Mapping[str, str]], redact: Redact) -> list[dict[str, str]]:
    if not messages:
        raise ValueError("messages is empty; send at least one message")
    roles: list[str] = []
    contents: list[str] = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"messages[{index}] needs a string 'role' and 'content'")
        roles.append(role)
        contents.append(content)
    if sum(map(len, contents)) <= INLINE_REDACT_CHARS:
        redacted = [redact(content) for content in contents]
    else:
        redacted = await trio.to_thread.run_sync(lambda: [redact(c) for c in contents])
    return [{"role": r, "content": c} for r, c in zip(roles, redacted, strict=True)]
