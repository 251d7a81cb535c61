"""`appliance keys status|rotate`: which keys stored data is sealed under; re-seal it.

With the daemon running these use its Redis; with it stopped they start the embedded
redis-server themselves for the duration (never a second one beside a running daemon's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import coredis
import trio

from appliance.config import Settings
from appliance.privacy.keys import load_keys
from appliance.privacy.rotation import KeyMismatch, key_usage, old_key_count, rotate
from appliance.progress import ProgressBar
from appliance.store.conversations import key_id_of
from appliance.store.sealing import KeyRing, SealError
from appliance.store.server import EmbeddedRedis


async def _answers(url: str) -> bool:
    try:
        client: coredis.Redis[bytes] = coredis.Redis.from_url(url, connect_timeout=2)
        async with client:
            await client.ping()
    except (coredis.exceptions.RedisError, OSError):
        return False
    return True


@contextlib.asynccontextmanager
async def redis_client(settings: Settings) -> AsyncIterator[coredis.Redis[bytes]]:
    """A client to the store, starting the embedded server only if nothing serves it."""
    async with trio.open_nursery() as nursery:
        if settings.embedded_redis:
            url = f"unix://{settings.redis_socket}"
            if not await _answers(url):
                server = EmbeddedRedis(
                    Path(settings.state_dir), Path(settings.runtime_dir), settings.redis_maxmemory
                )
                await nursery.start(server.run)
        else:
            url = settings.redis_url
        client: coredis.Redis[bytes] = coredis.Redis.from_url(url)
        async with client:
            yield client
        nursery.cancel_scope.cancel()


async def _status(settings: Settings, as_json: bool) -> int:
    keys = await trio.to_thread.run_sync(load_keys, settings)
    async with redis_client(settings) as client:
        usage = await key_usage(client)
    current = key_id_of(keys.codec)
    old = old_key_count(usage, keys.codec)
    if as_json:
        print(json.dumps({"current_key_id": current, "by_key": usage, "under_old_keys": old}))
        return 0
    print(f"current key id: {current}")
    for key_id, count in usage.items():
        print(f"  {key_id}: {count} conversations{'  (current)' if key_id == current else ''}")
    print(f"conversations under old keys: {old}")
    return 0


async def _rotate(settings: Settings) -> int:
    keys = await trio.to_thread.run_sync(load_keys, settings)
    codec = keys.codec
    if isinstance(codec, KeyRing):
        # Rotation is also how data stored in clear gets sealed once encryption is on.
        codec.allow_plain_reads = True
    async with redis_client(settings) as client:
        done, remaining = await rotate(client, codec, ProgressBar("re-sealing", unit="items"))
    print(f"re-sealed {done} conversations under key id {key_id_of(codec)}")
    print(f"conversations still under old keys: {remaining}")
    if remaining:
        print("run it again to finish (it is safe to interrupt and re-run)", file=sys.stderr)
        return 1
    return 0


def run_keys_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.keys_command == "status":
            return trio.run(_status, settings, args.json)
        return trio.run(_rotate, settings)
    except (KeyMismatch, SealError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except (coredis.exceptions.RedisError, OSError) as exc:
        print(f"appliance: the store is not reachable ({type(exc).__name__})", file=sys.stderr)
        return 1
