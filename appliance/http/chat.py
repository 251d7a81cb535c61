"""The guide's chat API: send a message (optionally streamed), list, read, delete."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated, Any, Final, Literal

import msgspec
from quart import Blueprint, Response, g

from appliance.http.bodies import parse_body, query_int
from appliance.http.context import Runtime, current_key, current_owner, runtime
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
    token_usage,
)
from appliance.http.openapi_doc import (
    ErrorBody,
    document_querystring,
    document_request,
    document_response,
    errors,
    event_stream,
    links,
)
from appliance.http.remote_generation import REMOTE_PREFIX
from appliance.http.responses import json_response
from appliance.http.search import (
    ChatSearch,
    SearchMode,
    SearchReport,
    search_for_chat,
    searcher,
)
from appliance.http.search_decision import CALLED, model_decides
from appliance.http.sse import SseTemplate, sse, sse_error, stream_response
from appliance.llm.protocol import ChatMessage, Done, Sampling, Token
from appliance.privacy.redaction import redact_off_loop
from appliance.search.context import context_message
from appliance.search.results import Source
from appliance.store.conversations import ConversationMeta, Message, new_id, valid_id

blueprint = Blueprint("chat", __name__, url_prefix="/api/v1")

MAX_MESSAGE_CHARS: Final = 100_000
# History sent to the worker, at most (within its 16 MB frames, UTF-8 at its longest): the
# worker leaves out what does not fit the context; this only bounds what it is sent.
MAX_HISTORY_CHARS: Final = 2_000_000
MAX_PAGE: Final = 100
# Past any real number of conversations, within what Redis takes as a range index.
MAX_OFFSET: Final = 2**31 - 1


ConversationId = Annotated[
    str, msgspec.Meta(description="32 hexadecimal digits, as the appliance made it")
]


class ChatSendRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A message to the model; the reply and the question are stored in a conversation
    (a new one unless `conversation_id` names one of the caller's)."""

    message: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MESSAGE_CHARS)]
    conversation_id: ConversationId | None = None
    model: str | None = None
    stream: bool = False
    max_tokens: MaxTokens | None = None
    # Left out: the model's default (its manifest), else the appliance's (docs/models.md).
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    seed: Seed | None = None
    system: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_CHARS)] | None = None
    keep_alive: KeepAlive | None = None
    search: SearchMode = "off"


Sources = Annotated[
    list[Source],
    msgspec.Meta(
        description="the web search results the answer was given, numbered as the answer "
        "cites them ([1]); present when a search ran (also stored with the answer)"
    ),
]


class AssistantMessage(msgspec.Struct):
    id: str
    role: Literal["assistant"]
    content: str


class ChatReply(msgspec.Struct):
    """The model's reply, stored with the question."""

    conversation_id: str
    model: str
    message: AssistantMessage
    finish_reason: FinishReason
    usage: TokenUsage
    turns_left_out: TurnsLeftOut = 0
    budget_exhausted: BudgetExhausted | msgspec.UnsetType = msgspec.UNSET
    sources: Sources | msgspec.UnsetType = msgspec.UNSET
    search: SearchReport | msgspec.UnsetType = msgspec.UNSET


class ChatToken(msgspec.Struct):
    """SSE `event: token`: the next piece of the reply."""

    text: str


class ChatDone(msgspec.Struct):
    """SSE `event: done`: the reply is complete and stored."""

    conversation_id: str
    message_id: str
    model: str
    finish_reason: FinishReason
    usage: TokenUsage
    turns_left_out: TurnsLeftOut = 0
    budget_exhausted: BudgetExhausted | msgspec.UnsetType = msgspec.UNSET
    sources: Sources | msgspec.UnsetType = msgspec.UNSET
    search: SearchReport | msgspec.UnsetType = msgspec.UNSET


class PageQuery(msgspec.Struct):
    offset: Annotated[int, msgspec.Meta(ge=0, le=MAX_OFFSET)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)] = 20


class ConversationPage(msgspec.Struct):
    """The caller's conversations, newest first."""

    conversations: list[ConversationMeta]
    total: int
    offset: int
    limit: int


class ConversationDetail(ConversationMeta, frozen=True):
    """One conversation with its messages (as stored: redacted)."""

    messages: list[Message]


class Deleted(msgspec.Struct):
    """The conversation is gone, with its messages."""

    deleted: str
    messages_removed: int


def _not_found(conversation_id: str) -> ApiError:
    return ApiError(
        404,
        "conversation_not_found",
        f"conversation {conversation_id[:64]!r} does not exist "
        "(it may have expired or been deleted)",
    )


@blueprint.post("/chat/send")
@document_request(ChatSendRequest)
@document_response(ChatReply)
@event_stream(
    "with `stream: true`: `token` events, then `done` (or `error`)",
    {"token": ChatToken, "done": ChatDone, "error": ErrorBody},
)
@errors(403, 404, 422, 429, 502, 504)
@links(
    get_conversation={"conversation_id": "$response.body#/conversation_id"},
    delete_conversation={"conversation_id": "$response.body#/conversation_id"},
)
async def send() -> Response:
    """Generate a reply to a message and store both (optionally streamed).

    A conversation longer than the model's context leaves its oldest turns out of the
    prompt (`turns_left_out`; the stored conversation keeps them); 400 only for a message
    that does not fit with the system prompt alone. An answer cut by a token budget ends
    with finish_reason `length` and `budget_exhausted`, and is stored and charged as
    generated. 403 for a `remote:` model while the remote LLM is off; 404 for an unknown
    model or conversation; 502/504 from the remote LLM.

    `search` (`off` by default) puts web search results into the prompt as numbered
    context; the answer carries them as `sources`. Only the message, redacted, is sent to
    the search provider. With `auto` a local model decides (it calls web_search or
    replies); the remote model searches when the message looks like a question about the
    world; `search.note` says which happened. 403 while SEARCH_ENABLED=false or for a key
    not allowed to search; 429 past SEARCH_BUDGET_DAILY; 502/504 naming the provider when
    `always` cannot search (`auto` answers without sources and says so in `search.note`).
    """
    state = runtime()
    body = await parse_body(ChatSendRequest)
    conversations = state.conversations
    owner = current_owner()
    history: list[ChatMessage] = []
    if body.conversation_id is not None:
        if not valid_id(body.conversation_id):
            raise _not_found(body.conversation_id)
        existing = await conversations.get(body.conversation_id, owner)
        if existing is None:
            raise _not_found(body.conversation_id)
        history = [ChatMessage(m.role, m.content) for m in existing.messages]
    conversation_id = body.conversation_id or new_id()
    model = await resolve_model(state, body.model)
    max_tokens = max_tokens_for(state, body.max_tokens)
    history, not_sent = _recent(history)
    found, replied = await _search(state, body, model, history, max_tokens)
    system = _system_text(body.system, found)
    messages = [ChatMessage("system", system)] if system else []
    messages += [*history, ChatMessage("user", body.message)]
    # With `auto`, a local model that chose to reply rather than search has answered.
    events = replied or await generate(
        state,
        model,
        messages=messages,
        sampling=Sampling(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        ),
        stream=body.stream,
        keep_alive=keep_alive_of(body.keep_alive),
    )

    async def store(answer: str, done: Done) -> str:
        # The model saw the user's own words; what is kept is redacted.
        question = await redact_off_loop(state.redactor, body.message)
        kept_answer = await redact_off_loop(state.redactor, answer)
        _, answered = await conversations.record_exchange(
            conversation_id,
            owner=owner,
            model=model,
            question=question.text,
            answer=kept_answer.text,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            sources=sources,
        )
        return answered.id

    sources = found.sources if found is not None and found.report.searched else None
    extra = _search_fields(found)

    if not body.stream:
        answer, done = await collect(events)
        message_id = await store(answer, done)
        return json_response(
            ChatReply(
                conversation_id=conversation_id,
                model=model,
                message=AssistantMessage(id=message_id, role="assistant", content=answer),
                finish_reason=finish_reason(done),
                usage=token_usage(done),
                turns_left_out=not_sent + done.left_out,
                budget_exhausted=events.budget_cut or msgspec.UNSET,
                **extra,
            )
        )

    await events.start()
    token_event = SseTemplate(ChatToken, event="token")
    token_event.hand_over(events)
    request_id = g.request_id

    async def stream() -> AsyncGenerator[bytes, None]:
        try:
            async for event in events:
                if isinstance(event, Token):
                    yield token_event(event.text)
                else:
                    message_id = await store(events.answer_text(), event)
                    yield sse(
                        ChatDone(
                            conversation_id=conversation_id,
                            message_id=message_id,
                            model=model,
                            finish_reason=finish_reason(event),
                            usage=token_usage(event),
                            turns_left_out=not_sent + event.left_out,
                            budget_exhausted=events.budget_cut or msgspec.UNSET,
                            **extra,
                        ),
                        event="done",
                    )
        except ApiError as error:
            yield sse_error(error, request_id)
        finally:
            await events.aclose()

    return stream_response(state, stream(), events)


async def _search(
    state: Runtime,
    body: ChatSendRequest,
    model: str,
    history: list[ChatMessage],
    max_tokens: int,
) -> tuple[ChatSearch | None, Events | None]:
    """The search a message asks for, and the model's reply when `auto` let a local model
    decide and it replied instead of calling web_search (appliance.http.search_decision)."""
    if body.search == "off":
        return None, None
    key = current_key()
    if body.search == "auto" and not model.startswith(REMOTE_PREFIX):
        searcher(state, key)  # 403 before the model runs
        system = [ChatMessage("system", body.system)] if body.system else []
        replied = await model_decides(
            state,
            model,
            [*system, *history, ChatMessage("user", body.message)],
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        if replied is not None:
            note = "not searched: the model answered without calling web_search"
            return ChatSearch([], SearchReport("auto", False, note=note)), replied
        return await search_for_chat(state, key, body.message, "auto", CALLED), None
    return await search_for_chat(state, key, body.message, body.search), None


def _system_text(system: str | None, found: ChatSearch | None) -> str:
    """The request's system prompt, then the search results (when a search ran)."""
    parts = [system] if system else []
    if found is not None and found.report.searched:
        parts.append(context_message(found.sources))
    return "\n\n".join(parts)


def _search_fields(found: ChatSearch | None) -> dict[str, Any]:
    if found is None:
        return {}
    if not found.report.searched:
        return {"search": found.report}
    return {"sources": found.sources, "search": found.report}


def _recent(history: list[ChatMessage]) -> tuple[list[ChatMessage], int]:
    """The most recent turns within MAX_HISTORY_CHARS, starting with a user turn, and how
    many older ones are not sent at all."""
    start, size = len(history), 0
    while start > 0 and size + len(history[start - 1].content) <= MAX_HISTORY_CHARS:
        start -= 1
        size += len(history[start].content)
    while start < len(history) and history[start].role != "user":
        start += 1
    return history[start:], start


def _page_arguments() -> tuple[int, int]:
    return query_int("offset", 0, 0, MAX_OFFSET), query_int("limit", 20, 1, MAX_PAGE)


@blueprint.get("/conversations")
@document_querystring(PageQuery)
@document_response(ConversationPage)
@errors(400)
async def list_conversations() -> Response:
    """The caller's conversations, newest first; `?offset=&limit=` (1-100)."""
    offset, limit = _page_arguments()
    metas, total = await runtime().conversations.page(offset, limit, current_owner())
    return json_response(
        ConversationPage(conversations=metas, total=total, offset=offset, limit=limit)
    )


@blueprint.get("/conversations/<conversation_id>")
@document_response(ConversationDetail)
@errors(404)
async def get_conversation(conversation_id: str) -> Response:
    """One of the caller's conversations with its messages (another key's is 404)."""
    found = None
    if valid_id(conversation_id):
        found = await runtime().conversations.get(conversation_id, current_owner())
    if found is None:
        raise _not_found(conversation_id)
    return json_response(
        ConversationDetail(**msgspec.structs.asdict(found.meta), messages=found.messages)
    )


@blueprint.delete("/conversations/<conversation_id>")
@document_response(Deleted)
@errors(404)
async def delete_conversation(conversation_id: str) -> Response:
    """Remove one of the caller's conversations and its index entry."""
    removed = -1
    if valid_id(conversation_id):
        removed = await runtime().conversations.delete(conversation_id, current_owner())
    if removed < 0:
        raise _not_found(conversation_id)
    return json_response(Deleted(deleted=conversation_id, messages_removed=removed))
