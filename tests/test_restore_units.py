"""Restores with the daemon stopped, in this process, on real state dirs, real archives and
the real redis-server: what comes back and what is kept aside, whose archives are refused,
a restore that does not load or cannot be swapped in is undone, one killed half-way is
rolled back at the next start (whatever the crash left of its journal), and models are
replaced only as restored.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import shutil
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from typing import Final, TypeVar

import coredis
import pytest
import trio

from appliance.backup import contents
from appliance.backup.archive import BackupError, Source, write_archive
from appliance.backup.authenticity import Authenticity
from appliance.backup.jobs import make_backup
from appliance.backup.manifest import encode_manifest
from appliance.backup.restore import (
    RestoreOptions,
    describe_failure,
    finish,
    recover_before_start,
    recover_interrupted,
    refuse_provenance,
    restore_offline,
    stage,
    swap_in,
    with_store,
)
from appliance.config import Settings, load_settings
from appliance.llm.manifest import read_manifest, save_manifest
from appliance.llm.registry import ModelRegistry
from appliance.privacy.keys import Keys, load_keys
from appliance.privacy.rotation import KeyMismatch
from appliance.store.client import Store
from appliance.store.conversations import Conversations
from appliance.store.sealing import KeyRing
from tests.backup_streams import manifest_of, tar
from tests.harness import install_tiny_model, running_daemon, short_tempdir

T = TypeVar("T")
THIS_BOX: Final = {"SECRET_KEY": "restore-units-secret-" + "r" * 20, "PRIVACY_SALT": "r-salt"}
OTHER_BOX: Final = {"SECRET_KEY": "restore-units-other-" + "o" * 20, "PRIVACY_SALT": "o-salt"}
DAY: Final = 86_400
OTHER_BOX_HINT: Final = (
    "to bring another box's data here, stop the daemon and run: appliance restore FILE "
    "--from-other-box OTHER_ENV_FILE (that box's SECRET_KEY and PRIVACY_SALT; this box's "
    "API keys are kept)"
)
FORMAT_1_REFUSED: Final = (
    "a format 1 backup, made before backups were authenticated: nothing shows that this box "
    "made it, so it is refused (nothing was changed); if you know where it came from, "
    "restore it with: appliance restore FILE --unauthenticated"
)


@dataclass
class Box:
    state: Path
    settings: Settings
    keys: Keys
    ring: KeyRing

    async def store(self, action: Callable[[coredis.Redis[bytes]], Awaitable[T]]) -> T:
        """`action` on this box's store, started for it (the daemon is stopped)."""

        async def run(client: object) -> T:
            assert isinstance(client, coredis.Redis)
            return await action(client)

        return await with_store(self.settings, run)

    async def write(self, note: str, conversations: int) -> None:
        """The note, and that many conversations sealed under this box's key."""

        async def action(client: coredis.Redis[bytes]) -> None:
            await client.set("note", note)
            async with trio.open_nursery() as nursery:
                store = Store(f"unix://{self.settings.redis_socket}")
                await nursery.start(store.run)
                chats = Conversations(store, self.keys.codec, retention_seconds=7 * DAY)
                for number in range(conversations):
                    await chats.record_exchange(
                        f"{number:032x}",
                        owner="alice",
                        model="tiny",
                        question=f"{note} {number}",
                        answer="ok",
                        prompt_tokens=1,
                        completion_tokens=1,
                    )
                nursery.cancel_scope.cancel()

        await self.store(action)

    async def note(self) -> str | None:
        async def action(client: coredis.Redis[bytes]) -> str | None:
            value = await client.get("note")
            return None if value is None else value.decode()

        return await self.store(action)

    async def backup(self, *, with_models: bool = False) -> Path:
        async def action(client: coredis.Redis[bytes]) -> Path:
            info = await make_backup(self.settings, client, keys=self.ring, with_models=with_models)
            return info.path

        return await self.store(action)

    async def restore(self, archive: Path, **kwargs: object) -> object:
        return await restore_offline(
            self.settings,
            archive,
            self.keys.codec,
            self.ring,
            **kwargs,  # type: ignore[arg-type]
        )

    def aside(self) -> list[Path]:
        return sorted(self.state.glob(contents.RESTORE_PREVIOUS + "*"))

    def files(self, under: str = "state") -> dict[str, bytes]:
        root = self.state / under if under else self.state
        return {
            path.relative_to(root).as_posix(): path.read_bytes()
            for path in sorted(root.rglob("*"))
            if path.is_file()
        }


async def make_box(secrets: dict[str, str] = THIS_BOX, **environ: str) -> Box:
    state = short_tempdir()
    env_file = short_tempdir() / "appliance.env"
    env_file.write_text("")
    env_file.chmod(0o600)
    settings = load_settings({"APPLIANCE_STATE_DIR": str(state), **secrets, **environ}, env_file)
    keys = await trio.to_thread.run_sync(load_keys, settings)
    assert keys.ring is not None
    return Box(state, settings, keys, keys.ring)


def write_state(box: Box, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = box.state / "state" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


async def box_with_a_backup() -> tuple[Box, Path]:
    """A box whose backup holds note `before`, 2 conversations and two state files; its data
    changed since (note `after`, 3 conversations, another state file)."""
    box = await make_box()
    write_state(box, {"notes.txt": "before", "deep/er/x.txt": "deep"})
    await box.write("before", 2)
    archive = await box.backup()
    await box.write("after", 3)
    write_state(box, {"notes.txt": "after", "new.txt": "new"})
    return box, archive


def members_of(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as opened:
        found = {}
        for info in opened.getmembers():
            handle = opened.extractfile(info)
            assert handle is not None
            found[info.name] = handle.read()
    return found


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- what a restore does --------------------------------------------------------------------


async def test_a_restore_brings_the_backup_back_and_keeps_what_it_replaced() -> None:
    with trio.fail_after(120):
        box, archive = await box_with_a_backup()
        live_before = box.files()
        report = await box.restore(archive)
        [aside] = box.aside()
        assert report.archive == archive.name  # type: ignore[attr-defined]
        assert report.previous_data == aside.name  # type: ignore[attr-defined]
        assert report.conversations == 2  # type: ignore[attr-defined]
        assert report.keys == await box.store(lambda client: client.dbsize())  # type: ignore[attr-defined]
        assert report.key_id == box.ring.current_id  # type: ignore[attr-defined]
        assert report.authenticity == (  # type: ignore[attr-defined]
            f"authenticated for this box (key id {box.ring.current_id}, the current key)"
        )
        assert (report.models_restored, report.models_missing) == (False, [])  # type: ignore[attr-defined]
        created = json.loads(members_of(archive)["manifest.json"])["created_utc"]
        assert report.created_utc == created  # type: ignore[attr-defined]
        # The backup's data is live; what it replaced is aside, private.
        assert await box.note() == "before"
        assert box.files() == {"notes.txt": b"before", "deep/er/x.txt": b"deep"}
        assert box.files(f"{aside.name}/state/state") == live_before
        assert (aside / "redis").is_dir()
        assert mode(aside) == 0o700
        assert mode(aside / "state" / "state" / "deep" / "er") == 0o700
        assert mode(box.state / "redis") == 0o700
        # Nothing is left to roll back, and no work files remain.
        assert not (box.state / contents.RESTORE_JOURNAL).exists()
        assert not (box.state / contents.RESTORE_STAGING).exists()
        recover_before_start(box.settings)
        assert await box.note() == "before"
        assert box.aside() == [aside]


async def test_what_a_box_without_a_store_dir_had_is_put_aside_privately() -> None:
    # A box whose store never wrote its directory (restored onto before it first started):
    # its other files still go aside, and the directory holding them is the owner's alone.
    with trio.fail_after(120):
        box, archive = await box_with_a_backup()
        shutil.rmtree(box.state / contents.REDIS_DIR)
        live_before = box.files()
        report = await box.restore(archive)
        [aside] = box.aside()
        assert report.previous_data == aside.name  # type: ignore[attr-defined]
        assert box.files(f"{aside.name}/state/state") == live_before
        assert mode(aside) == 0o700
        assert await box.note() == "before"


async def test_the_store_check_may_prepare_the_restored_data() -> None:
    with trio.fail_after(120):
        box, archive = await box_with_a_backup()

        async def prepare(client: object) -> None:
            assert isinstance(client, coredis.Redis)
            await client.set("prepared", "yes")

        await box.restore(archive, prepare=prepare)
        assert await box.store(lambda client: client.get("prepared")) == b"yes"


async def test_a_restore_that_does_not_load_puts_the_previous_data_back() -> None:
    with trio.fail_after(120):
        box, archive = await box_with_a_backup()
        live = box.files()

        async def prepare(client: object) -> None:
            raise RuntimeError("the check failed\nsecond line")

        with pytest.raises(BackupError) as caught:
            await box.restore(archive, prepare=prepare)
        assert str(caught.value) == (
            "the restored data did not load: RuntimeError: the check failed; the previous data "
            "is back in place"
        )
        assert await box.note() == "after"
        assert box.files() == live
        assert box.aside() == []
        assert not (box.state / contents.RESTORE_JOURNAL).exists()
        assert not (box.state / contents.RESTORE_STAGING).exists()


async def test_data_sealed_under_a_key_this_box_lacks_is_not_loaded() -> None:
    with trio.fail_after(120):
        other = await make_box(OTHER_BOX)
        await other.write("theirs", 2)
        snapshot = members_of(await other.backup())["redis/dump.rdb"]
        box, _ = await box_with_a_backup()
        work = short_tempdir()
        dump = work / "dump.rdb"
        dump.write_bytes(snapshot)
        # Authenticated by this box, so only the load check can refuse it.
        archive = write_archive(
            work,
            [Source("redis/dump.rdb", dump)],
            {"with_models": "false"},
            keys=box.ring,
            when=datetime.datetime.now(datetime.UTC),
        )
        with pytest.raises(BackupError) as caught:
            await box.restore(archive)
        assert str(caught.value) == (
            f"the restored data did not load: stored data was sealed with key id "
            f"{other.ring.current_id} (2 conversations); set SECRET_KEY_PREVIOUS and "
            "PRIVACY_SALT_PREVIOUS to the key and salt it was written with; the previous data "
            "is back in place"
        )
        assert await box.note() == "after"
        assert box.aside() == []


async def test_a_swap_that_fails_half_way_is_undone_before_anything_starts() -> None:
    with trio.fail_after(120):
        box, archive = await box_with_a_backup()
        live = box.files()
        # The redis dir replaced by a dangling symlink: it is not moved aside, so the new one
        # cannot be made once the state files are already aside.
        redis = box.state / "redis"
        (box.state / "redis-elsewhere").mkdir()
        os.rename(redis, box.state / "redis-elsewhere" / "redis")
        redis.symlink_to(box.state / "nowhere")
        with pytest.raises(FileExistsError):
            await box.restore(archive)
        assert box.files() == live
        assert box.aside() == []
        assert not (box.state / contents.RESTORE_JOURNAL).exists()
        assert not (box.state / contents.RESTORE_STAGING).exists()


# --- which archives are admitted ------------------------------------------------------------


def test_only_this_boxs_authenticated_archives_pass_by_default() -> None:
    ids = ("aaaaaaaa", "bbbbbbbb")
    refuse_provenance(Authenticity("this_box", "bbbbbbbb", ids), RestoreOptions())
    with pytest.raises(BackupError) as caught:
        refuse_provenance(Authenticity("other_box", "cccccccc", ids), RestoreOptions(True))
    assert str(caught.value) == (
        "made by the appliance with key id cccccccc, not by this one (key ids aaaaaaaa "
        f"(current) and bbbbbbbb (previous)); nothing was changed; {OTHER_BOX_HINT}"
    )
    with pytest.raises(BackupError) as caught:
        refuse_provenance(Authenticity("unauthenticated", "", ids), RestoreOptions())
    assert str(caught.value) == FORMAT_1_REFUSED
    refuse_provenance(
        Authenticity("unauthenticated", "", ids), RestoreOptions(unauthenticated=True)
    )
    assert RestoreOptions().unauthenticated is False
    with pytest.raises(FrozenInstanceError):
        RestoreOptions().unauthenticated = True  # type: ignore[misc]


async def test_another_boxs_archive_is_refused_and_nothing_changes() -> None:
    with trio.fail_after(120):
        other = await make_box(OTHER_BOX)
        await other.write("theirs", 1)
        archive = await other.backup()
        box, _ = await box_with_a_backup()
        live = box.files("")
        with pytest.raises(BackupError) as caught:
            await box.restore(archive, options=RestoreOptions(unauthenticated=True))
        assert str(caught.value) == (
            f"{archive.name}: made by the appliance with key id {other.ring.current_id}, not "
            f"by this one (key id {box.ring.current_id}, no previous key); nothing was "
            f"changed; {OTHER_BOX_HINT}"
        )
        assert box.files("") == live
        assert await box.note() == "after"


async def test_a_format_1_archive_needs_the_operators_word() -> None:
    with trio.fail_after(120):
        box, archive = await box_with_a_backup()
        members = {"redis/dump.rdb": members_of(archive)["redis/dump.rdb"]}
        old = short_tempdir() / "data-backup-20200101-000000.tar.gz"
        manifest = manifest_of(members, version=1)
        stream = tar([("manifest.json", encode_manifest(manifest)), *members.items()])
        old.write_bytes(gzip.compress(stream))
        for options in (None, RestoreOptions()):
            with pytest.raises(BackupError) as caught:
                await box.restore(old, options=options)
            assert str(caught.value) == f"{old.name}: {FORMAT_1_REFUSED}"
            assert await box.note() == "after"
        report = await box.restore(old, options=RestoreOptions(unauthenticated=True))
        assert (report.key_id, report.authenticity) == (  # type: ignore[attr-defined]
            "",
            "not authenticated (format 1, made before backups were authenticated)",
        )
        assert await box.note() == "before"


async def test_a_restore_is_refused_while_previous_data_fills_its_room() -> None:
    with trio.fail_after(120):
        box, archive = await box_with_a_backup()
        for stamp in ("20250101-000000-000001", "20250101-000000-000002", "20250101-000000-000003"):
            (box.state / f"{contents.RESTORE_PREVIOUS}{stamp}").mkdir()
        with pytest.raises(BackupError) as caught:
            await box.restore(archive)
        assert str(caught.value).startswith(
            "3 dirs of data moved aside by earlier restores are kept (the oldest is "
            f"{contents.RESTORE_PREVIOUS}20250101-000000-000001), as many as "
            "APPLIANCE_RESTORE_PREVIOUS_KEEP=3 allows; nothing was changed."
        )
        assert await box.note() == "after"
        assert not (box.state / contents.RESTORE_STAGING).exists()


async def test_a_staging_dir_left_by_a_killed_restore_is_cleared() -> None:
    with trio.fail_after(120):
        box, archive = await box_with_a_backup()
        left = box.state / contents.RESTORE_STAGING / "state"
        left.mkdir(parents=True)
        (left / "half-written").write_text("x")
        await box.restore(archive)
        assert await box.note() == "before"
        assert not (box.state / contents.RESTORE_STAGING).exists()


# --- a restore killed half-way ----------------------------------------------------------------


async def killed_half_way(box: Box, archive: Path) -> None:
    """The restore's own steps, stopped where a kill -9 stops them: swapped, unchecked."""
    staged = await trio.to_thread.run_sync(
        stage, box.settings, archive, box.ring, RestoreOptions(), None, None
    )
    await trio.to_thread.run_sync(swap_in, box.settings, staged)
    assert (box.state / contents.RESTORE_JOURNAL).exists()


def journal_lines(box: Box) -> list[dict[str, str]]:
    text = (box.state / contents.RESTORE_JOURNAL).read_text()
    return [json.loads(line) for line in text.splitlines()]


async def test_a_restore_killed_half_way_is_rolled_back_at_the_next_start() -> None:
    with trio.fail_after(120):
        box, archive = await box_with_a_backup()
        live = box.files()
        assert recover_interrupted(box.settings) is False
        await killed_half_way(box, archive)
        [aside] = box.aside()
        lines = journal_lines(box)
        assert lines[0] == {"aside": str(aside)}
        assert {"from": str(box.state / "redis"), "to": str(aside / "redis")} in lines
        assert all(line.keys() == {"from", "to"} for line in lines[1:])
        recover_before_start(box.settings)
        assert box.files() == live
        assert await box.note() == "after"
        assert box.aside() == []
        assert not (box.state / contents.RESTORE_JOURNAL).exists()
        assert not (box.state / contents.RESTORE_STAGING).exists()
        assert recover_interrupted(box.settings) is False


async def test_a_killed_restore_is_rolled_back_whatever_its_journal_ends_with() -> None:
    with trio.fail_after(120):
        box, archive = await box_with_a_backup()
        live = box.files()
        await killed_half_way(box, archive)
        journal = box.state / contents.RESTORE_JOURNAL
        lines = journal.read_text().splitlines()
        # A line damaged in the middle, a move journaled but never made, a line cut short.
        never = {"from": str(box.state / "state" / "gone"), "to": str(box.state / "nowhere")}
        lines.insert(2, '{"from": 17}')
        lines.append(json.dumps(never))
        journal.write_text("\n".join(lines) + '\n{"from": "/x", "to')
        # The staging dir was cleared by hand since, and a restored directory too.
        shutil.rmtree(box.state / contents.RESTORE_STAGING)
        shutil.rmtree(box.state / "state" / "deep")
        assert recover_interrupted(box.settings) is True
        assert box.files() == live
        assert mode(box.state / "state" / "deep" / "er") == 0o700  # made again, private
        assert await box.note() == "after"
        assert box.aside() == []
        assert not journal.exists()
        assert not (box.state / contents.RESTORE_STAGING).exists()


async def test_a_killed_recovery_is_finished_by_the_next() -> None:
    with trio.fail_after(120):
        box = await make_box()
        # A recovery killed after it removed the aside and staging dirs, before the journal.
        aside = box.state / f"{contents.RESTORE_PREVIOUS}20250101-000000-000001"
        (box.state / contents.RESTORE_JOURNAL).write_text(json.dumps({"aside": str(aside)}) + "\n")
        assert recover_interrupted(box.settings) is True
        assert not (box.state / contents.RESTORE_JOURNAL).exists()
        # Or killed right after the aside dir was made and journaled.
        aside.mkdir()
        (box.state / contents.RESTORE_JOURNAL).write_text(json.dumps({"aside": str(aside)}) + "\n")
        assert recover_interrupted(box.settings) is True
        assert not aside.exists()


async def test_a_new_restore_first_rolls_back_a_killed_one() -> None:
    with trio.fail_after(120):
        box, archive = await box_with_a_backup()
        live = box.files()
        await killed_half_way(box, archive)
        await box.restore(archive)
        [aside] = box.aside()
        assert box.files(f"{aside.name}/state/state") == live


async def test_a_finished_restore_is_not_rolled_back() -> None:
    with trio.fail_after(120):
        box, archive = await box_with_a_backup()
        staged = await trio.to_thread.run_sync(
            stage, box.settings, archive, box.ring, RestoreOptions(), None, None
        )
        swap = await trio.to_thread.run_sync(swap_in, box.settings, staged)
        finish(swap)
        assert recover_interrupted(box.settings) is False
        assert box.files() == {"notes.txt": b"before", "deep/er/x.txt": b"deep"}


# --- models ---------------------------------------------------------------------------------


async def test_models_are_replaced_only_as_restored() -> None:
    with trio.fail_after(120):
        box = await make_box()
        models = Path(box.settings.models_dir)
        install_tiny_model(models, "tiny")
        await trio.to_thread.run_sync(ModelRegistry(models).scan)
        backed_up = (models / "tiny.gguf").read_bytes()
        await box.write("before", 1)
        archive = await box.backup(with_models=True)
        # Since: tiny replaced by other bytes, another model added.
        install_tiny_model(models, "tiny", seed=7)
        install_tiny_model(models, "other")
        await trio.to_thread.run_sync(ModelRegistry(models).scan)
        replaced = (models / "tiny.gguf").read_bytes()
        manifest_before = (models / "manifest.json").read_bytes()
        records_before = {r.name: r for r in read_manifest(models) or []}
        assert replaced != backed_up
        report = await box.restore(archive)
        [aside] = box.aside()
        assert report.models_restored is True  # type: ignore[attr-defined]
        assert (models / "tiny.gguf").read_bytes() == backed_up
        assert (models / "other.gguf").exists()
        assert (aside / "models" / "tiny.gguf").read_bytes() == replaced
        assert (aside / "models" / "manifest.json").read_bytes() == manifest_before
        records = {r.name: r for r in read_manifest(models) or []}
        assert records["other"] == records_before["other"]
        backup_records = json.loads(members_of(archive)["models/manifest.json"])["models"]
        assert records["tiny"].sha256 == backup_records[0]["sha256"]
        assert records["tiny"].size == len(backed_up)
        # As the registry writes it.
        written = (models / "manifest.json").read_bytes()
        save_manifest(models, records)
        assert (models / "manifest.json").read_bytes() == written


async def test_a_backup_without_models_names_the_models_this_box_lacks() -> None:
    with trio.fail_after(120):
        box = await make_box()
        models = Path(box.settings.models_dir)
        install_tiny_model(models, "tiny")
        install_tiny_model(models, "kept")
        await trio.to_thread.run_sync(ModelRegistry(models).scan)
        await box.write("before", 1)
        archive = await box.backup()
        (models / "tiny.gguf").unlink()
        manifest_before = (models / "manifest.json").read_bytes()
        report = await box.restore(archive)
        assert (report.models_restored, report.models_missing) == (False, ["tiny"])  # type: ignore[attr-defined]
        assert (models / "manifest.json").read_bytes() == manifest_before
        [aside] = box.aside()
        assert not (aside / "models").exists()


# --- messages and refusals ------------------------------------------------------------------


def test_a_failure_is_described_in_one_line_without_internals() -> None:
    assert describe_failure(BackupError("the archive is damaged")) == "the archive is damaged"
    assert describe_failure(KeyMismatch("sealed with key id x")) == "sealed with key id x"
    assert describe_failure(coredis.exceptions.ConnectionError("socket /x")) == (
        "the store did not start on the restored data (ConnectionError)"
    )
    assert describe_failure(FileNotFoundError(2, "gone", "/var/x")) == (
        "the store did not start on the restored data (FileNotFoundError)"
    )
    assert describe_failure(ValueError("first\nsecond")) == "ValueError: first"
    assert describe_failure(ValueError("  ")) == "ValueError"
    assert describe_failure(RuntimeError()) == "RuntimeError"
    # What failed inside the store's nursery comes wrapped; one failure is named as itself.
    wrapped = ExceptionGroup("outer", [ExceptionGroup("inner", [KeyMismatch("sealed")])])
    assert describe_failure(wrapped) == "sealed"
    two = ExceptionGroup("two failed", [ValueError("a"), KeyMismatch("b")])
    assert describe_failure(two) == "ExceptionGroup: two failed (2 sub-exceptions)"


async def test_an_external_store_is_not_restored_here() -> None:
    box = await make_box(APPLIANCE_REDIS_URL="redis://127.0.0.1:1")
    with pytest.raises(BackupError) as caught:
        await box.restore(box.state / "any.tar.gz")
    assert str(caught.value).startswith("backups and restores cover the embedded store only;")


async def test_with_the_daemon_up_a_restore_goes_through_it() -> None:
    with trio.fail_after(180):
        box, archive = await box_with_a_backup()
        env = {**THIS_BOX}
        async with running_daemon(env, state_dir=box.state) as daemon:
            settings = load_settings(daemon.env)
            with pytest.raises(BackupError) as caught:
                await restore_offline(settings, archive, box.keys.codec, box.ring)
            assert str(caught.value) == (
                "the store is running (the daemon is up): restore through the daemon"
            )
        assert not (box.state / contents.RESTORE_STAGING).exists()
