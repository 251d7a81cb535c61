"""One consistent point of the store: BGSAVE, confirmed by LASTSAVE.

redis-server forks and writes the whole dataset as it was at the fork into a temporary
file, then renames it to dump.rdb; LASTSAVE moves forward once that rename happened. Since
every write of the appliance is one MULTI/EXEC transaction, the snapshot never holds half
a conversation. The finished dump is pinned with a hard link before it is archived: a later
automatic save renames a new file over dump.rdb, but cannot change the linked one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

import coredis
import trio

from appliance.backup.archive import BackupError
from appliance.store.server import RDB_NAME

LOGGER = logging.getLogger("appliance.backup")

SAVE_TIMEOUT: Final = 600.0
POLL_INTERVAL: Final = 0.05


async def _info(client: coredis.Redis[bytes]) -> dict[str, str]:
    info = await client.info("persistence")
    return {key: str(value) for key, value in info.items()}


async def _wait_for_running_save(client: coredis.Redis[bytes]) -> None:
    # Polled: redis-server has no way to announce that a save finished.
    while True:
        if (await _info(client)).get("rdb_bgsave_in_progress") != "1":
            return
        await trio.sleep(POLL_INTERVAL)


async def save_snapshot(client: coredis.Redis[bytes], data_dir: Path, pinned: Path) -> float:
    """Make redis-server save now and hard-link the result to `pinned`; returns LASTSAVE."""
    try:
        with trio.fail_after(SAVE_TIMEOUT):
            before = await client.lastsave()
            # LASTSAVE counts whole seconds: a save finishing within the second of the last
            # one would look like no save at all, so start in a later second.
            now = await client.time()
            if before >= now.replace(microsecond=0):
                await trio.sleep(1.0 - now.microsecond / 1e6 + 0.01)
            while True:
                await _wait_for_running_save(client)
                try:
                    await client.bgsave()
                    break
                except coredis.exceptions.ResponseError as exc:
                    # Another save (a save point, a second backup) started in between.
                    if "in progress" not in str(exc):
                        raise
            while True:
                await trio.sleep(POLL_INTERVAL)
                info = await _info(client)
                if info.get("rdb_bgsave_in_progress") == "1":
                    continue
                if info.get("rdb_last_bgsave_status") != "ok":
                    raise BackupError(
                        "Redis could not write its snapshot (rdb_last_bgsave_status="
                        f"{info.get('rdb_last_bgsave_status')}); check free disk space in the "
                        "state dir and the log above"
                    )
                saved = await client.lastsave()
                if saved > before:
                    break
    except trio.TooSlowError:
        raise BackupError(
            f"Redis did not finish its snapshot within {SAVE_TIMEOUT:.0f} s"
        ) from None
    await trio.to_thread.run_sync(_pin, data_dir / RDB_NAME, pinned)
    LOGGER.info("store snapshot taken at %s", saved.isoformat())
    return saved.timestamp()


def _pin(dump: Path, pinned: Path) -> None:
    pinned.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pinned.unlink(missing_ok=True)
    os.link(dump, pinned)
