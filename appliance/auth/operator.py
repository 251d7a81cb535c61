"""A short-lived admin key for CLI commands that ask the running daemon over HTTP."""

from __future__ import annotations

import os
from typing import Final

from appliance.auth.apikeys import KeyStore
from appliance.config import Settings
from appliance.store.access import daemon_store_url
from appliance.store.client import connect

OPERATOR_KEY_TTL: Final = 3600


async def operator_key(settings: Settings) -> str:
    """An admin key valid for an hour, made in the store the daemon uses (never a store of
    the command's own: the key would be unknown to the daemon)."""
    client = connect(await daemon_store_url(settings), connect_timeout=5)
    async with client:
        store = KeyStore(lambda: client)
        return await store.create_ephemeral(f"operator-cli-{os.getpid()}", OPERATOR_KEY_TTL)
