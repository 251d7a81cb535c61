"""Conversations in Redis.

Keys use a hash tag per conversation, so every multi-key write of one conversation stays
in one cluster slot and runs as one MULTI/EXEC transaction:

    conv:{<id>}:meta       hash: id, created, updated, model, title, counters
    conv:{<id>}:messages   list of msgpack-encoded Message records
    conv:index             sorted set: id -> last activity (newest first listing,
                           and retention sweeps that cost what expires)

A question and its answer are written together, after the answer is complete: a client
either sees both or neither.
"""

from __future__ import annotations

import time
import uuid
from typing import Final

import msgspec

from appliance.store.client import Store

INDEX_KEY: Final = "conv:index"
TITLE_CHARS: Final = 80
_ID_CHARS: Final = frozenset("0123456789abcdef")


class Message(msgspec.Struct, frozen=True):
    id: str
    role: str
    content: str
    created: float
    tokens: int = 0


class ConversationMeta(msgspec.Struct, frozen=True):
    id: str
    created: float
    updated: float
    model: str
    title: str
    message_count: int
    prompt_tokens: int
    completion_tokens: int


class Conversation(msgspec.Struct, frozen=True):
    meta: ConversationMeta
    messages: list[Message]


_ENCODER = msgspec.msgpack.Encoder()
_MESSAGE = msgspec.msgpack.Decoder(Message)


def new_id() -> str:
    return uuid.uuid4().hex


def valid_id(value: str) -> bool:
    return len(value) == 32 and set(value) <= _ID_CHARS


def _meta_key(conversation_id: str) -> str:
    return f"conv:{{{conversation_id}}}:meta"


def _messages_key(conversation_id: str) -> str:
    return f"conv:{{{conversation_id}}}:messages"


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _meta(raw: dict[bytes, bytes]) -> ConversationMeta:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    return ConversationMeta(
        id=fields["id"],
        created=float(fields["created"]),
        updated=float(fields["updated"]),
        model=fields.get("model", ""),
        title=fields.get("title", ""),
        message_count=int(fields.get("message_count", 0)),
        prompt_tokens=int(fields.get("prompt_tokens", 0)),
        completion_tokens=int(fields.get("completion_tokens", 0)),
    )


class Conversations:
    """Reads and writes conversations through the daemon's store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def messages(self, conversation_id: str) -> list[Message]:
        client = self._store.client
        raw = await client.lrange(_messages_key(conversation_id), 0, -1)
        return [_MESSAGE.decode(item) for item in raw]

    async def get(self, conversation_id: str) -> Conversation | None:
        client = self._store.client
        raw = await client.hgetall(_meta_key(conversation_id))
        if not raw:
            return None
        return Conversation(meta=_meta(raw), messages=await self.messages(conversation_id))

    async def record_exchange(
        self,
        conversation_id: str,
        *,
        model: str,
        question: str,
        answer: str,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> tuple[Message, Message]:
        """Append a question and its answer (creating the conversation if new), atomically."""
        now = time.time()
        asked = Message(
            id=new_id(), role="user", content=question, created=now, tokens=prompt_tokens
        )
        answered = Message(
            id=new_id(), role="assistant", content=answer, created=now, tokens=completion_tokens
        )
        meta_key = _meta_key(conversation_id)
        client = self._store.client
        title = question.strip().splitlines()[0][:TITLE_CHARS] if question.strip() else ""
        async with client.pipeline(transaction=True) as pipe:
            pipe.hsetnx(meta_key, "id", conversation_id)
            pipe.hsetnx(meta_key, "created", repr(now))
            pipe.hsetnx(meta_key, "title", title)
            pipe.hset(meta_key, {"updated": repr(now), "model": model})
            pipe.hincrby(meta_key, "message_count", 2)
            pipe.hincrby(meta_key, "prompt_tokens", prompt_tokens)
            pipe.hincrby(meta_key, "completion_tokens", completion_tokens)
            pipe.rpush(
                _messages_key(conversation_id), [_ENCODER.encode(asked), _ENCODER.encode(answered)]
            )
        # The index lives in another slot; ZADD is idempotent, so a retry repairs it.
        await client.zadd(INDEX_KEY, {conversation_id: now})
        return asked, answered

    async def page(self, offset: int, limit: int) -> tuple[list[ConversationMeta], int]:
        """Newest first; returns one page and the total count."""
        client = self._store.client
        total = await client.zcard(INDEX_KEY)
        ids = await client.zrange(INDEX_KEY, offset, offset + limit - 1, rev=True)
        metas = []
        for raw_id in ids:
            raw = await client.hgetall(_meta_key(_text(raw_id)))
            if raw:
                metas.append(_meta(raw))
        return metas, total

    async def delete(self, conversation_id: str) -> int:
        """Remove a conversation and its index entry; returns the messages removed."""
        client = self._store.client
        meta = await client.hgetall(_meta_key(conversation_id))
        if not meta:
            return -1
        count = int(_text(meta.get(b"message_count", b"0")))
        await client.delete([_meta_key(conversation_id), _messages_key(conversation_id)])
        await client.zrem(INDEX_KEY, [conversation_id])
        return count
