"""Restores against hostile but well-formed archives, on the real daemon, its redis-server
and the real CLI.

Every hostile archive here is crafted from a real backup, with CORRECT member hashes in its
manifest and, where the archive format has one, a CORRECT authentication tag under the
box's own key: what must stop them is whose archive it is (key ids) and the allow-list of
members, not a checksum. The crafting follows the format of the code under test (format 1
without a tag before authentication existed), so each test also runs against the code from
before these checks, and fails there.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coredis
import pytest
import trio

from appliance.envfile import parse_env_file
from tests.harness import (
    daemon_log,
    free_port,
    install_tiny_model,
    running_daemon,
    short_tempdir,
)
from tests.test_backup import _archives, _chat, _everything, cli

THIS_BOX = {"SECRET_KEY": "this-box-secret-" + "t" * 30, "PRIVACY_SALT": "this-box-salt"}
OTHER_BOX = {"SECRET_KEY": "other-box-secret-" + "o" * 30, "PRIVACY_SALT": "other-box-salt"}
# Not part of the data: the runtime dir (sockets), the backup lock (an empty file made by
# the first backup or restore), the test's env file and admin key file.
UNWATCHED = ("run/", ".backup.lock", "test.env", "test-admin.key")


def box_secrets(state: Path, env: dict[str, str]) -> tuple[str, str]:
    """The SECRET_KEY and PRIVACY_SALT the box runs with (its development key without one)."""
    if "SECRET_KEY" in env:
        return env["SECRET_KEY"], env["PRIVACY_SALT"]
    values = parse_env_file(state / "development.key")
    return values["SECRET_KEY"], values["PRIVACY_SALT"]


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` (a snapshot to compare): relative path -> SHA-256."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink() or not path.is_file() or relative.startswith(UNWATCHED):
            continue
        found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def repack(
    original: Path,
    target: Path,
    secrets: tuple[str, str],
    *,
    add: Iterable[tuple[str, bytes]] = (),
    format_1: bool = False,
) -> Path:
    """The archive `original` with members added, its manifest listing them with their
    true SHA-256 and size, re-authenticated under `secrets` when its format has a tag."""
    with tarfile.open(original) as tar:
        members = []
        for info in tar.getmembers():
            handle = tar.extractfile(info)
            assert handle is not None
            members.append((info.name, handle.read(), info.mode))
    manifest = json.loads(members[0][1])
    authenticated = len(members) > 1 and members[1][0] == "manifest.auth"
    body = [m for m in members if m[0] not in ("manifest.json", "manifest.auth")]
    body += [(name, data, 0o600) for name, data in add]
    manifest["members"] = [
        {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest(), "mode": m}
        for n, d, m in body
    ]
    if format_1:
        manifest["format_version"] = 1
        manifest.pop("key_id", None)
        authenticated = False
    data = json.dumps(manifest, indent=2).encode()
    head = [("manifest.json", data, 0o600)]
    if authenticated:
        from appliance.backup.authenticity import encode_auth
        from appliance.store.sealing import KeyRing

        head.append(("manifest.auth", encode_auth(KeyRing(*secrets), data), 0o600))
    with tarfile.open(target, "w:gz", format=tarfile.GNU_FORMAT) as out:
        for name, content, mode in head + body:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), mode
            out.addfile(info, io.BytesIO(content))
    return target


async def planted_aof(work: Path) -> bytes:
    """A real AOF of a real redis-server holding one key, `planted`."""
    from appliance.store.server import EmbeddedRedis

    directory = work / "aof-maker"
    server = EmbeddedRedis(directory, directory / "run", "64mb")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        client: coredis.Redis[bytes] = coredis.Redis(unix_socket_path=str(server.socket_path))
        async with client:
            await client.flushall()
            await client.set("planted", "by an archive")
        nursery.cancel_scope.cancel()
    aof = directory / "redis" / "appendonly.aof"
    if aof.is_dir():  # redis 7 keeps a directory of AOF files
        return b"".join(p.read_bytes() for p in sorted(aof.iterdir()) if p.suffix == ".aof")
    return aof.read_bytes()


async def test_another_appliances_backup_is_refused_unless_brought_over_deliberately() -> None:
    """Finding 1: another box's backup holding keys only used to replace every API key and
    conversation here (`0 conversations, 4 keys`, exit 0). It is refused, by the daemon and
    offline, naming both key ids and `--from-other-box`; that way in keeps this box's keys
    and re-seals the other box's data under this box's key."""
    other, state, work = short_tempdir(), short_tempdir(), short_tempdir()
    with trio.fail_after(420):
        async with running_daemon(OTHER_BOX, state_dir=other) as daemon, daemon.client() as c:
            other_token = daemon.api_key
            keys_only = await cli(other, OTHER_BOX, "backup")
            assert keys_only.returncode == 0, keys_only.stderr
            await _chat(c, "written on the other box")
        with_data = await cli(other, OTHER_BOX, "backup")
        assert with_data.returncode == 0, with_data.stderr
        keys_only_archive, with_data_archive = (other / "backups" / n for n in _archives(other))

        # A fixed port: `appliance restore` finds the running daemon through APPLIANCE_BIND.
        served = dict(THIS_BOX, APPLIANCE_BIND=f"127.0.0.1:{free_port()}")
        async with running_daemon(served, state_dir=state) as daemon, daemon.client() as c:
            my_token = daemon.api_key
            await _chat(c, "mine")
            await _chat(c, "also mine")
            before = await _everything(c)
            refused = await cli(state, served, "restore", str(keys_only_archive))
            assert refused.returncode == 1, refused.stdout
            assert "--from-other-box" in refused.stderr, refused.stderr
            assert (await c.get("/api/v1/health/services")).status_code == 200
            assert await _everything(c) == before
        this_id = json.loads((await cli(state, THIS_BOX, "keys", "status", "--json")).stdout)
        other_id = json.loads((await cli(other, OTHER_BOX, "keys", "status", "--json")).stdout)
        for key_id in (this_id["current_key_id"], other_id["current_key_id"]):
            assert key_id in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1

        live = tree(state)
        for archive in (keys_only_archive, with_data_archive):
            offline = await cli(state, THIS_BOX, "restore", str(archive))
            assert offline.returncode == 1 and "--from-other-box" in offline.stderr
            assert tree(state) == live
        verify = await cli(state, THIS_BOX, "backup", "verify", str(keys_only_archive))
        assert verify.returncode == 1 and "made by another appliance" in verify.stderr

        # The deliberate way: that box's secrets in a file of the operator's (mode 0600).
        secrets = work / "other-box.env"
        secrets.write_text("".join(f"{k}={v}\n" for k, v in OTHER_BOX.items()))
        secrets.chmod(0o644)
        loose = await cli(
            state, THIS_BOX, "restore", str(with_data_archive), "--from-other-box", str(secrets)
        )
        assert loose.returncode == 1 and "chmod 600" in loose.stderr
        assert tree(state) == live
        secrets.chmod(0o600)
        brought = await cli(
            state, THIS_BOX, "restore", str(with_data_archive), "--from-other-box", str(secrets)
        )
        assert brought.returncode == 0, brought.stderr
        assert "1 conversations" in brought.stdout
        said = f"another box's backup, authenticated under its key id {other_id['current_key_id']}"
        assert said in brought.stdout
        status = json.loads((await cli(state, THIS_BOX, "keys", "status", "--json")).stdout)
        assert status["by_key"] == {this_id["current_key_id"]: 1}  # re-sealed under this box's
        async with running_daemon(THIS_BOX, state_dir=state) as daemon:
            async with daemon.client(my_token) as mine:
                assert (await mine.get("/api/v1/health/services")).status_code == 200
            async with daemon.client(other_token) as theirs:
                assert (await theirs.get("/api/v1/health/services")).status_code == 401


# Members an attacker adds to a genuine backup of this box (findings 2 to 5).
PLANTS = {
    "planted AOF": "state/redis/appendonly.aof",
    "planted development key": "state/development.key",
    "models member in a backup without models": "models/x.gguf",
    "planted backup": "state/backups/data-backup-20991231-000000.tar.gz",
    "planted rollback journal": "state/.restore-journal",
    "planted env file": "state/appliance.env",
    "model through the state dir": "state/models/x.gguf",
}


@dataclass(frozen=True)
class Box:
    """A box in development mode (its key is its development.key) with a conversation and
    a genuine backup, and that backup with each member of PLANTS added."""

    state: Path
    genuine: str
    before: dict[str, Any]
    crafted: dict[str, Path]
    admin_token: str


async def _make_box() -> Box:
    state, work = short_tempdir(), short_tempdir()
    env: dict[str, str] = {}
    async with running_daemon(env, state_dir=state) as daemon, daemon.client() as c:
        admin_token = daemon.api_key
        await _chat(c, "keep me")
        before = await _everything(c)
        made = await c.post("/api/v1/admin/backups", json={}, timeout=120)
        assert made.status_code == 201, made.text
    genuine = state / "backups" / made.json()["name"]
    contents = {
        "state/redis/appendonly.aof": await planted_aof(work),
        "state/development.key": b"SECRET_KEY=" + b"x" * 40 + b"\nPRIVACY_SALT=y\n",
        "state/.restore-journal": b'{"from": "/etc", "to": "/tmp/x"}\n',
        "state/appliance.env": b"SECRET_KEY=" + b"z" * 40 + b"\n",
    }
    crafted = {
        case: repack(
            genuine,
            work / f"crafted-{n}.tar.gz",
            box_secrets(state, env),
            add=[(member, contents.get(member, b"GGUF, or so it says"))],
        )
        for n, (case, member) in enumerate(PLANTS.items())
    }
    return Box(state, genuine.name, before, crafted, admin_token)


@pytest.fixture(scope="module")
def box() -> Box:
    async def bounded() -> Box:
        with trio.fail_after(300):
            return await _make_box()

    return trio.run(bounded)


def copy_of(box: Box) -> Path:
    """A fresh copy of the box's state dir (its daemon stopped), for one test to spoil."""
    state = short_tempdir()
    shutil.copytree(
        box.state, state, dirs_exist_ok=True, ignore=shutil.ignore_patterns("run", "*.sock")
    )
    return state


@pytest.mark.parametrize("case", list(PLANTS))
async def test_a_planted_member_is_refused_and_nothing_moves(box: Box, case: str) -> None:
    """Findings 2, 3, 4 (one `models/` member) and 5: the box's genuine backup with one
    member added (true hashes, a true tag) is refused naming the member; data, API keys,
    models, backups, the rollback journal and the development key stay as they were, and
    the genuine backup still restores."""
    state = copy_of(box)
    live = tree(state)
    assert "development.key" in live and "redis/dump.rdb" in live
    with trio.fail_after(240):
        refused = await cli(state, {}, "restore", str(box.crafted[case]))
        assert refused.returncode == 1, refused.stdout
        assert repr(PLANTS[case]) in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        assert tree(state) == live
        restored = await cli(state, {}, "restore", str(state / "backups" / box.genuine))
        assert restored.returncode == 0, restored.stderr
        async with (
            running_daemon({}, state_dir=state) as daemon,
            daemon.client(box.admin_token) as c,
        ):
            assert (await c.get("/api/v1/health/services")).status_code == 200
            assert await _everything(c) == box.before
    assert (state / "development.key").read_bytes() == (box.state / "development.key").read_bytes()


async def test_the_daemon_refuses_planted_members_and_still_restores_its_own(box: Box) -> None:
    """The same archives asked of the running daemon by name (`POST /api/v1/admin/restore`):
    each a 422 naming the member, the daemon serving the same data with the same keys."""
    state = copy_of(box)
    with trio.fail_after(300):
        async with (
            running_daemon({}, state_dir=state) as daemon,
            daemon.client(box.admin_token) as c,
        ):
            await _chat(c, "after the backup")
            now = await _everything(c)
            for n, (case, archive) in enumerate(box.crafted.items()):
                upload = state / "backups" / f".restore-upload-case{n}.tar.gz"
                upload.write_bytes(archive.read_bytes())
                answer = await c.post(
                    "/api/v1/admin/restore", json={"archive": upload.name}, timeout=120
                )
                upload.unlink()
                assert answer.status_code == 422, (case, answer.text)
                assert PLANTS[case] in answer.json()["error"]["message"], case
                assert (await c.get("/api/v1/health/services")).status_code == 200
                assert await _everything(c) == now
            assert not list(state.glob("restore-previous-*"))
            again = await c.post(
                "/api/v1/admin/restore", json={"archive": box.genuine}, timeout=120
            )
            assert again.status_code == 200, again.text
            assert await _everything(c) == box.before
            assert (await c.get("/api/v1/health/services")).status_code == 200


async def test_models_are_replaced_only_as_restored_and_moved_aside_data_is_kept() -> None:
    """Finding 4 and the pile of `restore-previous-*`: a restore of a backup made with
    models replaces only the model files it holds (others stay installed), the data it
    moved aside survives later backups, is listed with its size (CLI, admin API) and in
    metrics, is bounded by APPLIANCE_RESTORE_PREVIOUS_KEEP, and goes only when pruned or
    past APPLIANCE_RESTORE_PREVIOUS_MAX_DAYS."""
    state = short_tempdir()
    install_tiny_model(state / "models")
    env = dict(THIS_BOX)
    with trio.fail_after(420):
        made = await cli(state, env, "backup", "--with-models")
        assert made.returncode == 0, made.stderr
        archive = state / "backups" / _archives(state)[0]
        other_model = install_tiny_model(state / "models", "second").read_bytes()
        tiny_before = (state / "models" / "tiny.gguf").read_bytes()

        restored = await cli(state, env, "restore", str(archive))
        assert restored.returncode == 0, restored.stderr
        [aside] = list(state.glob("restore-previous-*"))
        assert (state / "models" / "second.gguf").read_bytes() == other_model
        assert (state / "models" / "tiny.gguf").read_bytes() == tiny_before
        moved = sorted(p.relative_to(aside).as_posix() for p in aside.rglob("*") if p.is_file())
        assert "models/tiny.gguf" in moved and "models/second.gguf" not in moved
        listed = await cli(state, env, "models", "list", "--json")
        assert {m["name"]: m["state"] for m in json.loads(listed.stdout)} == {
            "second": "ok",
            "tiny": "ok",
        }

        # A later backup keeps it; `appliance backups` lists it with its size.
        later = await cli(state, env, "backup")
        assert later.returncode == 0, later.stderr
        assert aside.is_dir() and (aside / "models" / "tiny.gguf").is_file()
        listing = json.loads((await cli(state, env, "backups", "--json")).stdout)
        [entry] = listing["previous_data"]
        assert entry["name"] == aside.name and entry["size"] >= len(tiny_before)
        text = (await cli(state, env, "backups")).stdout
        assert aside.name in text and "prune-previous" in text

        # At APPLIANCE_RESTORE_PREVIOUS_KEEP a restore refuses, deleting nothing.
        bounded = dict(env, APPLIANCE_RESTORE_PREVIOUS_KEEP="1")
        live = tree(state)
        full = await cli(state, bounded, "restore", str(archive))
        assert full.returncode == 1
        assert "APPLIANCE_RESTORE_PREVIOUS_KEEP=1" in full.stderr
        assert "appliance backups prune-previous" in full.stderr
        assert tree(state) == live

        # The admin API lists it with its size; metrics count it.
        async with running_daemon(env, state_dir=state) as daemon, daemon.client() as c:
            body = (await c.get("/api/v1/admin/backups")).json()
            assert [p["name"] for p in body["previous_data"]] == [aside.name]
            assert body["previous_data"][0]["size"] == entry["size"]
            metrics = (await c.get("/api/v1/health/metrics")).json()["backups"]
            assert metrics["previous_data_count"] == 1
            assert metrics["previous_data_bytes"] == entry["size"]
            prometheus = await c.get("/api/v1/health/metrics", headers={"Accept": "text/plain"})
            assert "appliance_restore_previous_dirs 1.0" in prometheus.text

        # Removed on request only.
        pruned = await cli(state, env, "backups", "prune-previous")
        assert pruned.returncode == 0 and aside.name in pruned.stdout
        assert not aside.exists()

        # ... or once older than APPLIANCE_RESTORE_PREVIOUS_MAX_DAYS, by the daemon.
        again = await cli(state, env, "restore", str(archive))
        assert again.returncode == 0, again.stderr
        [recent] = list(state.glob("restore-previous-*"))
        old = recent.rename(state / "restore-previous-20000101-000000-000000")
        aged = dict(env, APPLIANCE_RESTORE_PREVIOUS_MAX_DAYS="30")
        async with running_daemon(aged, state_dir=state):
            while old.exists():  # noqa: ASYNC110 - the daemon's timer removes it
                await trio.sleep(0.1)
        log = daemon_log(state).read_text()
        assert "older than APPLIANCE_RESTORE_PREVIOUS_MAX_DAYS=30" in log


async def test_format_1_archives_need_a_deliberate_flag_and_rotation_keeps_backups() -> None:
    """Archives made before authentication (format 1) are refused unless the operator says
    --unauthenticated; `backup verify` says whether an archive is authenticated for this
    box; after a key rotation (SECRET_KEY_PREVIOUS) the box's older backups still restore."""
    state, work = short_tempdir(), short_tempdir()
    env = dict(THIS_BOX)
    with trio.fail_after(420):
        async with running_daemon(env, state_dir=state) as daemon, daemon.client() as c:
            await _chat(c, "before the backup")
            before = await _everything(c)
        made = await cli(state, env, "backup")
        assert made.returncode == 0, made.stderr
        genuine = state / "backups" / _archives(state)[0]
        old = repack(genuine, work / "format-1.tar.gz", box_secrets(state, env), format_1=True)
        live = tree(state)
        refused = await cli(state, env, "restore", str(old))
        assert refused.returncode == 1
        assert "format 1" in refused.stderr and "--unauthenticated" in refused.stderr
        assert tree(state) == live
        verified = await cli(state, env, "backup", "verify", str(genuine))
        assert verified.returncode == 0, verified.stderr
        assert "authenticated for this box" in verified.stdout
        assert "the current key" in verified.stdout
        verify_old = await cli(state, env, "backup", "verify", str(old))
        assert verify_old.returncode == 1 and "not authenticated" in verify_old.stderr
        taken = await cli(state, env, "restore", str(old), "--unauthenticated")
        assert taken.returncode == 0, taken.stderr

        # Rotate: the backup made under the old key verifies under the previous key.
        rotated = {
            "SECRET_KEY": "rotated-secret-" + "r" * 30,
            "PRIVACY_SALT": env["PRIVACY_SALT"],
            "SECRET_KEY_PREVIOUS": env["SECRET_KEY"],
            "PRIVACY_SALT_PREVIOUS": env["PRIVACY_SALT"],
        }
        verified = await cli(state, rotated, "backup", "verify", str(genuine))
        assert verified.returncode == 0 and "the previous key" in verified.stdout
        again = await cli(state, rotated, "restore", str(genuine))
        assert again.returncode == 0, again.stderr
        async with running_daemon(rotated, state_dir=state) as daemon, daemon.client() as c:
            assert await _everything(c) == before
