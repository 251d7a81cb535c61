"""Restoring a backup: admit it, verify while extracting, move the current data aside,
put the backup's data in place, start the store and check that it loads; on any failure the
previous data goes back. The moved-aside data stays (`appliance.backup.previous`).

An archive is admitted before anything is extracted or moved: it must be authenticated for
this box (its manifest's tag verifies under the current or previous key; a format 1
archive only with `unauthenticated`), and every member must be on the allow-list of its
format (`appliance.backup.allowlist`). Another box's archive comes in only through
`appliance.backup.other_box`, never here by default.

`appliance restore` runs this itself when the daemon is stopped; with the daemon running
it asks the daemon (appliance.backup.service), which stops and restarts its own store.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

import coredis
import msgspec
import trio

from appliance.backup import contents
from appliance.backup.allowlist import Plan, plan_restore
from appliance.backup.archive import BackupError, Manifest, extract_archive
from appliance.backup.authenticity import Authenticity, ManifestKeys, key_ids
from appliance.backup.jobs import exclusive, require_embedded_store
from appliance.backup.previous import check_room, new_name
from appliance.backup.reader import Admit
from appliance.config import Settings
from appliance.llm.manifest import MANIFEST_NAME, ModelRecord, manifest_lock, read_manifest
from appliance.llm.manifest import Manifest as ModelManifest
from appliance.privacy.rotation import KeyMismatch, check_keys
from appliance.store.access import daemon_store_running
from appliance.store.client import RedisClient
from appliance.store.sealing import Codec
from appliance.store.server import EmbeddedRedis

LOGGER = logging.getLogger("appliance.backup")

Progress = Callable[[int, int], None]
_T = TypeVar("_T")
MERGED_MODELS_MANIFEST: Final = "models-manifest.merged"  # in the staging dir, never a member name


class RestoreReport(msgspec.Struct):
    """What an operator is told after a restore."""

    archive: str
    created_utc: str
    keys: int
    conversations: int
    previous_data: str
    models_restored: bool
    models_missing: list[str]
    # Whose backup it was: the key id in its manifest ("" for format 1) and in words.
    key_id: str = ""
    authenticity: str = ""


@dataclass(frozen=True)
class RestoreOptions:
    """What an operator allowed beyond this box's own authenticated backups."""

    unauthenticated: bool = False  # a format 1 archive, made before authentication


@dataclass
class Staged:
    directory: Path
    manifest: Manifest
    plan: Plan
    authenticity: Authenticity


@dataclass
class Swap:
    """What was moved where, so that it can be undone in reverse.

    Each move is written to a journal in the state dir (and fsynced) before it happens:
    a restore killed half-way is rolled back by `recover_interrupted` at the next start.
    """

    aside: Path
    journal: Path
    moves: list[tuple[Path, Path]] = field(default_factory=list)


OTHER_BOX_HINT: Final = (
    "to bring another box's data here, stop the daemon and run: appliance restore FILE "
    "--from-other-box OTHER_ENV_FILE (that box's SECRET_KEY and PRIVACY_SALT; this box's "
    "API keys are kept)"
)


def refuse_provenance(authenticity: Authenticity, options: RestoreOptions) -> None:
    """Refuse an archive this box did not make, unless the operator said otherwise."""
    if authenticity.provenance == "other_box":
        raise BackupError(
            f"made by the appliance with key id {authenticity.key_id}, not by this one "
            f"({key_ids(authenticity.box_ids)}); nothing was changed; {OTHER_BOX_HINT}"
        )
    if authenticity.provenance == "unauthenticated" and not options.unauthenticated:
        raise BackupError(
            "a format 1 backup, made before backups were authenticated: nothing shows that "
            "this box made it, so it is refused (nothing was changed); if you know where it "
            "came from, restore it with: appliance restore FILE --unauthenticated"
        )


def admission(settings: Settings, options: RestoreOptions, plans: list[Plan]) -> Admit:
    """The check of an archive's manifest before anything is extracted; the plan goes into
    `plans`."""

    def admit(manifest: Manifest, authenticity: Authenticity) -> None:
        refuse_provenance(authenticity, options)
        plans.append(plan_restore(settings, manifest))

    return admit


def stage(
    settings: Settings,
    archive: Path,
    keys: ManifestKeys,
    options: RestoreOptions,
    passphrase: bytes | None,
    progress: Progress | None,
) -> Staged:
    """Admit the archive, then verify it while extracting it next to the live data (same
    file system)."""
    check_room(settings)
    staging = Path(settings.state_dir) / contents.RESTORE_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    plans: list[Plan] = []
    checked = extract_archive(
        archive,
        staging,
        keys=keys,
        admit=admission(settings, options, plans),
        passphrase=passphrase,
        progress=progress,
    )
    return Staged(staging, checked.manifest, plans[0], checked.authenticity)


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
    """Move the current data aside and the staged data into place (undone on failure).

    Only the plan's destinations are written. The models dir is touched only for a backup
    made with models, and then only the model files it restores (and the models manifest's
    records of them) are replaced; the other models stay where they are.
    """
    state, models = Path(settings.state_dir), Path(settings.models_dir)
    swap = Swap(
        state / new_name(datetime.datetime.now(datetime.UTC)), state / contents.RESTORE_JOURNAL
    )
    swap.aside.mkdir(mode=0o700)
    _journal(swap, {"aside": str(swap.aside)})
    restored_models = staged.plan.of_kind("model")
    try:
        redis_dir = state / contents.REDIS_DIR
        if redis_dir.exists():
            _move(swap, redis_dir, swap.aside / contents.REDIS_DIR)
        for relative in contents.state_files(settings):
            _move(swap, state / relative, swap.aside / "state" / relative)
        for placement in restored_models:
            assert placement.target is not None
            if os.path.lexists(placement.target):
                _move(swap, placement.target, swap.aside / "models" / placement.target.name)
        redis_dir.mkdir(mode=0o700)
        for placement in staged.plan.placements:
            if placement.target is not None:
                _move(swap, staged.directory / placement.member, placement.target)
        if restored_models:
            _swap_models_manifest(swap, staged, models, [p.member for p in restored_models])
    except BaseException:
        roll_back(swap)
        raise
    return swap


def _swap_models_manifest(swap: Swap, staged: Staged, models: Path, members: list[str]) -> None:
    """The live models manifest with the restored models' records taken from the backup
    (dropped when it has none: the registry then checks those files afresh)."""
    names = {m.removeprefix(contents.MODELS_PREFIX).removesuffix(".gguf") for m in members}
    backup = _recorded_models(staged)
    with manifest_lock(models):
        records: dict[str, ModelRecord] = {
            r.name: r for r in (read_manifest(models) or []) if r.name not in names
        }
        records.update({r.name: r for r in backup if r.name in names})
        merged = staged.directory / MERGED_MODELS_MANIFEST
        manifest = ModelManifest(models=sorted(records.values(), key=lambda r: r.name))
        merged.write_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n")
        live = models / MANIFEST_NAME
        if live.exists():
            _move(swap, live, swap.aside / "models" / MANIFEST_NAME)
        _move(swap, merged, live)


def _recorded_models(staged: Staged) -> list[ModelRecord]:
    path = staged.directory / contents.MODELS_MANIFEST_MEMBER
    try:
        return msgspec.json.decode(path.read_bytes(), type=ModelManifest).models
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return []


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
    models = Path(settings.models_dir)
    restored = {p.member.removeprefix(contents.MODELS_PREFIX) for p in staged.plan.of_kind("model")}
    return sorted(
        r.name
        for r in _recorded_models(staged)
        if r.file not in restored and model_file_absent(models, r.file)
    )


def model_file_absent(models: Path, file: str) -> bool:
    # A name from the backup's manifest: only a plain file name is looked up.
    return contents.model_problem(file) is not None or not (models / file).is_file()


def report(
    archive: Path, staged: Staged, swap: Swap, counts: tuple[int, int], missing: list[str]
) -> RestoreReport:
    return RestoreReport(
        archive=archive.name,
        created_utc=staged.manifest.created_utc,
        keys=counts[0],
        conversations=counts[1],
        previous_data=swap.aside.name,
        models_restored=bool(staged.plan.of_kind("model")),
        models_missing=missing,
        key_id=staged.authenticity.key_id,
        authenticity=staged.authenticity.describe(),
    )


def describe_failure(exc: BaseException) -> str:
    # A failure inside the store's nursery (with_store) comes wrapped in exception groups.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, KeyMismatch | BackupError):
        return str(exc)
    if isinstance(exc, coredis.exceptions.RedisError | OSError):
        return f"the store did not start on the restored data ({type(exc).__name__})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


Prepare = Callable[[RedisClient], Awaitable[None]]


async def restore_offline(
    settings: Settings,
    archive: Path,
    codec: Codec,
    keys: ManifestKeys,
    *,
    options: RestoreOptions | None = None,
    passphrase: bytes | None = None,
    progress: Progress | None = None,
    prepare: Prepare | None = None,
) -> RestoreReport:
    """Restore with the daemon stopped: this process starts the store to check the data.

    `keys` authenticate the archive; `prepare` runs on the restored store before the check.
    """
    require_embedded_store(settings)
    if await daemon_store_running(settings):
        raise BackupError("the store is running (the daemon is up): restore through the daemon")
    options = options or RestoreOptions()
    with exclusive(settings):
        await trio.to_thread.run_sync(recover_interrupted, settings)
        staged = await trio.to_thread.run_sync(
            stage, settings, archive, keys, options, passphrase, progress
        )
        try:
            missing = missing_models(staged, settings)
            swap = await trio.to_thread.run_sync(swap_in, settings, staged)
            try:
                counts = await start_and_check(settings, codec, prepare)
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


async def start_and_check(
    settings: Settings, codec: Codec, prepare: Prepare | None = None
) -> tuple[int, int]:
    """Start the store on the data in place, run `prepare`, check it loads; then stop it."""

    async def check(client: RedisClient) -> tuple[int, int]:
        if prepare is not None:
            await prepare(client)
        return await check_restored(client, codec)

    return await with_store(settings, check)


async def with_store(settings: Settings, action: Callable[[RedisClient], Awaitable[_T]]) -> _T:
    """Run `action` on an embedded store started for it on the state dir's data."""
    server = EmbeddedRedis(
        Path(settings.state_dir), Path(settings.runtime_dir), settings.redis_maxmemory
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        client: coredis.Redis[bytes] = coredis.Redis(unix_socket_path=str(server.socket_path))
        async with client:
            result = await action(client)
        nursery.cancel_scope.cancel()
    return result
