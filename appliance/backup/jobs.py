"""Making a backup: lock, snapshot, archive (authenticated under this box's key), prune.
Used by the daemon's timer, its HTTP endpoint and the CLI alike. A backup never removes the
data that a restore moved aside (`appliance.backup.previous` does that, when asked)."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import coredis
import trio

from appliance.backup import contents
from appliance.backup.archive import (
    BackupError,
    BackupInfo,
    archive_name,
    list_backups,
    prune_backups,
    remove_partials,
    write_archive,
)
from appliance.backup.authenticity import ManifestKeys
from appliance.backup.snapshot import save_snapshot
from appliance.config import Settings
from appliance.store.client import RedisClient

LOGGER = logging.getLogger("appliance.backup")

Progress = Callable[[int, int], None]
BUSY_MESSAGE: Final = "another backup or restore is running; try again when it has finished"


@contextlib.contextmanager
def exclusive(settings: Settings) -> Iterator[None]:
    """One backup or restore at a time per state dir, across processes (the daemon's
    timer, its endpoint and CLI commands)."""
    state = Path(settings.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state / contents.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(BUSY_MESSAGE) from None
        yield
    finally:
        os.close(fd)


EXTERNAL_STORE_MESSAGE: Final = (
    "backups and restores cover the embedded store only; this appliance uses the Redis at "
    "APPLIANCE_REDIS_URL, shared with other appliances: back it up with Redis' own "
    "persistence (RDB snapshots with BGSAVE or save points, and AOF with appendonly yes) "
    "on each server or cluster node, and copy those files off the machine"
)


class ExternalStore(BackupError):
    """A backup or restore was asked of an appliance whose store is an external Redis."""

    def __init__(self) -> None:
        super().__init__(EXTERNAL_STORE_MESSAGE)


def require_embedded_store(settings: Settings) -> None:
    if not settings.embedded_redis:
        raise ExternalStore()


async def make_backup(
    settings: Settings,
    client: RedisClient,
    *,
    keys: ManifestKeys,
    with_models: bool = False,
    passphrase: bytes | None = None,
    progress: Progress | None = None,
) -> BackupInfo:
    """Snapshot the store and archive it with the state files; returns the new backup."""
    require_embedded_store(settings)
    if not isinstance(client, coredis.Redis):
        raise ExternalStore()
    state, backup_dir = Path(settings.state_dir), Path(settings.backup_dir)
    with exclusive(settings):
        await trio.to_thread.run_sync(_prepare_dirs, backup_dir)
        staging = state / contents.BACKUP_STAGING
        await trio.to_thread.run_sync(_fresh_dir, staging)
        try:
            saved = await save_snapshot(client, state / contents.REDIS_DIR, staging / "dump.rdb")
            sources = await trio.to_thread.run_sync(
                lambda: contents.sources(settings, staging / "dump.rdb", with_models=with_models)
            )
            meta = {
                "snapshot_time": datetime.datetime.fromtimestamp(saved, datetime.UTC).isoformat(),
                "config_fingerprint": contents.config_fingerprint(settings),
                "key_id": keys.current_id,
                "with_models": "true" if with_models else "false",
                "hostname": os.uname().nodename,
            }
            when = await _unused_second(backup_dir)
            path = await trio.to_thread.run_sync(
                lambda: write_archive(
                    backup_dir,
                    sources,
                    meta,
                    keys=keys,
                    when=when,
                    passphrase=passphrase,
                    progress=progress,
                )
            )
        finally:
            await trio.to_thread.run_sync(lambda: shutil.rmtree(staging, ignore_errors=True))
        pruned = await trio.to_thread.run_sync(prune_backups, backup_dir, settings.backup_keep)
    for old in pruned:
        LOGGER.info("deleted old backup %s (keeping the newest %d)", old.name, settings.backup_keep)
    info = next(b for b in list_backups(backup_dir) if b.path == path)
    LOGGER.info("backup %s written (%d bytes, %d members)", path.name, info.size, len(sources))
    return info


async def _unused_second(backup_dir: Path) -> datetime.datetime:
    """Now, or the next second when a backup of this second exists: names count seconds."""
    while True:
        now = datetime.datetime.now(datetime.UTC)
        if not await trio.to_thread.run_sync(_name_taken, backup_dir, now):
            return now
        await trio.sleep(1.0 - now.microsecond / 1e6 + 0.001)


def _name_taken(backup_dir: Path, when: datetime.datetime) -> bool:
    return any((backup_dir / archive_name(when, sealed)).exists() for sealed in (False, True))


def _prepare_dirs(backup_dir: Path) -> None:
    backup_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for partial in remove_partials(backup_dir):
        LOGGER.warning("removed %s left by an interrupted backup", partial.name)


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
