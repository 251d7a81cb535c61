"""What the chat and OpenAI endpoints share: model choice, limits, deadlines, errors, SSE."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any, Final

import msgspec
import trio

from appliance.http.app import Runtime
from appliance.http.errors import ApiError, error_body
from appliance.llm.engine import (
    RETRY_AFTER_SECONDS,
    DeadlineExceeded,
    InferenceError,
    QueueFull,
    WorkerCrashed,
)
from appliance.llm.protocol import ChatMessage, Done, Token
from appliance.llm.registry import InvalidModelName, ModelUnavailable, RegistryError, UnknownModel

_JSON = msgspec.json.Encoder()
# Stands for the text in an SSE template; no field of an event body holds NUL characters.
_MARKER: Final = "\x00text\x00"
_MARKER_JSON: Final = _JSON.encode(_MARKER)


async def resolve_model(state: Runtime, requested: str | None) -> str:
    """The usable model a request names, or the default one; 404/503 otherwise."""
    registry = state.registry
    try:
        if requested:
            record = await trio.to_thread.run_sync(registry.usable, requested)
            return record.name
        name = await trio.to_thread.run_sync(
            registry.default_name, state.settings.default_model or None
        )
    except (UnknownModel, InvalidModelName) as exc:
        raise ApiError(404, "model_not_found", str(exc), param="model") from None
    except ModelUnavailable as exc:
        raise ApiError(503, "model_unavailable", str(exc), param="model") from None
    except RegistryError as exc:
        raise ApiError(503, "model_unavailable", str(exc), param="model") from None
    if name is None:
        raise ApiError(
            503,
            "no_model",
            "no usable model is installed; import one with: appliance models import PATH",
            param="model",
        )
    return name


def max_tokens_for(state: Runtime, requested: int | None, param: str = "max_tokens") -> int:
    settings = state.settings
    if requested is None:
        return settings.default_max_tokens
    if requested < 1:
        raise ApiError(422, "invalid_field", f"{param} must be 1 or more", param=param)
    if requested > settings.max_tokens_limit:
        raise ApiError(
            422,
            "invalid_field",
            f"{param} is {requested}; the most this appliance allows is "
            f"{settings.max_tokens_limit} (APPLIANCE_MAX_TOKENS)",
            param=param,
        )
    return requested


def as_api_error(exc: InferenceError) -> ApiError:
    retry = isinstance(exc, QueueFull | WorkerCrashed)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if retry else {}
    return ApiError(exc.status, exc.code, str(exc), headers=headers)


class Events:
    """The engine's events for one request, under its deadline; failures become ApiError.

    An async iterator over the engine's generator rather than another generator around
    it: one layer less on every token. Close it (`aclose`) when done with it early.
    """

    __slots__ = ("_events", "_first", "_timeout")

    def __init__(self, events: AsyncGenerator[Token | Done, None], timeout: float) -> None:
        self._events = events
        self._timeout = timeout
        self._first: Token | Done | None = None

    def __aiter__(self) -> Events:
        return self

    async def __anext__(self) -> Token | Done:
        first = self._first
        if first is not None:
            self._first = None
            return first
        try:
            return await self._events.__anext__()
        except DeadlineExceeded as exc:
            raise as_api_error(
                DeadlineExceeded(f"{exc} ({self._timeout:.0f} s, APPLIANCE_REQUEST_TIMEOUT)")
            ) from None
        except InferenceError as exc:
            raise as_api_error(exc) from None

    async def start(self) -> None:
        """Wait for the first event before a response starts, so that a full queue, an
        unknown model or a prompt too long still get their own status code (429, 404,
        400) rather than an error inside a 200 stream."""
        self._first = await self.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()


def generate(
    state: Runtime,
    model: str,
    *,
    messages: list[ChatMessage] | None = None,
    prompt: str | None = None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: list[str] | None = None,
    seed: int | None = None,
) -> Events:
    """The engine's events under the request deadline; failures become ApiError."""
    timeout = state.settings.request_timeout
    events = state.engine.generate(
        model,
        deadline=trio.current_time() + timeout,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        seed=seed,
    )
    return Events(events, timeout)


async def collect(events: Events) -> tuple[str, Done]:
    parts: list[str] = []
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, Token):
                parts.append(event.text)
            else:
                return "".join(parts), event
    raise ApiError(503, "worker_crashed", "model worker crashed; retry")


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


def finish_reason(done: Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"
