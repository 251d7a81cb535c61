"""Conversations in the real redis-server, one rule at a time: what an exchange writes (every
field, counter, TTL and index entry), listing, deletion, erasure of an owner and expiry at
its exact cutoff. A wrong counter is a wrong bill; a missed index entry is data that erasure
or retention never finds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import coredis
import msgspec
import pytest
import trio

from appliance.search.results import Source
from appliance.store.client import Store
from appliance.store.conversations import (
    BYKEY_PREFIX,
    INDEX_KEY,
    KEY_IDS_KEY,
    OWNERS_KEY,
    Conversations,
    Message,
    UnreadableRecord,
    messages_key,
    meta_key,
    owner_key,
    valid_id,
)
from appliance.store.sealing import KeyRing, PlainCodec
from appliance.store.server import EmbeddedRedis
from tests.harness import short_tempdir

DAY = 86_400
NOW = 1_700_000_000.25
RING = KeyRing("conversations test SECRET_KEY of some length", "conversations test salt")
A, B, C = "a" * 32, "b" * 32, "c" * 32


@dataclass
class Setup:
    conversations: Conversations
    client: coredis.Redis[bytes]
    now: list[float]

    async def write(self, conversation_id: str, owner: str = "alice", text: str = "hi") -> None:
        await self.conversations.record_exchange(
            conversation_id,
            owner=owner,
            model="tiny",
            question=text,
            answer="ok",
            prompt_tokens=3,
            completion_tokens=5,
        )


@asynccontextmanager
async def stored(codec: KeyRing | PlainCodec = RING) -> AsyncIterator[Setup]:
    directory = short_tempdir()
    now = [NOW]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            redis = EmbeddedRedis(directory, directory / "run", "64mb")
            await nursery.start(redis.run)
            store = Store(f"unix://{redis.socket_path}")
            await nursery.start(store.run)
            conversations = Conversations(
                store, codec, retention_seconds=7 * DAY, clock=lambda: now[0]
            )
            client = store.client
            assert isinstance(client, coredis.Redis)
            yield Setup(conversations, client, now)
            nursery.cancel_scope.cancel()


def test_conversation_ids_are_32_lowercase_hex_digits() -> None:
    assert valid_id("0123456789abcdef" * 2)
    assert not valid_id("0123456789abcdef" * 2 + "0")
    assert not valid_id("a" * 31)
    assert not valid_id("A" * 32)
    assert not valid_id("g" * 32)


async def test_an_exchange_writes_every_field_counter_ttl_and_index_entry() -> None:
    async with stored() as s:
        asked, answered = await s.conversations.record_exchange(
            A,
            owner="alice",
            model="tiny",
            question="  First line of the question\nsecond line",
            answer="the answer",
            prompt_tokens=7,
            completion_tokens=11,
        )
        meta = {k.decode(): v for k, v in (await s.client.hgetall(meta_key(A))).items()}
        ttls = [await s.client.ttl(meta_key(A)), await s.client.ttl(messages_key(A))]
        index = await s.client.zscore(INDEX_KEY, A)
        sets = [
            await s.client.smembers(owner_key("alice")),
            await s.client.smembers(OWNERS_KEY),
            await s.client.smembers(BYKEY_PREFIX + RING.current_id),
            await s.client.smembers(KEY_IDS_KEY),
        ]
        conversation = await s.conversations.get(A)
    assert (asked.role, asked.content, asked.created, asked.tokens) == (
        "user",
        "  First line of the question\nsecond line",
        NOW,
        7,
    )
    assert (answered.role, answered.content, answered.tokens) == ("assistant", "the answer", 11)
    assert valid_id(asked.id) and valid_id(answered.id) and asked.id != answered.id
    assert meta["id"] == A.encode() and meta["owner"] == b"alice" and meta["model"] == b"tiny"
    assert meta["created"] == meta["updated"] == repr(NOW).encode()
    assert meta[f"kid:{RING.current_id}"] == b"1"
    assert (meta["message_count"], meta["prompt_tokens"], meta["completion_tokens"]) == (
        b"2",
        b"7",
        b"11",
    )
    assert RING.open(meta["title"], f"{meta_key(A)}#title") == b"First line of the question"
    # A day past the retention period, in case no sweep ever runs.
    assert all(8 * DAY - 10 <= ttl <= 8 * DAY for ttl in ttls)
    assert index == NOW
    assert sets == [{A.encode()}, {b"alice"}, {A.encode()}, {RING.current_id.encode()}]
    assert conversation is not None
    assert conversation.meta.title == "First line of the question"
    assert [m.content for m in conversation.messages] == [asked.content, "the answer"]
    assert conversation.messages == [asked, answered]


async def test_an_answer_keeps_the_search_results_it_was_given_and_only_those() -> None:
    sources = [Source(number=1, title="Trio", url="https://trio.example/", snippet="async")]
    async with stored() as s:
        _, searched = await s.conversations.record_exchange(
            A,
            owner="alice",
            model="tiny",
            question="what is trio?",
            answer="a library [1]",
            prompt_tokens=3,
            completion_tokens=5,
            sources=sources,
        )
        await s.write(B)
        with_sources, without = await s.conversations.get(A), await s.conversations.get(B)
    assert searched.sources == sources
    assert with_sources is not None and without is not None
    assert with_sources.messages[1].sources == sources
    assert [m.sources for m in without.messages] == [msgspec.UNSET, msgspec.UNSET]


async def test_a_second_exchange_adds_to_the_counters_and_keeps_created_and_title() -> None:
    async with stored() as s:
        await s.write(A, text="first question")
        s.now[0] += 60
        await s.conversations.record_exchange(
            A,
            owner="alice",
            model="other",
            question="second question",
            answer="second answer",
            prompt_tokens=10,
            completion_tokens=20,
        )
        conversation = await s.conversations.get(A)
        index = await s.client.zscore(INDEX_KEY, A)
    assert conversation is not None
    meta = conversation.meta
    assert (meta.created, meta.updated, meta.model, meta.title) == (
        NOW,
        NOW + 60,
        "other",
        "first question",
    )
    assert (meta.message_count, meta.prompt_tokens, meta.completion_tokens) == (4, 13, 25)
    assert [m.content for m in conversation.messages] == [
        "first question",
        "ok",
        "second question",
        "second answer",
    ]
    assert index == NOW + 60


@pytest.mark.parametrize(
    ("question", "title"),
    [
        ("x" * 81, "x" * 80),
        ("y" * 80, "y" * 80),
        ("   \n  ", ""),
        ("\n\n  Hello  \nworld", "Hello  "),
    ],
)
async def test_the_title_is_the_first_line_cut_at_80_characters(question: str, title: str) -> None:
    async with stored() as s:
        await s.write(A, text=question)
        conversation = await s.conversations.get(A)
    assert conversation is not None and conversation.meta.title == title


async def test_plain_storage_names_its_key_id_plain() -> None:
    async with stored(PlainCodec()) as s:
        await s.write(A, text="clear")
        meta = await s.client.hgetall(meta_key(A))
        members = await s.client.smembers(BYKEY_PREFIX + "plain")
    assert meta[b"kid:plain"] == b"1" and meta[b"title"] == b"clear"
    assert members == {A.encode()}


async def test_a_missing_or_someone_elses_conversation_is_none() -> None:
    async with stored() as s:
        await s.write(A, owner="alice")
        assert await s.conversations.get(B) is None
        assert await s.conversations.get(A, owner="bob") is None
        assert await s.conversations.get(A, owner="alice") is not None
        assert await s.conversations.delete(A, owner="bob") == -1
        assert await s.conversations.delete(B) == -1
        assert await s.conversations.get(A) is not None


async def test_a_record_that_fails_to_open_is_unreadable_not_content() -> None:
    async with stored() as s:
        await s.write(A)
        sealed = await s.client.lindex(messages_key(A), 0)
        assert sealed is not None
        await s.client.lset(messages_key(A), 0, sealed[:-1] + bytes([sealed[-1] ^ 1]))
        with pytest.raises(UnreadableRecord, match="failed authentication"):
            await s.conversations.get(A)


async def test_a_partial_meta_reads_with_zero_counters() -> None:
    async with stored() as s:
        await s.client.hset(meta_key(A), {"id": A, "created": "1.5", "updated": "2.5"})
        conversation = await s.conversations.get(A)
    assert conversation is not None
    meta = conversation.meta
    assert (meta.created, meta.updated, meta.model, meta.title) == (1.5, 2.5, "", "")
    assert (meta.message_count, meta.prompt_tokens, meta.completion_tokens) == (0, 0, 0)
    assert conversation.messages == []


async def test_pages_are_newest_first_with_the_total() -> None:
    async with stored() as s:
        for conversation_id, owner in ((A, "alice"), (B, "bob"), (C, "alice")):
            await s.write(conversation_id, owner=owner)
            s.now[0] += 10
        everyone, total = await s.conversations.page(0, 2)
        rest, _ = await s.conversations.page(2, 2)
        alices, alice_total = await s.conversations.page(0, 10, owner="alice")
        second, _ = await s.conversations.page(1, 1, owner="alice")
        nobody = await s.conversations.page(0, 10, owner="carol")
    assert ([m.id for m in everyone], total) == ([C, B], 3)
    assert [m.id for m in rest] == [A]
    assert ([m.id for m in alices], alice_total) == ([C, A], 2)
    assert [m.id for m in second] == [A]
    assert nobody == ([], 0)


async def test_deleting_removes_the_conversation_and_every_index_entry() -> None:
    async with stored() as s:
        await s.write(A)
        await s.write(A)
        await s.write(B)
        assert await s.conversations.delete(A) == 4
        assert await s.client.exists([meta_key(A), messages_key(A)]) == 0
        assert await s.client.zscore(INDEX_KEY, A) is None
        assert await s.client.smembers(owner_key("alice")) == {B.encode()}
        assert await s.client.smembers(BYKEY_PREFIX + RING.current_id) == {B.encode()}
        assert await s.conversations.get(B) is not None


async def test_erasing_an_owner_counts_conversations_and_messages() -> None:
    async with stored() as s:
        await s.write(A, owner="alice")
        await s.write(A, owner="alice")
        await s.write(B, owner="alice")
        await s.write(C, owner="bob")
        # An index entry whose conversation expired by its TTL before any sweep.
        ghost = "d" * 32
        await s.client.sadd(owner_key("alice"), [ghost])
        await s.client.sadd(BYKEY_PREFIX + RING.current_id, [ghost])
        await s.client.zadd(INDEX_KEY, {ghost: 1.0})
        assert await s.conversations.delete_owner("alice") == (2, 6)
        assert await s.client.smembers(owner_key("alice")) == set()
        assert await s.client.smembers(BYKEY_PREFIX + RING.current_id) == {C.encode()}
        assert list(await s.client.zrange(INDEX_KEY, 0, -1)) == [C.encode()]
        assert await s.conversations.delete_owner("nobody") == (0, 0)


async def test_expiry_deletes_what_is_older_than_the_cutoff_in_batches() -> None:
    async with stored() as s:
        for n in range(5):
            await s.write(f"{n:032x}")
        s.now[0] += 100
        await s.write(A)  # updated exactly at the cutoff: kept
        s.now[0] += 1
        await s.write(B)
        assert await s.conversations.expire_older_than(NOW + 100, batch=2) == 5
        remaining = list(await s.client.zrange(INDEX_KEY, 0, -1))
        assert remaining == [A.encode(), B.encode()]
        assert await s.client.smembers(owner_key("alice")) == {A.encode(), B.encode()}
        assert await s.conversations.expire_older_than(NOW + 100) == 0
        assert await s.conversations.get(A) is not None


async def test_expiry_puts_an_active_conversation_back_where_it_belongs() -> None:
    async with stored() as s:
        await s.write(A)
        s.now[0] += 50
        await s.write(A)
        await s.client.zadd(INDEX_KEY, {A: NOW})  # an index entry not yet refreshed
        assert await s.conversations.expire_older_than(NOW + 10) == 0
        assert await s.client.zscore(INDEX_KEY, A) == NOW + 50
        assert await s.conversations.get(A) is not None


async def test_a_write_the_full_store_refuses_leaves_no_index_entry() -> None:
    async with stored() as s:
        await s.write(B)
        used = int((await s.client.info("memory"))["used_memory"])
        # The index entries fit; the exchange (400 KB in the query buffer) does not.
        await s.client.config_set({"maxmemory": str(used + 100_000)})
        with pytest.raises(coredis.exceptions.RedisError, match=r"OOM|EXECABORT|RPUSH"):
            await s.write(A, text="q" * 400_000)
        assert await s.client.exists([meta_key(A), messages_key(A)]) == 0
        assert await s.client.zscore(INDEX_KEY, A) is None
        assert await s.client.smembers(owner_key("alice")) == {B.encode()}
        assert await s.client.smembers(BYKEY_PREFIX + RING.current_id) == {B.encode()}
        # A conversation that exists keeps its entries when its next exchange is refused.
        with pytest.raises(coredis.exceptions.RedisError):
            await s.write(B, text="q" * 400_000)
        assert await s.client.zscore(INDEX_KEY, B) == NOW
        assert await s.client.smembers(owner_key("alice")) == {B.encode()}
        await s.client.config_set({"maxmemory": "64mb"})
        await s.write(A)
        assert await s.conversations.get(A) is not None


def test_records_are_immutable() -> None:
    message = Message(id="1", role="user", content="hi", created=1.0)
    with pytest.raises(AttributeError):
        message.content = "changed"  # type: ignore[misc]


async def test_a_message_stored_without_its_token_count_reads_as_zero() -> None:
    async with stored() as s:
        await s.write(A)
        old = msgspec.msgpack.encode({"id": "1", "role": "user", "content": "old", "created": 1.0})
        await s.client.rpush(messages_key(A), [RING.seal(old, messages_key(A))])
        conversation = await s.conversations.get(A)
        assert conversation is not None
        with pytest.raises(AttributeError):
            conversation.meta.title = "changed"  # type: ignore[misc]
        with pytest.raises(AttributeError):
            conversation.messages = []  # type: ignore[misc]
    assert conversation.messages[-1] == Message(id="1", role="user", content="old", created=1.0)
    assert conversation.messages[-1].tokens == 0


async def test_an_owner_listing_puts_a_conversation_without_index_entry_last() -> None:
    async with stored() as s:
        await s.write(A)
        await s.write(B)
        await s.client.zadd(INDEX_KEY, {A: 0.5})
        await s.client.zrem(INDEX_KEY, [B])  # its writer died between the two index writes
        metas, total = await s.conversations.page(0, 10, owner="alice")
    assert ([m.id for m in metas], total) == ([A, B], 2)


async def test_a_conversation_written_again_during_a_deletion_gets_its_entries_back() -> None:
    async with stored() as s:
        await s.write(A)
        # The deletion's index clean-up finds the conversation written anew meanwhile.
        await s.conversations._forget(A, {})
        assert await s.client.zscore(INDEX_KEY, A) == NOW
        assert await s.client.smembers(owner_key("alice")) == {A.encode()}
        assert await s.client.smembers(BYKEY_PREFIX + RING.current_id) == {A.encode()}
        assert await s.client.smembers(KEY_IDS_KEY) == {RING.current_id.encode()}
        # A meta without an owner (half written) is not put back, and does not fail.
        await s.client.hset(meta_key(B), {"id": B, "updated": "5.0"})
        await s.client.zadd(INDEX_KEY, {B: 5.0})
        await s.conversations._forget(B, {})
        assert await s.client.zscore(INDEX_KEY, B) is None


async def test_erasing_counts_a_conversation_without_messages() -> None:
    async with stored() as s:
        await s.client.hset(
            meta_key(A), {"id": A, "owner": "alice", "created": "1", "updated": "1"}
        )
        await s.client.sadd(owner_key("alice"), [A])
        assert await s.conversations.delete_owner("alice") == (1, 0)


async def test_expiry_keeps_a_conversation_active_at_the_cutoff_under_a_stale_entry() -> None:
    async with stored() as s:
        await s.write(A)  # updated at NOW
        await s.client.zadd(INDEX_KEY, {A: NOW - 50})  # its entry not refreshed yet
        assert await s.conversations.expire_older_than(NOW) == 0
        assert await s.client.zscore(INDEX_KEY, A) == NOW
        assert await s.conversations.get(A) is not None
