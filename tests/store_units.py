"""A real redis-server for the unit tests of the modules that keep their state in Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import coredis
import trio

from appliance.store.server import EmbeddedRedis
from tests.harness import short_tempdir


@asynccontextmanager
async def embedded_redis() -> AsyncIterator[tuple[EmbeddedRedis, coredis.Redis[bytes]]]:
    """The appliance's own redis-server (noeviction, as the daemon runs it) and a client."""
    directory = short_tempdir()
    async with trio.open_nursery() as nursery:
        server = EmbeddedRedis(directory, directory / "run", "64mb")
        await nursery.start(server.run)
        client: coredis.Redis[bytes] = coredis.Redis(unix_socket_path=str(server.socket_path))
        async with client:
            yield server, client
        nursery.cancel_scope.cancel()


async def fill_up(client: coredis.Redis[bytes]) -> None:
    """Make the store refuse writes as a full one does (OOM under noeviction)."""
    await client.config_set({"maxmemory": "1"})


async def make_room(client: coredis.Redis[bytes]) -> None:
    await client.config_set({"maxmemory": "64mb"})
