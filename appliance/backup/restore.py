"""Restoring a backup: verify while extracting, move the current data aside, put the
backup's data in place, start the store and check that it loads; on any failure the
previous data goes back. The moved-aside data stays until the next successful backup.

`appliance restore` runs this itself when the daemon is stopped; with the daemon running
it asks the daemon (appliance.backup.service), which stops and restarts its own store.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import coredis
import msgspec
import trio

from appliance.backup import contents
from appliance.backup.archive import BackupError, Manifest, extract_archive
from appliance.backup.jobs import exclusive, require_embedded_store
from appliance.config import Settings
from appliance.llm.manifest import Manifest as ModelManifest
from appliance.privacy.rotation import KeyMismatch, check_keys
from appliance.store.access import daemon_store_running
from appliance.store.client import RedisClient
from appliance.store.sealing import Codec
from appliance.store.server import RDB_NAME, EmbeddedRedis

LOGGER = logging.getLogger("appliance.backup")

Progress = Callable[[int, int], None]


class RestoreReport(msgspec.Struct):
    """What an operator is told after a restore."""

    archive: str
    created_utc: str
    keys: int
    conversations: int
    previous_data: str
    models_restored: bool
    models_missing: list[str]


@dataclass
class Staged:
    directory: Path
    manifest: Manifest


@dataclass
class Swap:
    """What was moved where, so that it can be undone in reverse.

    Each move is written to a journal in the state dir (and fsynced) before it happens:
    a restore killed half-way is rolled back by `recover_interrupted` at the next start.
    """

    aside: Path
    journal: Path
    moves: list[tuple[Path, Path]] = field(default_factory=list)


def stage(
    settings: Settings, archive: Path, passphrase: bytes | None, progress: Progress | None
) -> Staged:
    """Verify the archive while extracting it next to the live data (same file system)."""
    staging = Path(settings.state_dir) / contents.RESTORE_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    manifest = extract_archive(archive, staging, passphrase=passphrase, progress=progress)
    names = [member.name for member in manifest.members]
    known = (contents.STATE_PREFIX, contents.MODELS_PREFIX)
    unknown = [n for n in names if not n.startswith(known) and n != contents.REDIS_MEMBER]
    problem = None
    if contents.REDIS_MEMBER not in names:
        problem = f"{archive.name} holds no store snapshot ({contents.REDIS_MEMBER})"
    elif unknown:
        problem = f"{archive.name} holds a member this appliance does not know: {unknown[0]}"
    if problem is not None:
        shutil.rmtree(staging, ignore_errors=True)
        raise BackupError(problem)
    return Staged(staging, manifest)


def _journal(swap: Swap, entry: dict[str, str]) -> None:
    with swap.journal.open("a", encoding="utf-8") as journal:
        journal.write(json.dumps(entry) + "\n")
        journal.flush()
        os.fsync(journal.fileno())


def _move(swap: Swap, source: Path, target: Path) -> None:
    _journal(swap, {"from": str(source), "to": str(target)})
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.move(source, target)
    swap.moves.append((source, target))


def swap_in(settings: Settings, staged: Staged) -> Swap:
    """Move the current data aside and the staged data into place (undone on failure)."""
    state, models = Path(settings.state_dir), Path(settings.models_dir)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S-%f")
    swap = Swap(state / f"{contents.RESTORE_PREVIOUS}{stamp}", state / contents.RESTORE_JOURNAL)
    swap.aside.mkdir(mode=0o700)
    _journal(swap, {"aside": str(swap.aside)})
    names = [member.name for member in staged.manifest.members]
    with_models = contents.includes_models(names)
    try:
        redis_dir = state / contents.REDIS_DIR
        if redis_dir.exists():
            _move(swap, redis_dir, swap.aside / contents.REDIS_DIR)
        for relative in contents.state_files(settings):
            _move(swap, state / relative, swap.aside / "state" / relative)
        if with_models:
            for relative in contents.model_files(settings):
                _move(swap, models / relative, swap.aside / "models" / relative)
        redis_dir.mkdir(mode=0o700)
        _move(swap, staged.directory / contents.REDIS_MEMBER, redis_dir / RDB_NAME)
        for name in names:
            if name.startswith(contents.STATE_PREFIX):
                target = state / name.removeprefix(contents.STATE_PREFIX)
                _move(swap, staged.directory / name, target)
            elif with_models and name.startswith(contents.MODELS_PREFIX):
                target = models / name.removeprefix(contents.MODELS_PREFIX)
                _move(swap, staged.directory / name, target)
    except BaseException:
        roll_back(swap)
        raise
    return swap


def _undo(moves: list[tuple[Path, Path]]) -> None:
    for source, target in reversed(moves):
        if not target.exists():
            continue  # journaled, but the process died before the move itself
        if source.is_dir() and not source.is_symlink():
            # The restored store recreated the path (files of its own): they go.
            shutil.rmtree(source)
        elif source.exists() or source.is_symlink():
            source.unlink()
        source.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.move(target, source)


def roll_back(swap: Swap) -> None:
    """Put the previous data back: undo every move, newest first."""
    _undo(swap.moves)
    shutil.rmtree(swap.aside, ignore_errors=True)
    swap.journal.unlink(missing_ok=True)


def finish(swap: Swap) -> None:
    """The restored data loaded: the restore can no longer be rolled back automatically."""
    swap.journal.unlink(missing_ok=True)


def recover_interrupted(settings: Settings) -> bool:
    """Roll back a restore that was killed half-way; True when there was one.

    Call it holding the backup lock and before the store starts."""
    journal = Path(settings.state_dir) / contents.RESTORE_JOURNAL
    try:
        lines = journal.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return False
    moves: list[tuple[Path, Path]] = []
    aside: Path | None = None
    for line in lines:
        try:
            entry = json.loads(line)
            if "aside" in entry:
                aside = Path(entry["aside"])
            else:
                moves.append((Path(entry["from"]), Path(entry["to"])))
        except (ValueError, TypeError, KeyError):
            continue  # a line cut by the crash: its move never started
    _undo(moves)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(Path(settings.state_dir) / contents.RESTORE_STAGING, ignore_errors=True)
    journal.unlink()
    LOGGER.warning("a restore was interrupted; the data from before it is back in place")
    return True


def recover_before_start(settings: Settings) -> None:
    """At daemon start (and before commands start the store): undo a killed restore."""
    if (Path(settings.state_dir) / contents.RESTORE_JOURNAL).exists():
        with exclusive(settings):
            recover_interrupted(settings)


async def check_restored(client: RedisClient, codec: Codec) -> tuple[int, int]:
    """The restored store answers and this configuration can read it: (keys, conversations)."""
    usage = await check_keys(client, codec)
    return await client.dbsize(), sum(usage.values())


def missing_models(staged: Staged, settings: Settings) -> list[str]:
    """Models the backup's installation had that this box lacks (weights not restored)."""
    path = staged.directory / contents.MODELS_MANIFEST_MEMBER
    try:
        recorded = msgspec.json.decode(path.read_bytes(), type=ModelManifest)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return []
    models = Path(settings.models_dir)
    return sorted(r.name for r in recorded.models if not (models / r.file).is_file())


def report(
    archive: Path, staged: Staged, swap: Swap, counts: tuple[int, int], missing: list[str]
) -> RestoreReport:
    names = [member.name for member in staged.manifest.members]
    return RestoreReport(
        archive=archive.name,
        created_utc=staged.manifest.created_utc,
        keys=counts[0],
        conversations=counts[1],
        previous_data=swap.aside.name,
        models_restored=contents.includes_models(names),
        models_missing=[] if contents.includes_models(names) else missing,
    )


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, KeyMismatch | BackupError):
        return str(exc)
    if isinstance(exc, coredis.exceptions.RedisError | OSError):
        return f"the store did not start on the restored data ({type(exc).__name__})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def restore_offline(
    settings: Settings,
    archive: Path,
    codec: Codec,
    *,
    passphrase: bytes | None = None,
    progress: Progress | None = None,
) -> RestoreReport:
    """Restore with the daemon stopped: this process starts the store to check the data."""
    require_embedded_store(settings)
    if await daemon_store_running(settings):
        raise BackupError("the store is running (the daemon is up): restore through the daemon")
    with exclusive(settings):
        await trio.to_thread.run_sync(recover_interrupted, settings)
        staged = await trio.to_thread.run_sync(stage, settings, archive, passphrase, progress)
        try:
            missing = missing_models(staged, settings)
            swap = await trio.to_thread.run_sync(swap_in, settings, staged)
            try:
                counts = await _start_and_check(settings, codec)
                await trio.to_thread.run_sync(finish, swap)
            except Exception as exc:
                await trio.to_thread.run_sync(roll_back, swap)
                raise BackupError(
                    f"the restored data did not load: {describe_failure(exc)}; the previous "
                    "data is back in place"
                ) from None
        finally:
            await trio.to_thread.run_sync(
                lambda: shutil.rmtree(staged.directory, ignore_errors=True)
            )
    LOGGER.info("restored %s; previous data kept in %s", archive.name, swap.aside.name)
    return report(archive, staged, swap, counts, missing)


async def _start_and_check(settings: Settings, codec: Codec) -> tuple[int, int]:
    server = EmbeddedRedis(
        Path(settings.state_dir), Path(settings.runtime_dir), settings.redis_maxmemory
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        client: coredis.Redis[bytes] = coredis.Redis(unix_socket_path=str(server.socket_path))
        async with client:
            counts = await check_restored(client, codec)
        nursery.cancel_scope.cancel()
    return counts
