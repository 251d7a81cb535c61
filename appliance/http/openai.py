"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.

Requests are strict, as OpenAI's are: an unknown field, a value out of range or a field
that cannot apply here is a 400 `invalid_request_error` naming it (`param`). Structured
output, tools, log probabilities, logit bias and penalties run in the model's own
samplers (appliance.http.openai_plan says how each request maps onto them).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any, Final

import msgspec
import trio
from quart import Blueprint, Response, g

from appliance.http.bodies import parse_body
from appliance.http.context import Runtime, runtime
from appliance.http.errors import ApiError, error_response
from appliance.http.generation import (
    Events,
    TokenUsage,
    generate,
    keep_alive_of,
    max_tokens_for,
    resolve_model,
    token_usage,
)
from appliance.http.openai_plan import (
    ChatPlan,
    chat_plan,
    completion_logprobs,
    refuse,
    sampling_options,
    token_logprobs,
)
from appliance.http.openai_wire import (
    MAX_STOP,
    Capability,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatFinishReason,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    CompletionRequest,
    FinishReason,
    FunctionCall,
    FunctionDelta,
    ModelList,
    OpenAIModel,
    SamplingFields,
    TextChoice,
    TextCompletion,
    ToolCall,
    ToolCallDelta,
)
from appliance.http.openapi_doc import (
    ErrorBody,
    document_request,
    document_response,
    errors,
    event_stream,
)
from appliance.http.remote_generation import REMOTE_PREFIX
from appliance.http.responses import json_response
from appliance.http.sse import SseTemplate, sse, sse_error, stream_response
from appliance.http.web_search_tool import web_search_round
from appliance.llm.protocol import Done, Sampling, SamplingOptions, Token, TokenLogprob
from appliance.llm.tools import ReplyStream, read_answer

blueprint = Blueprint("openai", __name__, url_prefix="/v1")

OPENAI_DEFAULT_COMPLETION_TOKENS: Final = 16
# A streamed call's arguments go out in pieces of this many characters.
ARGUMENT_PIECE: Final = 24
LOCAL_CAPABILITIES: Final[list[Capability]] = [
    "chat",
    "completions",
    "embeddings",
    "tools",
    "structured_output",
]
REMOTE_CAPABILITIES: Final[list[Capability]] = ["chat", "structured_output"]


def strict_errors(area: Blueprint) -> None:
    """On /v1 a request the server refuses for its content is a 400, as OpenAI's are
    (`openai.BadRequestError`), never a 422."""

    @area.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> tuple[Response, int, dict[str, str]]:
        status = 400 if error.status == 422 else error.status
        response, status = error_response(status, error.code, error.message, param=error.param)
        return response, status, error.headers


strict_errors(blueprint)


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if len(items) > MAX_STOP or any(not item for item in items):
        raise ApiError(
            400, "invalid_field", f"stop takes 1 to {MAX_STOP} non-empty strings", param="stop"
        )
    return items


async def _events(
    state: Runtime,
    body: SamplingFields,
    model: str,
    options: SamplingOptions,
    *,
    remote_params: dict[str, Any] | None = None,
    **source: Any,
) -> Events:
    requested, param = body.max_tokens, "max_tokens"
    newer = getattr(body, "max_completion_tokens", None)
    if newer is not None:
        requested, param = newer, "max_completion_tokens"
    if isinstance(body, CompletionRequest) and requested is None:
        requested = OPENAI_DEFAULT_COMPLETION_TOKENS
    events = await generate(
        state,
        model,
        sampling=Sampling(
            max_tokens=max_tokens_for(state, requested, param),
            # Left out: the model's default (its manifest), else the appliance's.
            temperature=body.temperature,
            top_p=body.top_p,
            stop=_stop_list(body.stop),
            seed=body.seed,
            options=options,
        ),
        stream=bool(body.stream),
        keep_alive=keep_alive_of(body.keep_alive),
        remote_params=remote_params,
        **source,
    )
    if body.stream:
        await events.start()
    return events


async def _collect(events: Events) -> tuple[str, Done, list[TokenLogprob]]:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, Token):
                parts.append(event.text)
                logprobs += event.logprobs
            else:
                return "".join(parts), event, logprobs
    raise ApiError(503, "worker_crashed", "model worker crashed; retry")


def _finish(done: Done) -> FinishReason:
    return "length" if done.finish_reason == "length" else "stop"


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


class _Answer:
    """A tool-format answer read into OpenAI's message: a reply or calls."""

    def __init__(self, plan: ChatPlan, text: str, done: Done) -> None:
        answer = read_answer(text, json_reply=plan.json_reply)
        self.content = answer.content
        self.calls = [
            ToolCall(f"call_{uuid.uuid4().hex[:24]}", "function", FunctionCall(name, arguments))
            for name, arguments in answer.calls
        ]
        self.finish: ChatFinishReason = _finish(done)
        if self.calls and self.finish == "stop":
            self.finish = "tool_calls"


_GENERATION_ERRORS = errors(400, 403, 404, 502, 504)


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
    """OpenAI's chat completions (streamed or not), with structured output
    (`response_format`), tools, log probabilities, logit bias and penalties.

    Messages that do not fit the model's context are left out, oldest first (system
    messages stay; `turns_left_out` says how many); 400 only when the last message does
    not fit with the system messages alone. An answer cut by a token budget ends with
    finish_reason `length` and `budget_exhausted`. 400 for a field that is unknown, out of
    range or cannot apply (`param` names it); 403 for a `remote:` model while the remote
    LLM is off; 404 for an unknown model; 502/504 from the remote LLM. `user`,
    `metadata`, `store` and `service_tier` are accepted and ignored.

    A tool named `web_search` is the server's own: when the model calls it, the appliance
    searches the web and asks the model again with the results (docs/search.md); 403
    while SEARCH_ENABLED=false or for a key that may not search.
    """
    state = runtime()
    body = await parse_body(ChatCompletionRequest)
    model = await resolve_model(state, body.model)

    def plan_of(request: ChatCompletionRequest) -> ChatPlan:
        return chat_plan(request, remote=model.startswith(REMOTE_PREFIX))

    async def events_of(request: ChatCompletionRequest, plan: ChatPlan) -> Events:
        return await _events(
            state,
            request,
            model,
            plan.options,
            remote_params=plan.remote_params,
            messages=plan.messages,
        )

    # A listed web_search tool is run by the server (appliance.http.web_search_tool).
    searched = await web_search_round(state, body, plan_of, events_of)
    if searched is not None:
        plan, events = searched
    else:
        plan = plan_of(body)
        events = await events_of(body, plan)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not body.stream:
        text, done, logprobs = await _collect(events)
        message = ChatCompletionMessage(role="assistant", content=text)
        finish: ChatFinishReason = _finish(done)
        if plan.tools:
            answer = _Answer(plan, text, done)
            message.content, finish = answer.content, answer.finish
            if answer.calls:
                message.tool_calls = answer.calls
        choice_logprobs = None
        if plan.options.top_logprobs is not None:
            choice_logprobs = ChoiceLogprobs(token_logprobs(logprobs))
        return json_response(
            ChatCompletion(
                id=completion_id,
                object="chat.completion",
                created=created,
                model=model,
                choices=[ChatChoice(0, message, finish, choice_logprobs)],
                usage=token_usage(done),
                turns_left_out=done.left_out or msgspec.UNSET,
                budget_exhausted=events.budget_cut or msgspec.UNSET,
            )
        )
    include_usage = _include_usage(body)

    def chunk_body(
        delta: ChunkDelta,
        reason: ChatFinishReason | None,
        usage: TokenUsage | msgspec.UnsetType = msgspec.UNSET,
        logprobs: ChoiceLogprobs | None = None,
    ) -> ChatCompletionChunk:
        choices = (
            []
            if isinstance(usage, TokenUsage)
            else [ChunkChoice(index=0, delta=delta, finish_reason=reason, logprobs=logprobs)]
        )
        return ChatCompletionChunk(
            id=completion_id,
            object="chat.completion.chunk",
            created=created,
            model=model,
            choices=choices,
            usage=usage,
        )

    def last_chunks(done: Done, reason: ChatFinishReason) -> list[bytes]:
        chunk = chunk_body(ChunkDelta(), reason)
        chunk.turns_left_out = done.left_out or msgspec.UNSET
        chunk.budget_exhausted = events.budget_cut or msgspec.UNSET
        chunks = [sse(chunk)]
        if include_usage:
            chunks.append(sse(chunk_body(ChunkDelta(), None, token_usage(done))))
        return chunks

    token_chunk = SseTemplate(lambda text: chunk_body(ChunkDelta(content=text), None))
    request_id = g.request_id
    with_logprobs = plan.options.top_logprobs is not None
    if not plan.tools and not with_logprobs:
        token_chunk.hand_over(events)

    def token_event(event: Token) -> bytes:
        if not with_logprobs:
            return token_chunk(event.text)
        logprobs = ChoiceLogprobs(token_logprobs(event.logprobs))
        return sse(chunk_body(ChunkDelta(content=event.text), None, logprobs=logprobs))

    async def stream() -> AsyncGenerator[bytes, None]:
        try:
            yield sse(chunk_body(ChunkDelta(role="assistant", content=""), None))
            if plan.tools:
                # A reply is sent as its string grows; calls once the answer is whole
                # (each call's id and name, then its arguments in pieces).
                reply = ReplyStream()
                done: Done | None = None
                async for event in events:
                    if isinstance(event, Done):
                        done = event
                    elif not plan.json_reply:
                        fresh = reply.feed(event.text)
                        if fresh:
                            yield token_chunk(fresh)
                    else:
                        reply.text += event.text
                if done is None:
                    raise ApiError(503, "worker_crashed", "model worker crashed; retry")
                answer = _Answer(plan, reply.text, done)
                for piece in _answer_deltas(answer, reply.sent):
                    yield sse(chunk_body(piece, None))
                for chunk in last_chunks(done, answer.finish):
                    yield chunk
            else:
                async for event in events:
                    if isinstance(event, Token):
                        yield token_event(event)
                    else:
                        for chunk in last_chunks(event, _finish(event)):
                            yield chunk
            yield sse(b"[DONE]")
        except ApiError as error:
            yield sse_error(error, request_id)
        finally:
            await events.aclose()

    return stream_response(state, stream(), events)


def _answer_deltas(answer: _Answer, sent: str) -> list[ChunkDelta]:
    """What is left to send of a tool-format answer: the reply's rest (`sent` went out as
    it grew) or the calls."""
    if not answer.calls:
        content = answer.content or ""
        rest = content[len(sent) :] if content.startswith(sent) else ""
        return [ChunkDelta(content=rest)] if rest else []
    deltas: list[ChunkDelta] = []
    for index, call in enumerate(answer.calls):
        head = ToolCallDelta(
            index=index, id=call.id, type="function", function=FunctionDelta(call.function.name)
        )
        deltas.append(ChunkDelta(tool_calls=[head]))
        arguments = call.function.arguments
        for start in range(0, len(arguments), ARGUMENT_PIECE):
            piece = FunctionDelta(arguments=arguments[start : start + ARGUMENT_PIECE])
            deltas.append(ChunkDelta(tool_calls=[ToolCallDelta(index=index, function=piece)]))
    return deltas


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
    """OpenAI's completions for one prompt (always local), with log probabilities
    (`logprobs`: 0 to 20 alternatives), logit bias, penalties, `grammar`, and usage in
    the stream with `stream_options: {"include_usage": true}`.

    400 for a prompt longer than the model's context, and for a field that is unknown,
    out of range or cannot apply (`param` names it); 403 for a `remote:` model while the
    remote LLM is off; 404 for an unknown model; 400 for the remote model.
    """
    state = runtime()
    body = await parse_body(CompletionRequest)
    if body.echo:
        raise refuse("echo", "echo is not supported; leave it out or send false")
    if body.best_of not in (None, 1):
        raise refuse("best_of", "best_of must be 1: one completion is made per request")
    if body.suffix:
        raise refuse("suffix", "suffix (insertion) is not supported; leave it out")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise refuse("prompt", "prompt takes one string", "invalid_field")
        prompt = prompt[0]
    model = await resolve_model(state, body.model)
    options = sampling_options(body, top_logprobs=body.logprobs)
    events = await _events(state, body, model, options, prompt=prompt)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    with_logprobs = body.logprobs is not None

    def body_of(
        text: str,
        reason: FinishReason | None,
        usage: TokenUsage | msgspec.UnsetType = msgspec.UNSET,
        logprobs: list[TokenLogprob] | None = None,
        offset: int = 0,
    ) -> TextCompletion:
        shaped = completion_logprobs(logprobs or [], offset) if with_logprobs else None
        return TextCompletion(
            id=completion_id,
            object="text_completion",
            created=created,
            model=model,
            choices=[TextChoice(index=0, text=text, logprobs=shaped, finish_reason=reason)],
            usage=usage,
            budget_exhausted=(events.budget_cut or msgspec.UNSET) if reason else msgspec.UNSET,
        )

    if not body.stream:
        text, done, logprobs = await _collect(events)
        return json_response(body_of(text, _finish(done), token_usage(done), logprobs))

    token_chunk = SseTemplate(lambda text: body_of(text, None))
    if not with_logprobs:
        token_chunk.hand_over(events)
    request_id = g.request_id
    include_usage = _include_usage(body)

    async def stream() -> AsyncGenerator[bytes, None]:
        offset = 0
        try:
            async for event in events:
                if isinstance(event, Token):
                    if with_logprobs:
                        yield sse(body_of(event.text, None, logprobs=event.logprobs, offset=offset))
                    else:
                        yield token_chunk(event.text)
                    offset += len(event.text)
                else:
                    yield sse(body_of("", _finish(event)))
                    if include_usage:
                        usage = body_of("", None, token_usage(event))
                        usage.choices = []
                        yield sse(usage)
            yield sse(b"[DONE]")
        except ApiError as error:
            yield sse_error(error, request_id)
        finally:
            await events.aclose()

    return stream_response(state, stream(), events)


async def _listed(state: Runtime) -> list[OpenAIModel]:
    records = await trio.to_thread.run_sync(state.registry.list)
    listed = [
        OpenAIModel(
            id=record.name,
            object="model",
            created=int(record.checked_at),
            owned_by="appliance",
            capabilities=list(LOCAL_CAPABILITIES),
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
                capabilities=list(REMOTE_CAPABILITIES),
            )
        )
    return listed


@blueprint.get("/models")
@document_response(ModelList)
async def models() -> Response:
    """Usable models, in OpenAI's list shape, each with what it serves here
    (`capabilities`: chat, completions, embeddings, tools, structured_output)."""
    return json_response(ModelList(object="list", data=await _listed(runtime())))


@blueprint.get("/models/<path:model_id>")
@document_response(OpenAIModel)
@errors(404)
async def model(model_id: str) -> Response:
    """One usable model in OpenAI's shape; 404 (`model_not_found`) for any other name."""
    for listed in await _listed(runtime()):
        if listed.id == model_id:
            return json_response(listed)
    raise ApiError(
        404,
        "model_not_found",
        f"model {model_id[:64]!r} is not served here; see GET /v1/models",
        param="model",
    )
