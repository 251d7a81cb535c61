"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.

Fields OpenAI clients commonly send but that mean nothing here (penalties, user, ...) are
accepted and ignored; fields that would change the answer and are not supported (n > 1,
tools, logit_bias) are refused with 422 rather than silently dropped.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Final, Literal

import msgspec
import trio
from quart import Blueprint, Response, g

from appliance.http.app import Runtime, runtime
from appliance.http.bodies import parse_body
from appliance.http.errors import ApiError
from appliance.http.generation import (
    BudgetExhausted,
    Events,
    FinishReason,
    KeepAlive,
    MaxTokens,
    Seed,
    TokenUsage,
    TurnsLeftOut,
    collect,
    finish_reason,
    generate,
    keep_alive_of,
    max_tokens_for,
    resolve_model,
    sse,
    sse_error,
    sse_template,
    stream_response,
    token_usage,
)
from appliance.http.openapi_doc import (
    ErrorBody,
    document_request,
    document_response,
    errors,
    event_stream,
)
from appliance.http.remote_generation import REMOTE_PREFIX
from appliance.llm.protocol import ChatMessage, Done, Token

blueprint = Blueprint("openai", __name__, url_prefix="/v1")

MAX_STOP: Final = 4
OPENAI_DEFAULT_COMPLETION_TOKENS: Final = 16


class TextPart(msgspec.Struct):
    # Checked by the handler (422 naming the part's type); documented as what it takes.
    type: Annotated[str, msgspec.Meta(extra_json_schema={"enum": ["text"]})]
    text: str = ""


class OpenAIMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


_Stop = Annotated[str, msgspec.Meta(extra_json_schema={"minLength": 1})]


class _Sampling(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    max_tokens: MaxTokens | None = None
    # Left out: the model's default (its manifest), else the appliance's (docs/models.md).
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    stop: (
        _Stop
        | Annotated[
            list[_Stop], msgspec.Meta(extra_json_schema={"minItems": 1, "maxItems": MAX_STOP})
        ]
        | None
    ) = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    keep_alive: KeepAlive | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1
    # Not supported (422 unless empty): token ids of one model mean nothing to another.
    logit_bias: (
        Annotated[dict[str, float], msgspec.Meta(extra_json_schema={"maxProperties": 0})] | None
    ) = None
    # Accepted for compatibility; they do not change local generation.
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    """OpenAI's chat completion request; `n` must be 1, tools are not supported."""

    messages: Annotated[list[OpenAIMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    # Not supported (422 unless empty).
    tools: Annotated[list[Any], msgspec.Meta(extra_json_schema={"maxItems": 0})] | None = None


class CompletionRequest(_Sampling, kw_only=True):
    """OpenAI's completion request, for one prompt."""

    prompt: (
        str | Annotated[list[str], msgspec.Meta(extra_json_schema={"minItems": 1, "maxItems": 1})]
    )


class ChatCompletionMessage(msgspec.Struct):
    role: Literal["assistant"]
    content: str


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatCompletionMessage
    finish_reason: FinishReason


class ChatCompletion(msgspec.Struct):
    """OpenAI's chat completion, and (only when they apply) two fields of the appliance's:
    `turns_left_out` and `budget_exhausted`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: TokenUsage
    turns_left_out: TurnsLeftOut | msgspec.UnsetType = msgspec.UNSET
    budget_exhausted: BudgetExhausted | msgspec.UnsetType = msgspec.UNSET


class ChunkDelta(msgspec.Struct):
    role: Literal["assistant"] | msgspec.UnsetType = msgspec.UNSET
    content: str | msgspec.UnsetType = msgspec.UNSET


class ChunkChoice(msgspec.Struct):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None


class ChatCompletionChunk(msgspec.Struct):
    """One SSE `data:` line of a streamed chat completion (`[DONE]` ends the stream)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    # Only in the last chunk, with `stream_options: {"include_usage": true}`.
    usage: TokenUsage | msgspec.UnsetType = msgspec.UNSET
    # Only in the chunk with the finish_reason, and only when they apply.
    turns_left_out: TurnsLeftOut | msgspec.UnsetType = msgspec.UNSET
    budget_exhausted: BudgetExhausted | msgspec.UnsetType = msgspec.UNSET


class TextChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None


class TextCompletion(msgspec.Struct):
    """OpenAI's text completion; streamed, each SSE `data:` line is one without `usage`
    (`[DONE]` ends the stream). `budget_exhausted` only when a budget cut the answer."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: TokenUsage | msgspec.UnsetType = msgspec.UNSET
    budget_exhausted: BudgetExhausted | msgspec.UnsetType = msgspec.UNSET


class OpenAIModel(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: Literal["appliance", "remote"]


class ModelList(msgspec.Struct):
    """The usable models (local, and the remote one when it is on)."""

    object: Literal["list"]
    data: list[OpenAIModel]


def _json(body: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status=status, mimetype="application/json")


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if len(items) > MAX_STOP or any(not item for item in items):
        raise ApiError(
            422, "invalid_field", f"stop takes 1 to {MAX_STOP} non-empty strings", param="stop"
        )
    return items


def _text_of(message: OpenAIMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    for part in message.content:
        if part.type != "text":
            raise ApiError(
                422,
                "unsupported_content",
                f"content parts of type {part.type!r} are not supported; send text",
                param="messages",
            )
    return "".join(part.text for part in message.content)


async def _events(state: Runtime, body: _Sampling, **source: Any) -> tuple[str, Events]:
    if body.logit_bias:
        raise ApiError(
            422,
            "unsupported_field",
            "logit_bias is not supported; leave it out",
            param="logit_bias",
        )
    model = await resolve_model(state, body.model)
    requested, param = body.max_tokens, "max_tokens"
    newer = getattr(body, "max_completion_tokens", None)
    if newer is not None:
        requested, param = newer, "max_completion_tokens"
    if isinstance(body, CompletionRequest) and requested is None:
        requested = OPENAI_DEFAULT_COMPLETION_TOKENS
    events = await generate(
        state,
        model,
        max_tokens=max_tokens_for(state, requested, param),
        temperature=body.temperature,
        top_p=body.top_p,
        stop=_stop_list(body.stop),
        seed=body.seed,
        stream=body.stream,
        keep_alive=keep_alive_of(body.keep_alive),
        **source,
    )
    if body.stream:
        await events.start()
    return model, events


_GENERATION_ERRORS = errors(403, 404, 502, 504)


@blueprint.post("/chat/completions")
@document_request(ChatCompletionRequest)
@document_response(ChatCompletion)
@event_stream(
    "with `stream: true`: chunks, then `[DONE]` (or an `error` event)",
    {"message": ChatCompletionChunk, "error": ErrorBody},
    done="[DONE]",
)
@_GENERATION_ERRORS
async def chat_completions() -> Response:
    """OpenAI's chat completions (streamed or not).

    Messages that do not fit the model's context are left out, oldest first (system
    messages stay; `turns_left_out` says how many); 400 only when the last message does
    not fit with the system messages alone. An answer cut by a token budget ends with
    finish_reason `length` and `budget_exhausted`. 403 for a `remote:` model while the
    remote LLM is off; 404 for an unknown model; 502/504 from the remote LLM.
    """
    state = runtime()
    body = await parse_body(ChatCompletionRequest)
    if body.tools:
        raise ApiError(422, "unsupported_field", "tools are not supported", param="tools")
    messages = [
        ChatMessage("system" if m.role == "developer" else m.role, _text_of(m))
        for m in body.messages
    ]
    model, events = await _events(state, body, messages=messages)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not body.stream:
        text, done = await collect(events)
        return _json(
            ChatCompletion(
                id=completion_id,
                object="chat.completion",
                created=created,
                model=model,
                choices=[
                    ChatChoice(
                        index=0,
                        message=ChatCompletionMessage(role="assistant", content=text),
                        finish_reason=finish_reason(done),
                    )
                ],
                usage=token_usage(done),
                turns_left_out=done.left_out or msgspec.UNSET,
                budget_exhausted=events.budget_cut or msgspec.UNSET,
            )
        )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk_body(
        delta: ChunkDelta,
        reason: FinishReason | None,
        usage: TokenUsage | msgspec.UnsetType = msgspec.UNSET,
    ) -> ChatCompletionChunk:
        choices = (
            []
            if isinstance(usage, TokenUsage)
            else [ChunkChoice(index=0, delta=delta, finish_reason=reason)]
        )
        return ChatCompletionChunk(
            id=completion_id,
            object="chat.completion.chunk",
            created=created,
            model=model,
            choices=choices,
            usage=usage,
        )

    def last_chunk(done: Done) -> ChatCompletionChunk:
        chunk = chunk_body(ChunkDelta(), finish_reason(done))
        chunk.turns_left_out = done.left_out or msgspec.UNSET
        chunk.budget_exhausted = events.budget_cut or msgspec.UNSET
        return chunk

    token_chunk = sse_template(lambda text: chunk_body(ChunkDelta(content=text), None))
    request_id = g.request_id

    async def stream() -> AsyncGenerator[bytes, None]:
        try:
            yield sse(chunk_body(ChunkDelta(role="assistant", content=""), None))
            async for event in events:
                if isinstance(event, Token):
                    yield token_chunk(event.text)
                else:
                    yield sse(last_chunk(event))
                    if include_usage:
                        yield sse(chunk_body(ChunkDelta(), None, token_usage(event)))
            yield sse(b"[DONE]")
        except ApiError as error:
            yield sse_error(error, request_id)
        finally:
            await events.aclose()

    return stream_response(state, stream(), events)


@blueprint.post("/completions")
@document_request(CompletionRequest)
@document_response(TextCompletion)
@event_stream(
    "with `stream: true`: chunks, then `[DONE]` (or an `error` event)",
    {"message": TextCompletion, "error": ErrorBody},
    done="[DONE]",
)
@_GENERATION_ERRORS
async def completions() -> Response:
    """OpenAI's completions for one prompt (always local).

    400 for a prompt longer than the model's context; 403 for a `remote:` model while the
    remote LLM is off; 404 for an unknown model; 422 for the remote model.
    """
    state = runtime()
    body = await parse_body(CompletionRequest)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(422, "invalid_field", "prompt takes one string", param="prompt")
        prompt = prompt[0]
    model, events = await _events(state, body, prompt=prompt)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def body_of(
        text: str,
        reason: FinishReason | None,
        usage: TokenUsage | msgspec.UnsetType = msgspec.UNSET,
    ) -> TextCompletion:
        return TextCompletion(
            id=completion_id,
            object="text_completion",
            created=created,
            model=model,
            choices=[TextChoice(index=0, text=text, logprobs=None, finish_reason=reason)],
            usage=usage,
            budget_exhausted=(events.budget_cut or msgspec.UNSET) if reason else msgspec.UNSET,
        )

    if not body.stream:
        text, done = await collect(events)
        return _json(body_of(text, finish_reason(done), token_usage(done)))

    token_chunk = sse_template(lambda text: body_of(text, None))
    request_id = g.request_id

    async def stream() -> AsyncGenerator[bytes, None]:
        try:
            async for event in events:
                if isinstance(event, Token):
                    yield token_chunk(event.text)
                else:
                    yield sse(body_of("", finish_reason(event)))
            yield sse(b"[DONE]")
        except ApiError as error:
            yield sse_error(error, request_id)
        finally:
            await events.aclose()

    return stream_response(state, stream(), events)


@blueprint.get("/models")
@document_response(ModelList)
async def models() -> Response:
    """Usable models, in OpenAI's list shape."""
    state = runtime()
    records = await trio.to_thread.run_sync(state.registry.list)
    listed = [
        OpenAIModel(
            id=record.name, object="model", created=int(record.checked_at), owned_by="appliance"
        )
        for record in records
        if record.ok
    ]
    if state.remote is not None:
        listed.append(
            OpenAIModel(
                id=REMOTE_PREFIX + state.remote.model,
                object="model",
                created=int(time.time()),
                owned_by="remote",
            )
        )
    return _json(ModelList(object="list", data=listed))
