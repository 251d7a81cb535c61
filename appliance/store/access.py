"""Reaching the store from a CLI command, whether or not the daemon is running.

With the daemon running, commands use its Redis; with it stopped, they start the embedded
redis-server themselves for the duration (never a second one beside a running daemon's:
two servers appending to one AOF would corrupt it). With APPLIANCE_REDIS_URL they use that
Redis, a server or a cluster (`redis+cluster://`), as the daemon does.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import coredis
import trio

from appliance.config import Settings
from appliance.store.client import RedisClient, check_mode, connect
from appliance.store.server import EmbeddedRedis


async def answers(url: str) -> bool:
    """Whether a Redis server answers PING at `url`."""
    try:
        client = connect(url, connect_timeout=2)
        async with client:
            await client.ping()
    except (coredis.exceptions.RedisError, OSError):
        return False
    except ExceptionGroup as group:
        # coredis's pool raises a refused connection from inside its task group.
        _, rest = group.split((coredis.exceptions.RedisError, OSError))
        if rest is not None:
            raise
        return False
    return True


def store_url(settings: Settings) -> str:
    """The URL of the store the daemon uses; give it to `connect`, which knows the cluster
    schemes."""
    if settings.embedded_redis:
        return f"unix://{settings.redis_socket}"
    return settings.redis_url


async def daemon_store_running(settings: Settings) -> bool:
    """Whether the embedded store is being served (by the daemon or another command)."""
    return settings.embedded_redis and await answers(store_url(settings))


@contextlib.asynccontextmanager
async def redis_client(settings: Settings) -> AsyncIterator[RedisClient]:
    """A client to the store, starting the embedded server only if nothing serves it.

    Errors of the caller's block and of connecting come out as themselves, not inside an
    exception group, so that commands can name them."""
    url = store_url(settings)
    if not settings.embedded_redis:
        await check_mode(url)
    failure: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            if settings.embedded_redis and not await answers(url):
                server = EmbeddedRedis(
                    Path(settings.state_dir), Path(settings.runtime_dir), settings.redis_maxmemory
                )
                await nursery.start(server.run)
            client = connect(url)
            async with client:
                try:
                    yield client
                except Exception as exc:
                    failure = exc
            nursery.cancel_scope.cancel()
    except ExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) != 1:
            raise
        raise leaves[0] from None
    if failure is not None:
        raise failure


def _leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    found: list[Exception] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found
