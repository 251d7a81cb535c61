"""Backups and restore on the real daemon, its real redis-server and the real CLI."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import coredis
import trio

from appliance.backup.archive import Source, write_archive
from appliance.backup.authenticity import encode_auth
from appliance.store.sealing import KeyRing
from appliance.store.server import EmbeddedRedis
from tests.harness import (
    daemon_environment,
    free_port,
    install_tiny_model,
    running_daemon,
    short_tempdir,
)

KEYS = {"SECRET_KEY": "k" * 40, "PRIVACY_SALT": "backup-test-salt"}
BOX = KeyRing(KEYS["SECRET_KEY"], KEYS["PRIVACY_SALT"])  # the key ring these settings give


def _env(port: int | None = None, **extra: str) -> dict[str, str]:
    env = dict(KEYS)
    if port is not None:
        env["APPLIANCE_BIND"] = f"127.0.0.1:{port}"
    env.update(extra)
    return env


def _cli(state: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        env=daemon_environment(state, env),
        capture_output=True,
        text=True,
        timeout=300,
    )


async def cli(state: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: _cli(state, env, *args))


def _archives(state: Path) -> list[str]:
    directory = state / "backups"
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("data-backup-"))


async def _chat(client: Any, message: str, conversation_id: str | None = None) -> str:
    body: dict[str, Any] = {"message": message, "max_tokens": 3}
    if conversation_id:
        body["conversation_id"] = conversation_id
    response = await client.post("/api/v1/chat/send", json=body)
    assert response.status_code == 200, response.text
    found: str = response.json()["conversation_id"]
    return found


async def _everything(client: Any) -> dict[str, Any]:
    ids: list[str] = []
    while True:
        page = await client.get("/api/v1/conversations", params={"limit": 100, "offset": len(ids)})
        found = [item["id"] for item in page.json()["conversations"]]
        ids += found
        if len(found) < 100:
            break
    return {i: (await client.get(f"/api/v1/conversations/{i}")).json() for i in ids}


def _redis_files(state: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((state / "redis").iterdir())
        if p.name in ("dump.rdb", "appendonly.aof")
    }


async def test_round_trip_offline_and_through_the_running_daemon() -> None:
    state = short_tempdir()
    install_tiny_model(state / "models")
    (state / "files").mkdir()
    (state / "files" / "notes.txt").write_text("operator notes\n")
    port = free_port()
    with trio.fail_after(240):
        async with running_daemon(_env(port), state_dir=state) as daemon, daemon.client() as c:
            for n in range(6):
                conversation = await _chat(c, f"question {n}")
                await _chat(c, f"follow-up {n}", conversation)
            before = await _everything(c)
            assert len(before) == 6
            made = await cli(state, _env(port), "backup")
            assert made.returncode == 0, made.stderr
            [archive] = _archives(state)
            assert f"wrote {state / 'backups' / archive}" in made.stdout

            # Through the running daemon: a newer conversation is gone afterwards, the
            # backup's conversations read back identically, and the daemon stays up.
            extra = await _chat(c, "written after the backup")
            restored = await cli(state, _env(port), "restore", str(state / "backups" / archive))
            assert restored.returncode == 0, restored.stderr
            assert "6 conversations" in restored.stdout
            assert (await c.get("/api/v1/health/ready")).status_code == 200
            assert (await c.get(f"/api/v1/conversations/{extra}")).status_code == 404
            assert await _everything(c) == before
            assert await _chat(c, "the store takes writes again")

        # Offline: wipe the data, restore with the daemon stopped, start, compare.
        for path in (state / "redis").iterdir():
            path.unlink()
        (state / "files" / "notes.txt").unlink()
        restored = await cli(state, _env(), "restore", str(state / "backups" / archive))
        assert restored.returncode == 0, restored.stderr
        assert (state / "files" / "notes.txt").read_text() == "operator notes\n"
        assert not (state / "development.key").exists()
        async with running_daemon(_env(), state_dir=state) as daemon, daemon.client() as c:
            assert await _everything(c) == before


async def test_backup_while_clients_write_restores_a_consistent_prefix() -> None:
    state = short_tempdir()
    install_tiny_model(state / "models")
    with trio.fail_after(240):
        async with running_daemon(_env(), state_dir=state) as daemon, daemon.client() as c:
            stop = trio.Event()
            written = [0]

            async def writer() -> None:
                # New conversations, each growing by a few exchanges (the tiny model's
                # context is short).
                while not stop.is_set():
                    conversation_id = await _chat(c, "start")
                    written[0] += 1
                    for n in range(3):
                        await _chat(c, f"more {n}", conversation_id)
                        written[0] += 1

            async def wait_for_writes(count: int) -> None:
                while written[0] < count:  # noqa: ASYNC110 - a counter, polled
                    await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(writer)
                await wait_for_writes(20)
                made = await c.post("/api/v1/admin/backups", json={}, timeout=120)
                await wait_for_writes(written[0] + 20)
                stop.set()
            assert made.status_code == 201, made.text
            live = await _everything(c)

        # Restore into a fresh box with the same keys.
        fresh = short_tempdir()
        install_tiny_model(fresh / "models")
        archive = state / "backups" / made.json()["name"]
        restored = await cli(fresh, _env(), "restore", str(archive))
        assert restored.returncode == 0, restored.stderr
        async with running_daemon(_env(), state_dir=fresh) as daemon, daemon.client() as c:
            snapshot = await _everything(c)
    assert snapshot and set(snapshot) <= set(live)
    behind = len(live) > len(snapshot)
    for conversation_id, conversation in snapshot.items():
        messages = conversation["messages"]
        # Never half an exchange, and always a prefix of what the live store holds.
        assert messages and len(messages) % 2 == 0
        assert conversation["message_count"] == len(messages)
        assert messages == live[conversation_id]["messages"][: len(messages)]
        behind = behind or len(live[conversation_id]["messages"]) > len(messages)
    assert behind, "writers kept writing after the snapshot, so live data must be ahead"


async def test_kill_9_during_a_backup_leaves_no_complete_looking_file() -> None:
    state = short_tempdir()
    (state / "files").mkdir(parents=True)
    with (state / "files" / "big.bin").open("wb") as handle:
        for _ in range(48):
            handle.write(os.urandom(4 * 1024 * 1024))
    with trio.fail_after(240):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "appliance", "backup"],
            env=daemon_environment(state, _env()),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        backups = state / "backups"
        while not (backups.exists() and any(".partial" in p.name for p in backups.iterdir())):
            assert process.returncode is None, "the backup ended before it could be killed"
            await trio.sleep(0.01)
        await trio.sleep(0.3)
        process.kill()
        await process.wait()
        # The orphaned redis-server the command had started is stopped by the next run.
        assert _archives(state) == []
        listing = await cli(state, _env(), "backups", "--json")
        assert json.loads(listing.stdout) == {"backups": [], "previous_data": []}

        made = await cli(state, _env(), "backup")
        assert made.returncode == 0, made.stderr
        assert len(_archives(state)) == 1
        assert not any(".partial" in p.name for p in backups.iterdir())
        verified = await cli(state, _env(), "backup", "verify", str(backups / _archives(state)[0]))
        assert verified.returncode == 0, verified.stderr


def _manifest_member(members: list[tuple[str, bytes]]) -> bytes:
    return json.dumps(
        {
            "format_version": 2,
            "appliance_version": "test",
            "created": time.time(),
            "created_utc": "2026-01-01T00:00:00+00:00",
            "members": [
                {
                    "name": name,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "mode": 0o600,
                }
                for name, data in members
            ],
            "meta": {},
            "key_id": BOX.current_id,
        }
    ).encode()


def _crafted(path: Path, members: list[tuple[str, bytes]], link: tuple[str, str] | None) -> Path:
    """An archive authenticated under this box's key: only the tar checks can refuse it."""
    manifest = _manifest_member(members)
    head = [("manifest.json", manifest), ("manifest.auth", encode_auth(BOX, manifest))]
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [*head, *members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link[0])
            info.type = tarfile.SYMTYPE
            info.linkname = link[1]
            tar.addfile(info)
    return path


async def test_damaged_and_hostile_archives_are_refused_and_live_data_is_untouched() -> None:
    state = short_tempdir()
    install_tiny_model(state / "models")
    work = short_tempdir()
    passphrase, wrong = work / "pass", work / "wrong"
    passphrase.write_text("correct horse battery staple\n")
    wrong.write_text("not the passphrase\n")
    for secret in (passphrase, wrong):
        secret.chmod(0o600)
    with trio.fail_after(300):
        async with running_daemon(_env(), state_dir=state) as daemon, daemon.client() as c:
            await _chat(c, "keep me")
            before = await _everything(c)
        made = await cli(state, _env(), "backup")
        assert made.returncode == 0, made.stderr
        sealed = await cli(state, _env(), "backup", "--passphrase-file", str(passphrase))
        assert sealed.returncode == 0, sealed.stderr
        plain_name = next(n for n in _archives(state) if n.endswith(".tar.gz"))
        sealed_name = next(n for n in _archives(state) if n.endswith(".sealed"))
        good = (state / "backups" / plain_name).read_bytes()

        flipped = work / "data-backup-20260101-000001.tar.gz"
        damaged = bytearray(good)
        damaged[len(damaged) // 2] ^= 0x01
        flipped.write_bytes(bytes(damaged))
        truncated = work / "data-backup-20260101-000002.tar.gz"
        truncated.write_bytes(good[: len(good) // 2])
        rdb = (state / "redis" / "dump.rdb").read_bytes()
        traversal = _crafted(
            work / "data-backup-20260101-000003.tar.gz",
            [("redis/dump.rdb", rdb), ("../escaped", b"x")],
            None,
        )
        symlink = _crafted(
            work / "data-backup-20260101-000004.tar.gz",
            [("redis/dump.rdb", rdb)],
            ("state/link", "/etc/passwd"),
        )
        live = _redis_files(state)
        cases = [
            (flipped, [], ("damaged", "checksum", "sha-256", "corrupt")),
            (truncated, [], ("truncated", "damaged")),
            (traversal, [], ("..", "outside")),
            (symlink, [], ("symlink", "link")),
            (state / "backups" / sealed_name, ["--passphrase-file", str(wrong)], ("passphrase",)),
            (state / "backups" / sealed_name, [], ("passphrase",)),
        ]
        for archive, extra, words in cases:
            verify = await cli(state, _env(), "backup", "verify", str(archive), *extra)
            restore = await cli(state, _env(), "restore", str(archive), *extra)
            for result in (verify, restore):
                assert result.returncode == 1, (archive.name, result.stdout, result.stderr)
                message = result.stderr.lower()
                assert any(word in message for word in words), (archive.name, message)
                assert "Traceback" not in result.stderr
            assert _redis_files(state) == live
        assert not (work.parent / "escaped").exists()
        assert not list(state.glob(".restore-staging*"))

        # The right passphrase restores; the data is what it was.
        ok = await cli(
            state, _env(), "restore", str(state / "backups" / sealed_name),
            "--passphrase-file", str(passphrase),
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        async with running_daemon(_env(), state_dir=state) as daemon, daemon.client() as c:
            assert await _everything(c) == before


async def test_scheduled_backups_keep_the_newest_n_and_report_in_status_and_metrics() -> None:
    state = short_tempdir()
    env = _env(APPLIANCE_BACKUP_INTERVAL="1s", APPLIANCE_BACKUP_KEEP="2")
    with trio.fail_after(120):
        async with running_daemon(env, state_dir=state) as daemon, daemon.client() as c:
            assert daemon.notify is not None
            await daemon.notify.wait_for("last backup 20", timeout=60)
            while True:
                metrics = (await c.get("/api/v1/health/metrics")).json()["backups"]
                if metrics["succeeded"] >= 4:
                    break
                await trio.sleep(0.2)
            assert metrics["last_success"] is not None and metrics["failed"] == 0
            prometheus = await c.get("/api/v1/health/metrics", headers={"Accept": "text/plain"})
            assert "appliance_backup_last_success_timestamp_seconds" in prometheus.text
            # The timer keeps writing: between a new archive's rename and the pruning
            # after it there may be three for a moment, never more; then two are left.
            while True:
                listed = (await c.get("/api/v1/admin/backups")).json()["backups"]
                assert len(listed) in (2, 3), listed
                on_disk = sorted(_archives(state), reverse=True)
                # Timer backups are taken a second or more apart: names never collide.
                if len(listed) == 2 and [b["name"] for b in listed] == on_disk:
                    break
                await trio.sleep(0.05)


async def test_manual_backups_prune_to_exactly_the_newest_n() -> None:
    state = short_tempdir()
    env = _env(APPLIANCE_BACKUP_KEEP="3")
    made: list[str] = []
    with trio.fail_after(180):
        for _ in range(5):
            result = await cli(state, env, "backup")
            assert result.returncode == 0, result.stderr
            made.append(Path(result.stdout.split()[1]).name)
    assert len(set(made)) == 5
    assert _archives(state) == sorted(made)[-3:]
    listing = await cli(state, env, "backups")
    assert listing.returncode == 0
    assert all(name in listing.stdout for name in sorted(made)[-3:])


async def test_a_failing_backup_is_reported_and_serving_goes_on() -> None:
    state = short_tempdir()
    blocker = state / "not-a-dir"
    blocker.write_text("a file where the backup dir should be")
    env = _env(APPLIANCE_BACKUP_DIR=str(blocker), APPLIANCE_BACKUP_INTERVAL="1s")
    with trio.fail_after(120):
        async with running_daemon(env, state_dir=state) as daemon, daemon.client() as c:
            assert daemon.notify is not None
            await daemon.notify.wait_for("last backup FAILED", timeout=60)
            metrics = (await c.get("/api/v1/health/metrics")).json()["backups"]
            assert metrics["failed"] >= 1 and metrics["last_error"]
            refused = await c.post("/api/v1/admin/backups")
            assert refused.status_code == 500
            assert str(blocker) not in refused.text and "Traceback" not in refused.text
            assert (await c.get("/api/v1/health/ready")).status_code == 200
            assert await _chat(c, "still serving")
    assert any("backup failed" in line.get("message", "") for line in daemon.log_lines())


async def test_restore_endpoint_takes_only_names_from_the_backup_dir() -> None:
    with trio.fail_after(120):
        async with running_daemon(_env()) as daemon, daemon.client() as c:
            for name, status in (
                ("../../etc/passwd", 422),
                ("/etc/passwd", 422),
                ("data-backup-20200101-000000.tar.gz", 404),
            ):
                response = await c.post("/api/v1/admin/restore", json={"archive": name})
                assert response.status_code == status, response.text
                assert response.json()["error"]["message"]
            made = await c.post("/api/v1/admin/backups", json={"with_models": True}, timeout=60)
            assert made.status_code == 201, made.text
            with tarfile.open(daemon.state_dir / "backups" / made.json()["name"]) as tar:
                names = tar.getnames()
            assert names[0] == "manifest.json"
            assert "redis/dump.rdb" in names and "models/tiny.gguf" in names


async def test_redis_rebuilds_its_aof_from_a_restored_snapshot() -> None:
    """redis-server with appendonly on starts EMPTY when only dump.rdb exists; the
    embedded store must load the snapshot instead (what every restore relies on)."""
    directory = short_tempdir()

    async def cycle(action: Any) -> Any:
        server = EmbeddedRedis(directory, directory / "run", "64mb")
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client: coredis.Redis[bytes] = coredis.Redis(unix_socket_path=str(server.socket_path))
            async with client:
                result = await action(client)
            nursery.cancel_scope.cancel()
        return result

    async def fill(client: coredis.Redis[bytes]) -> None:
        for n in range(200):
            await client.set(f"key{n}", str(n))

    async def count(client: coredis.Redis[bytes]) -> int:
        return await client.dbsize()

    with trio.fail_after(60):
        await cycle(fill)
        (directory / "redis" / "appendonly.aof").unlink()
        assert await cycle(count) == 200
        assert (directory / "redis" / "appendonly.aof").stat().st_size > 0
        # From now on the AOF alone holds it (the snapshot is not needed any more).
        (directory / "redis" / "dump.rdb").unlink()
        assert await cycle(count) == 200


async def test_a_restore_that_does_not_load_puts_the_previous_data_back() -> None:
    """A backup of this box whose store snapshot is sealed under a key this box does not
    have cannot be read here: the restore is undone, both through the running daemon and
    offline, and the command says so."""
    other, state, work = short_tempdir(), short_tempdir(), short_tempdir()
    other_keys = {"SECRET_KEY": "o" * 40, "PRIVACY_SALT": "another-salt"}
    port = free_port()
    with trio.fail_after(240):
        async with running_daemon(other_keys, state_dir=other) as daemon, daemon.client() as c:
            await _chat(c, "sealed under another key")
        made = await cli(other, other_keys, "backup")
        assert made.returncode == 0, made.stderr
        with tarfile.open(other / "backups" / _archives(other)[0]) as tar:
            snapshot = tar.extractfile("redis/dump.rdb")
            assert snapshot is not None
            (work / "dump.rdb").write_bytes(snapshot.read())
        # Authenticated by this box, so only the load check can refuse it.
        foreign = write_archive(
            work,
            [Source("redis/dump.rdb", work / "dump.rdb")],
            {"with_models": "false"},
            keys=BOX,
            when=datetime.datetime.now(datetime.UTC),
        )

        async with running_daemon(_env(port), state_dir=state) as daemon, daemon.client() as c:
            mine = await _chat(c, "mine")
            before = await _everything(c)
            refused = await cli(state, _env(port), "restore", str(foreign))
            assert refused.returncode == 1
            assert "sealed with key id" in refused.stderr
            assert "previous data is back in place" in refused.stderr
            assert (await c.get("/api/v1/health/ready")).status_code == 200
            assert await _everything(c) == before
            assert await _chat(c, "still writable", mine)
            after_daemon = await _everything(c)

        refused = await cli(state, _env(), "restore", str(foreign))
        assert refused.returncode == 1
        assert "previous data is back in place" in refused.stderr
        assert not list(state.glob("restore-previous-*"))
        async with running_daemon(_env(), state_dir=state) as daemon, daemon.client() as c:
            assert await _everything(c) == after_daemon


async def test_a_restore_killed_half_way_is_rolled_back_at_the_next_start() -> None:
    from appliance.backup.restore import RestoreOptions, stage, swap_in
    from appliance.config import load_settings

    state = short_tempdir()
    install_tiny_model(state / "models")
    with trio.fail_after(240):
        async with running_daemon(_env(), state_dir=state) as daemon, daemon.client() as c:
            await _chat(c, "in the backup")
        assert (await cli(state, _env(), "backup")).returncode == 0
        async with running_daemon(_env(), state_dir=state) as daemon, daemon.client() as c:
            await _chat(c, "written after the backup")
            before = await _everything(c)
        assert len(before) == 2

        # The restore's own steps, stopped where a kill -9 would stop them: the data is
        # swapped but never checked, and the journal says what was moved.
        env = daemon_environment(state, _env())
        settings = load_settings(env_file=Path(env["APPLIANCE_ENV_FILE"]), environ=env)
        archive = state / "backups" / _archives(state)[0]
        staged = await trio.to_thread.run_sync(
            stage, settings, archive, BOX, RestoreOptions(), None, None
        )
        await trio.to_thread.run_sync(swap_in, settings, staged)
        assert (state / ".restore-journal").exists()

        # (The daemon's log file is in the state dir too, so it is rolled back with it.)
        async with running_daemon(_env(), state_dir=state) as daemon, daemon.client() as c:
            assert await _everything(c) == before
        assert not (state / ".restore-journal").exists()
        assert not list(state.glob("restore-previous-*"))
