"""Which keys stored conversations are sealed under, and re-sealing them under the current one.

`conv:bykey:<key id>` sets say which conversations have records under which key, so the
start-up check and the "records under old keys" figure cost a few SCARDs, not a scan of
the data. Rotation re-seals one conversation per transaction (WATCH, read, re-seal,
MULTI/EXEC), so it can be interrupted at any point and run again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import coredis

from appliance.store.client import RedisClient
from appliance.store.conversations import (
    BYKEY_PREFIX,
    KEY_IDS_KEY,
    PLAIN_KEY_ID,
    key_id_of,
    messages_key,
    meta_key,
)
from appliance.store.sealing import Codec, KeyRing, PlainCodec, SealError

WATCH_RETRIES: Final = 10


class KeyMismatch(Exception):
    """Stored data needs a key this configuration does not have; start-up must stop."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def key_usage(client: RedisClient) -> dict[str, int]:
    """Conversations per key id (a conversation with records under two keys counts twice)."""
    usage: dict[str, int] = {}
    for key_id in sorted(_text(k) for k in await client.smembers(KEY_IDS_KEY)):
        count = await client.scard(BYKEY_PREFIX + key_id)
        if count:
            usage[key_id] = count
    return usage


def readable_ids(codec: Codec) -> set[str]:
    if isinstance(codec, KeyRing):
        ids = set(codec.ids)
        if codec.allow_plain_reads:
            ids.add(PLAIN_KEY_ID)
        return ids
    assert isinstance(codec, PlainCodec)
    return {PLAIN_KEY_ID, *(codec.keys.ids if codec.keys is not None else ())}


async def check_keys(client: RedisClient, codec: Codec) -> dict[str, int]:
    """Refuse to serve data this configuration cannot read; returns the key usage."""
    usage = await key_usage(client)
    readable = readable_ids(codec)
    for key_id, count in sorted(usage.items()):
        if key_id in readable:
            continue
        if key_id == PLAIN_KEY_ID:
            raise KeyMismatch(
                f"{count} conversations were stored in clear (PRIVACY_ENCRYPT_AT_REST was "
                "false); seal them with: appliance keys rotate"
            )
        raise KeyMismatch(
            f"stored data was sealed with key id {key_id} ({count} conversations); set "
            "SECRET_KEY_PREVIOUS and PRIVACY_SALT_PREVIOUS to the key and salt it was "
            "written with"
        )
    return usage


def old_key_count(usage: dict[str, int], codec: Codec) -> int:
    current = key_id_of(codec)
    return sum(count for key_id, count in usage.items() if key_id != current)


async def reseal_conversation(client: RedisClient, codec: Codec, conversation_id: str) -> bool:
    """Re-seal every record of one conversation under the current key, atomically."""
    meta, messages = meta_key(conversation_id), messages_key(conversation_id)
    current = key_id_of(codec)
    old: list[str] = []
    for _ in range(WATCH_RETRIES):
        try:
            async with client.pipeline(transaction=True) as pipe, pipe.watch(meta, messages):
                raw = await client.hgetall(meta)
                if not raw:
                    return False
                items = await client.lrange(messages, 0, -1)
                ttl = await client.pttl(messages)
                resealed = [codec.reseal(item, messages) for item in items]
                title = raw.get(b"title", b"")
                fields: dict[str, bytes | str] = {f"kid:{current}": "1"}
                if title:
                    fields["title"] = codec.reseal(title, f"{meta}#title")
                mine = f"kid:{current}".encode()
                old = [_text(f) for f in raw if f.startswith(b"kid:") and f != mine]
                pipe.delete([messages])
                if resealed:
                    pipe.rpush(messages, resealed)
                pipe.hset(meta, fields)
                if old:
                    pipe.hdel(meta, old)
                if ttl > 0:
                    pipe.pexpire(messages, ttl)
            break
        except coredis.exceptions.WatchError:
            continue
    else:
        return False
    await client.sadd(BYKEY_PREFIX + current, [conversation_id])
    await client.sadd(KEY_IDS_KEY, [current])
    for field in old:
        await client.srem(BYKEY_PREFIX + field[len("kid:") :], [conversation_id])
    return True


async def rotate(
    client: RedisClient,
    codec: Codec,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Re-seal everything not under the current key: (conversations re-sealed, remaining)."""
    usage = await key_usage(client)
    total = old_key_count(usage, codec)
    current = key_id_of(codec)
    done = 0
    for key_id in usage:
        if key_id == current:
            continue
        members = [_text(m) for m in await client.smembers(BYKEY_PREFIX + key_id)]
        for conversation_id in members:
            try:
                if await reseal_conversation(client, codec, conversation_id):
                    done += 1
                else:
                    # Deleted meanwhile (or busy): drop the stale index entry if it is gone.
                    if not await client.exists([meta_key(conversation_id)]):
                        await client.srem(BYKEY_PREFIX + key_id, [conversation_id])
            except SealError as exc:
                raise KeyMismatch(str(exc)) from None
            if progress is not None:
                progress(done, total)
    remaining = old_key_count(await key_usage(client), codec)
    return done, remaining
