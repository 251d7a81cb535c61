"""Bringing another appliance's backup here, deliberately: `appliance restore FILE
--from-other-box OTHER_ENV_FILE`, with the daemon stopped.

A restore refuses another box's archive by default. This is the way to take one on purpose:
the operator gives that box's secrets (its env file, or a file with the same `SECRET_KEY=`
and `PRIVACY_SALT=` lines, and `SECRET_KEY_PREVIOUS=`/`PRIVACY_SALT_PREVIOUS=` when that box
had a previous key). The archive must be authenticated under those keys, so it is still
proven to be that box's backup, unaltered. It is then restored like one of this box's own
(same allow-list, same rollback), and before the restored store is checked:

- this box's API keys and their usage counters replace the other box's (the other box's
  keys are hashed under its PRIVACY_SALT and would not be usable here anyway), so every
  key of this box, the admin key too, keeps working;
- every conversation is re-sealed under this box's current key (the other box's keys serve
  only to open them), so this box's configuration reads all of it from then on.

If any of that fails, the previous data is put back, as for any restore.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
import trio

from appliance.auth.apikeys import RECORD_PREFIX
from appliance.auth.budgets import USAGE_PREFIX
from appliance.backup.manifest import BackupError
from appliance.config import Settings
from appliance.envfile import EnvFileError, parse_env_file
from appliance.privacy.keys import load_keys
from appliance.privacy.rotation import KeyMismatch, rotate
from appliance.store.client import RedisClient
from appliance.store.sealing import KeyRing, SealError

LOGGER = logging.getLogger("appliance.backup")

# What stays this box's own across the import: API keys (records and the name index) and
# their usage counters.
KEPT_PATTERNS: Final = (RECORD_PREFIX + "*", USAGE_PREFIX + "*")

Kept = list[tuple[bytes, int, bytes]]  # (key, ttl in ms or 0, DUMP payload)


@dataclass(frozen=True)
class OtherBox:
    """The other box's key pairs (current first) and the ring that authenticates its
    archives."""

    pairs: tuple[tuple[str, str], ...]
    ring: KeyRing


def read_other_box(path: Path, settings: Settings, this_box: KeyRing) -> OtherBox:
    """The other box's keys from its env file (blocking: Argon2id; use a thread)."""
    try:
        status = os.stat(path)
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}") from None
    if status.st_mode & 0o077:
        raise BackupError(
            f"{path} holds another box's SECRET_KEY but is open to group or others (mode "
            f"{stat.S_IMODE(status.st_mode):04o}); run: chmod 600 {path}"
        )
    try:
        values = parse_env_file(path)
    except EnvFileError as exc:
        raise BackupError(str(exc)) from None
    secret, salt = values.get("SECRET_KEY", ""), values.get("PRIVACY_SALT", "")
    if not secret or not salt:
        raise BackupError(
            f"{path} must hold the other box's SECRET_KEY and PRIVACY_SALT (its env file, or "
            "its development.key)"
        )
    pairs = [(secret, salt)]
    previous = values.get("SECRET_KEY_PREVIOUS", ""), values.get("PRIVACY_SALT_PREVIOUS", "")
    if all(previous):
        pairs.append(previous)
    try:
        ring = KeyRing.from_settings(secret, salt, *(previous if all(previous) else ("", "")))
    except SealError as exc:
        raise BackupError(f"{path}: {exc}") from None
    if this_box.current_id in ring.ids:
        raise BackupError(
            f"{path} holds this box's own key (key id {this_box.current_id}); restore this "
            "box's backups without --from-other-box"
        )
    return OtherBox(tuple(pairs), ring)


async def keep_this_box(client: RedisClient) -> Kept:
    """This box's API keys and usage, as Redis DUMPs (taken before the data is swapped)."""
    kept: Kept = []
    for pattern in KEPT_PATTERNS:
        async for key in client.scan_iter(match=pattern):
            payload = await client.dump(key)
            if payload is None:
                continue  # expired meanwhile
            ttl = await client.pttl(key)
            kept.append((key, max(ttl, 0), payload))
    return kept


async def carry_over(client: RedisClient, settings: Settings, kept: Kept, other: OtherBox) -> None:
    """On the restored store: put this box's API keys back, re-seal under this box's key."""
    theirs = [key for pattern in KEPT_PATTERNS async for key in client.scan_iter(match=pattern)]
    dropped = await client.delete(theirs) if theirs else 0
    for key, ttl, payload in kept:
        await client.restore(key, ttl, payload, replace=True)
    resealed = 0
    for secret, salt in other.pairs:
        # This box's key seals; one of the other box's keys opens. Argon2id: in a thread.
        opening = msgspec.structs.replace(
            settings, secret_key_previous=secret, privacy_salt_previous=salt
        )
        try:
            codec = (await trio.to_thread.run_sync(load_keys, opening)).codec
            done, _ = await rotate(client, codec)
        except SealError as exc:
            raise KeyMismatch(str(exc)) from None
        resealed += done
    LOGGER.warning(
        "another box's backup: kept this box's API keys (%d records; %d of the other box's "
        "dropped) and re-sealed %d conversations under this box's key",
        len(kept),
        dropped,
        resealed,
    )
