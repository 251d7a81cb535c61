"""Which store is which: a random id per store, and the appliance answering on a bind.

A CLI command and a daemon use the same store when their store ids match. The id says
nothing about the box (it is random, made once), so the daemon shows it on its open
`/api/v1/health/live` instead of a path. The embedded store's id lives in the state dir
(`.store-id`: a dot file, so backups leave it out and a restore keeps the box's id); an
external Redis, shared by several appliances, keeps its id in the Redis itself.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any, Final

import httpx
import trio
from coredis.tokens import PureToken

from appliance.config import Settings
from appliance.local_api import api_base, api_verify
from appliance.store.client import RedisClient, connect

IDENTITY_FILE: Final = ".store-id"
IDENTITY_KEY: Final = "appliance:store-id"
LIVE_PATH: Final = "/api/v1/health/live"
PROBE_TIMEOUT: Final = 2.0


def new_identity() -> str:
    return secrets.token_hex(8)


def embedded_identity(state_dir: Path, *, create: bool) -> str | None:
    """The embedded store's id (made on first use when `create`); None when there is none."""
    path = state_dir / IDENTITY_FILE
    if create:
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(new_identity() + "\n")
    try:
        text = path.read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return text or None


async def external_identity(client: RedisClient) -> str:
    """An external Redis's id, made by the first appliance that asks."""
    await client.set(IDENTITY_KEY, new_identity(), condition=PureToken.NX)
    value = await client.get(IDENTITY_KEY)
    return value.decode() if value is not None else ""


async def appliance_answering(settings: Settings) -> dict[str, Any] | None:
    """What an appliance answering on APPLIANCE_BIND says on its live endpoint; None when
    nothing (or something else) answers there, or the bind's port is 0 (picked at start)."""
    if settings.port == 0:
        return None
    try:
        # Loopback: no proxy, .netrc or CA bundle from the environment applies.
        async with httpx.AsyncClient(
            timeout=PROBE_TIMEOUT, trust_env=False, verify=api_verify(settings)
        ) as client:
            answer = await client.get(api_base(settings) + LIVE_PATH)
        body = answer.json()
    except (httpx.HTTPError, ValueError):
        return None
    if answer.status_code != 200 or not isinstance(body, dict) or body.get("status") != "alive":
        return None
    return body


async def our_store_id(settings: Settings) -> str | None:
    """The id of the store these settings name; None when it has none yet."""
    if settings.embedded_redis:
        state = Path(settings.state_dir)
        return await trio.to_thread.run_sync(lambda: embedded_identity(state, create=False))
    client = connect(settings.redis_url, connect_timeout=PROBE_TIMEOUT)
    async with client:
        value = await client.get(IDENTITY_KEY)
    return value.decode() if value is not None else None
