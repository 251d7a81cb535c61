"""Conversations in Redis, content sealed at rest.

Keys use a hash tag per conversation, so every multi-key write of one conversation stays
in one cluster slot and runs as one MULTI/EXEC transaction:

    conv:{<id>}:meta       hash: id, created, updated, model, owner, key_id, counters
                           (clear: what indexing needs) and title (sealed)
    conv:{<id>}:messages   list of sealed msgpack Message records
    conv:index             sorted set: id -> last activity (newest-first listing, and
                           retention sweeps that cost what expires)
    conv:owner:<owner>     set of the ids an owner has (listing and erasure of "my data")
    conv:bykey:<key id>    set of the ids with records sealed under that key (rotation)
    conv:keyids            set of the key ids that have a conv:bykey set
    conv:owners            set of the owners that have a conv:owner set

A question and its answer are written together, after the answer is complete: a client
sees both or neither. Keys also get a TTL a day past the retention period, in case a sweep
never runs.

The index keys are shared by many conversations, so on a Redis Cluster they live in other
slots than the conversation: they are never in its MULTI/EXEC. Every index write is
idempotent (ZADD, SADD) and done twice, once before the transaction (a writer that dies
after it leaves no conversation that listing, erasure and rotation cannot find; a writer
that dies before it leaves an entry without a conversation, which readers skip and the
next sweep or erasure removes) and once after it (an entry removed meanwhile by a
deletion or a sweep that raced with this write is put back). A deletion removes the
conversation first and its index entries after, then looks again: a conversation written
anew in between gets its entries back. So nothing acknowledged ever drops out of the
indexes, on one server or a cluster.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Final

import coredis
import msgspec

from appliance.search.results import Source
from appliance.store.client import Store
from appliance.store.sealing import Codec, KeyRing, SealError

LOGGER = logging.getLogger("appliance.store")

INDEX_KEY: Final = "conv:index"
BYKEY_PREFIX: Final = "conv:bykey:"
KEY_IDS_KEY: Final = "conv:keyids"
OWNERS_KEY: Final = "conv:owners"
PLAIN_KEY_ID: Final = "plain"
TITLE_CHARS: Final = 80
TTL_SLACK_SECONDS: Final = 86_400
_ID_CHARS: Final = frozenset("0123456789abcdef")


class Message(msgspec.Struct, frozen=True):
    id: str
    role: str
    content: str
    created: float
    tokens: int = 0
    # The web search results an answer was given (absent when it searched nothing).
    sources: list[Source] | msgspec.UnsetType = msgspec.UNSET


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


class UnreadableRecord(Exception):
    """A stored value failed to open (tampered, moved, or sealed with an unknown key)."""


_ENCODER = msgspec.msgpack.Encoder()
_MESSAGE = msgspec.msgpack.Decoder(Message)


def new_id() -> str:
    return uuid.uuid4().hex


def valid_id(value: str) -> bool:
    return len(value) == 32 and set(value) <= _ID_CHARS


def meta_key(conversation_id: str) -> str:
    return f"conv:{{{conversation_id}}}:meta"


def messages_key(conversation_id: str) -> str:
    return f"conv:{{{conversation_id}}}:messages"


def owner_key(owner: str) -> str:
    return f"conv:owner:{owner}"


def _title_name(conversation_id: str) -> str:
    # Sealed hash fields are bound to key and field, so a value cannot move between them.
    return f"{meta_key(conversation_id)}#title"


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def key_id_of(codec: Codec) -> str:
    return codec.current_id if isinstance(codec, KeyRing) else PLAIN_KEY_ID


class Conversations:
    """Reads and writes conversations; `codec` seals content, `clock` is for tests."""

    def __init__(
        self,
        store: Store,
        codec: Codec,
        *,
        retention_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._codec = codec
        self._retention = retention_seconds
        self._clock = clock

    @property
    def store(self) -> Store:
        return self._store

    def _open(self, stored: bytes, key_name: str) -> bytes:
        try:
            return self._codec.open(stored, key_name)
        except SealError as exc:
            raise UnreadableRecord(str(exc)) from None

    def _meta(self, raw: dict[bytes, bytes]) -> ConversationMeta:
        fields = {_text(k): v for k, v in raw.items()}
        conversation_id = _text(fields["id"])
        title = fields.get("title", b"")
        return ConversationMeta(
            id=conversation_id,
            created=float(fields["created"]),
            updated=float(fields["updated"]),
            model=_text(fields.get("model")),
            title=self._open(title, _title_name(conversation_id)).decode() if title else "",
            message_count=int(fields.get("message_count", 0)),
            prompt_tokens=int(fields.get("prompt_tokens", 0)),
            completion_tokens=int(fields.get("completion_tokens", 0)),
        )

    async def messages(self, conversation_id: str) -> list[Message]:
        raw = await self._store.client.lrange(messages_key(conversation_id), 0, -1)
        name = messages_key(conversation_id)
        return [_MESSAGE.decode(self._open(item, name)) for item in raw]

    async def get(self, conversation_id: str, owner: str | None = None) -> Conversation | None:
        """The conversation, or None when it does not exist or belongs to someone else."""
        raw = await self._store.client.hgetall(meta_key(conversation_id))
        if not raw or (owner is not None and _text(raw.get(b"owner")) != owner):
            return None
        return Conversation(meta=self._meta(raw), messages=await self.messages(conversation_id))

    async def record_exchange(
        self,
        conversation_id: str,
        *,
        owner: str,
        model: str,
        question: str,
        answer: str,
        prompt_tokens: int,
        completion_tokens: int,
        sources: list[Source] | None = None,
    ) -> tuple[Message, Message]:
        """Append a question and its answer (creating the conversation if new), atomically;
        `sources` are the search results the answer was given (sealed with it)."""
        now = self._clock()
        asked = Message(
            id=new_id(), role="user", content=question, created=now, tokens=prompt_tokens
        )
        answered = Message(
            id=new_id(),
            role="assistant",
            content=answer,
            created=now,
            tokens=completion_tokens,
            sources=msgspec.UNSET if sources is None else sources,
        )
        meta, messages = meta_key(conversation_id), messages_key(conversation_id)
        title = question.strip().splitlines()[0][:TITLE_CHARS] if question.strip() else ""
        key_id = key_id_of(self._codec)
        ttl = int(self._retention + TTL_SLACK_SECONDS)
        client = self._store.client
        await self._index(conversation_id, now, owner, [key_id])
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hsetnx(meta, "id", conversation_id)
                pipe.hsetnx(meta, "created", repr(now))
                pipe.hsetnx(meta, "owner", owner)
                pipe.hsetnx(
                    meta, "title", self._codec.seal(title.encode(), _title_name(conversation_id))
                )
                # kid:<id> fields say which keys this conversation has records under.
                pipe.hset(meta, {"updated": repr(now), "model": model, f"kid:{key_id}": "1"})
                pipe.hincrby(meta, "message_count", 2)
                pipe.hincrby(meta, "prompt_tokens", prompt_tokens)
                pipe.hincrby(meta, "completion_tokens", completion_tokens)
                pipe.rpush(
                    messages,
                    [
                        self._codec.seal(_ENCODER.encode(asked), messages),
                        self._codec.seal(_ENCODER.encode(answered), messages),
                    ],
                )
                pipe.expire(meta, ttl)
                pipe.expire(messages, ttl)
        except (coredis.exceptions.RedisError, OSError):
            # Refused (a full store) or cut off: nothing of it was written. The index
            # entries written above would point at nothing if the conversation is new.
            await self._unindex_if_absent(conversation_id, owner, key_id)
            raise
        # Again after the transaction: a deletion or sweep racing with it may have removed
        # the entries written before (see the module's docstring). The exchange is stored
        # and the entries from before are in place, so a failure here is only logged.
        try:
            await self._index(conversation_id, now, owner, [key_id])
        except (coredis.exceptions.RedisError, OSError) as exc:
            LOGGER.warning("index entries not refreshed after a write: %s", type(exc).__name__)
        return asked, answered

    async def _unindex_if_absent(self, conversation_id: str, owner: str, key_id: str) -> None:
        """Best effort: a full store still takes deletions."""
        client = self._store.client
        try:
            if await client.exists([meta_key(conversation_id)]):
                return
            async with client.pipeline(transaction=False) as pipe:
                pipe.zrem(INDEX_KEY, [conversation_id])
                pipe.srem(owner_key(owner), [conversation_id])
                pipe.srem(BYKEY_PREFIX + key_id, [conversation_id])
        except (coredis.exceptions.RedisError, OSError) as exc:
            LOGGER.warning("index entries of a refused write left: %s", type(exc).__name__)

    async def _index(
        self, conversation_id: str, updated: float, owner: str, key_ids: list[str]
    ) -> None:
        """The index entries of one conversation, in one round trip (not a transaction:
        on a cluster they live in other slots; each write is idempotent)."""
        async with self._store.client.pipeline(transaction=False) as pipe:
            pipe.zadd(INDEX_KEY, {conversation_id: updated})
            pipe.sadd(owner_key(owner), [conversation_id])
            pipe.sadd(OWNERS_KEY, [owner])
            for key_id in key_ids:
                pipe.sadd(BYKEY_PREFIX + key_id, [conversation_id])
            pipe.sadd(KEY_IDS_KEY, key_ids)

    async def page(
        self, offset: int, limit: int, owner: str | None = None
    ) -> tuple[list[ConversationMeta], int]:
        """Newest first; one page and the total count (of the owner's, when given)."""
        client = self._store.client
        if owner is None:
            total = await client.zcard(INDEX_KEY)
            ids = [
                _text(i)
                for i in await client.zrange(INDEX_KEY, offset, offset + limit - 1, rev=True)
            ]
        else:
            members = [_text(m) for m in await client.smembers(owner_key(owner))]
            scores = await client.zmscore(INDEX_KEY, members) if members else []
            ranked = sorted((s or 0.0, m) for m, s in zip(members, scores, strict=True))
            total = len(ranked)
            ids = [m for _, m in reversed(ranked)][offset : offset + limit]
        metas = []
        for conversation_id in ids:
            raw = await client.hgetall(meta_key(conversation_id))
            if raw:
                metas.append(self._meta(raw))
        return metas, total

    async def delete(self, conversation_id: str, owner: str | None = None) -> int:
        """Remove a conversation and every index entry; messages removed, or -1 if absent."""
        client = self._store.client
        raw = await client.hgetall(meta_key(conversation_id))
        if not raw or (owner is not None and _text(raw.get(b"owner")) != owner):
            return -1
        count = int(_text(raw.get(b"message_count", b"0")))
        await client.delete([meta_key(conversation_id), messages_key(conversation_id)])
        await self._forget(conversation_id, raw)
        return count

    async def _forget(self, conversation_id: str, raw: dict[bytes, bytes]) -> None:
        """Remove the index entries of a deleted conversation.

        Its meta says which owner and key sets hold it; when the meta is already gone (its
        TTL ran out before a sweep), every owner and key set is cleaned instead: there are
        only a few of each. If the conversation was written anew meanwhile (an exchange
        racing with the deletion), its entries are put back.
        """
        client = self._store.client
        if raw:
            owners = [_text(raw.get(b"owner"))] if raw.get(b"owner") else []
            key_ids = [_text(f[4:]) for f in raw if f.startswith(b"kid:")]
        else:
            owners = [_text(o) for o in await client.smembers(OWNERS_KEY)]
            key_ids = [_text(k) for k in await client.smembers(KEY_IDS_KEY)]
        async with client.pipeline(transaction=False) as pipe:
            pipe.zrem(INDEX_KEY, [conversation_id])
            for owner in owners:
                pipe.srem(owner_key(owner), [conversation_id])
            for key_id in key_ids:
                pipe.srem(BYKEY_PREFIX + key_id, [conversation_id])
        again = await client.hgetall(meta_key(conversation_id))
        if again and b"owner" in again and b"updated" in again:
            await self._index(
                conversation_id,
                float(again[b"updated"]),
                _text(again[b"owner"]),
                [_text(f[4:]) for f in again if f.startswith(b"kid:")],
            )

    async def delete_owner(self, owner: str) -> tuple[int, int]:
        """Erase everything of one owner: (conversations, messages) removed."""
        client = self._store.client
        members = [_text(m) for m in await client.smembers(owner_key(owner))]
        conversations = messages = 0
        for conversation_id in members:
            removed = await self.delete(conversation_id, owner)
            if removed >= 0:
                conversations += 1
                messages += removed
            elif not await client.exists([meta_key(conversation_id)]):
                # Gone already (its TTL ran out, or its writer died before its MULTI):
                # only index entries are left.
                await self._forget(conversation_id, {})
        return conversations, messages

    async def expire_older_than(self, cutoff: float, batch: int = 500) -> int:
        """Delete conversations whose last activity is before `cutoff`; cost ~ what expires.

        Each deletion re-checks the conversation's own `updated` under WATCH, so an exchange
        written while the sweep runs is never deleted with the rest.
        """
        client = self._store.client
        removed = 0
        seen: set[str] = set()
        while True:
            ids = [
                _text(i)
                for i in await client.zrange(
                    INDEX_KEY,
                    "-inf",
                    f"({cutoff!r}",
                    sortby=coredis.PureToken.BYSCORE,
                    offset=0,
                    count=batch,
                )
            ]
            fresh = [i for i in ids if i not in seen]
            if not fresh:
                return removed
            seen.update(fresh)
            for conversation_id in fresh:
                if await self._expire_one(conversation_id, cutoff):
                    removed += 1

    async def _expire_one(self, conversation_id: str, cutoff: float) -> bool:
        client = self._store.client
        meta, messages = meta_key(conversation_id), messages_key(conversation_id)
        try:
            async with client.pipeline(transaction=True) as pipe, pipe.watch(meta, messages):
                raw = await client.hgetall(meta)
                updated = float(raw[b"updated"]) if raw else None
                if updated is None or updated < cutoff:
                    pipe.delete([meta, messages])
        except coredis.exceptions.WatchError:
            return False  # written just now: not expired
        if updated is not None and updated >= cutoff:
            # Active again (its index entry was not updated yet): put it where it belongs.
            await client.zadd(INDEX_KEY, {conversation_id: updated})
            return False
        await self._forget(conversation_id, raw)
        return True
