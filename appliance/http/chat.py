"""The guide's chat API: send a message (optionally streamed), list, read, delete."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated, Any, Final, Literal

import msgspec
from quart import Blueprint, Response, g, request

from appliance.http.app import current_owner, runtime
from appliance.http.bodies import parse_body
from appliance.http.errors import ApiError
from appliance.http.generation import (
    FinishReason,
    MaxTokens,
    StreamBody,
    TokenUsage,
    collect,
    finish_reason,
    generate,
    max_tokens_for,
    resolve_model,
    sse,
    sse_error,
    sse_template,
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
from appliance.http.privacy import redact_off_loop
from appliance.llm.protocol import ChatMessage, Done, Token
from appliance.store.conversations import ConversationMeta, Message, new_id, valid_id

blueprint = Blueprint("chat", __name__, url_prefix="/api/v1")

MAX_MESSAGE_CHARS: Final = 100_000
MAX_PAGE: Final = 100


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
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 0.7
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.95
    seed: int | None = None
    system: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_CHARS)] | None = None


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


class PageQuery(msgspec.Struct):
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
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


def _json(body: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status=status, mimetype="application/json")


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
@errors(403, 404, 502, 504)
@links(
    get_conversation={"conversation_id": "$response.body#/conversation_id"},
    delete_conversation={"conversation_id": "$response.body#/conversation_id"},
)
async def send() -> Response:
    """Generate a reply to a message and store both (optionally streamed).

    400 for a prompt longer than the model's context; 403 for a `remote:` model while the
    remote LLM is off; 404 for an unknown model or conversation; 502/504 from the remote LLM.
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
    messages = [ChatMessage("system", body.system)] if body.system else []
    messages += [*history, ChatMessage("user", body.message)]
    events = await generate(
        state,
        model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stream=body.stream,
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
        )
        return answered.id

    if not body.stream:
        answer, done = await collect(events)
        message_id = await store(answer, done)
        return _json(
            ChatReply(
                conversation_id=conversation_id,
                model=model,
                message=AssistantMessage(id=message_id, role="assistant", content=answer),
                finish_reason=finish_reason(done),
                usage=token_usage(done),
            )
        )

    await events.start()
    token_event = sse_template(ChatToken, event="token")
    request_id = g.request_id

    async def stream() -> AsyncGenerator[bytes, None]:
        parts: list[str] = []
        try:
            async for event in events:
                if isinstance(event, Token):
                    parts.append(event.text)
                    yield token_event(event.text)
                else:
                    message_id = await store("".join(parts), event)
                    yield sse(
                        ChatDone(
                            conversation_id=conversation_id,
                            message_id=message_id,
                            model=model,
                            finish_reason=finish_reason(event),
                            usage=token_usage(event),
                        ),
                        event="done",
                    )
        except ApiError as error:
            yield sse_error(error, request_id)
        finally:
            await events.aclose()

    return Response(
        StreamBody(stream(), events),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-store"},
    )


def _page_arguments() -> tuple[int, int]:
    try:
        offset = int(request.args.get("offset", "0"))
        limit = int(request.args.get("limit", "20"))
    except ValueError:
        raise ApiError(400, "invalid_parameter", "offset and limit must be whole numbers") from None
    if offset < 0 or not 1 <= limit <= MAX_PAGE:
        raise ApiError(
            400, "invalid_parameter", f"offset must be 0 or more and limit from 1 to {MAX_PAGE}"
        )
    return offset, limit


@blueprint.get("/conversations")
@document_querystring(PageQuery)
@document_response(ConversationPage)
@errors(400)
async def list_conversations() -> Response:
    """The caller's conversations, newest first; `?offset=&limit=` (1-100)."""
    offset, limit = _page_arguments()
    metas, total = await runtime().conversations.page(offset, limit, current_owner())
    return _json(ConversationPage(conversations=metas, total=total, offset=offset, limit=limit))


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
    return _json(ConversationDetail(**msgspec.structs.asdict(found.meta), messages=found.messages))


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
    return _json(Deleted(deleted=conversation_id, messages_removed=removed))
