"""Rotating SECRET_KEY and PRIVACY_SALT as the README says keeps every API key working:
the first admin key from `appliance init`, keys made since, and keys an older version
hashed with the salt (checked under PRIVACY_SALT and _PREVIOUS, re-hashed when seen)."""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from appliance.auth.apikeys import NAMES_KEY, new_token, record_key, salted_hash
from appliance.envfile import parse_env_file
from appliance.privacy.keys import hash_key_from_salt
from tests.harness import Daemon, daemon_environment, running_daemon, short_tempdir


@dataclass
class Done:
    code: int
    out: str
    err: str


async def _appliance(env: Mapping[str, str], *args: str) -> Done:
    with trio.fail_after(180):
        done = await trio.run_process(
            [sys.executable, "-m", "appliance", *args],
            env=dict(env),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return Done(done.returncode, done.stdout.decode(), done.stderr.decode())


def _write_env(path: Path, values: Mapping[str, str]) -> None:
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    path.chmod(0o600)


def _rotated(values: Mapping[str, str]) -> dict[str, str]:
    """The README's first step: new secrets, the old ones as *_PREVIOUS."""
    return {
        **values,
        "SECRET_KEY": secrets.token_urlsafe(48),
        "PRIVACY_SALT": secrets.token_urlsafe(24),
        "SECRET_KEY_PREVIOUS": values["SECRET_KEY"],
        "PRIVACY_SALT_PREVIOUS": values["PRIVACY_SALT"],
    }


def _without_previous(values: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in values.items() if not k.endswith("_PREVIOUS")}


async def _status(daemon: Daemon, token: str, path: str) -> int:
    async with daemon.client(key=token) as client:
        return (await client.get(path)).status_code


async def _conversation(daemon: Daemon, token: str, conversation_id: str) -> object:
    async with daemon.client(key=token) as client:
        answer = await client.get(f"/api/v1/conversations/{conversation_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()


async def _chat(daemon: Daemon, token: str, message: str) -> str:
    async with daemon.client(key=token, timeout=60) as client:
        answer = await client.post("/api/v1/chat/send", json={"message": message, "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    conversation_id: str = answer.json()["conversation_id"]
    return conversation_id


async def test_the_readmes_rotation_keeps_the_first_admin_key_and_user_keys() -> None:
    state = short_tempdir()
    env_file = state / "appliance.env"
    env = daemon_environment(state, {"APPLIANCE_ENV_FILE": str(env_file)})
    with trio.fail_after(600):
        made = await _appliance(env, "--env-file", str(env_file), "init")
        assert made.code == 0, made.err
        admin = made.out.split("first admin API key", 1)[1].split(": ", 1)[1].strip()
        async with running_daemon(env, state_dir=state) as daemon:
            created = await _appliance(env, "keys", "create", "--name", "alice")
            assert created.code == 0, created.err
            user = created.out.strip()
            mine = await _chat(daemon, user, "a question before the rotation")
            before = await _conversation(daemon, user, mine)
            assert await _status(daemon, admin, "/api/v1/health/services") == 200

        values = parse_env_file(env_file)
        _write_env(env_file, _rotated(values))
        async with running_daemon(env, state_dir=state) as daemon:
            rotated = await _appliance(env, "keys", "rotate")
            assert rotated.code == 0, rotated.err
            assert await _status(daemon, admin, "/api/v1/health/services") == 200
            assert await _conversation(daemon, user, mine) == before
            assert "re-sealed 1 conversations" in rotated.out
            assert "API keys hashed with a PRIVACY_SALT: none" in rotated.out

        _write_env(env_file, _without_previous(parse_env_file(env_file)))
        async with running_daemon(env, state_dir=state) as daemon:
            assert await _status(daemon, admin, "/api/v1/health/services") == 200
            assert await _conversation(daemon, user, mine) == before
            await _chat(daemon, user, "a question after the rotation")
            listed = await _appliance(env, "keys", "list", "--json")
            names = {entry["name"] for entry in json.loads(listed.out)}
            assert {"admin", "alice"} <= names


async def _legacy_key(daemon: Daemon, name: str, scope: str, salt: str) -> str:
    """A key as an older version stored it: hashed with a key derived from the salt."""
    import coredis

    key_id, token = new_token()
    client: coredis.Redis[bytes] = coredis.Redis(
        unix_socket_path=str(daemon.state_dir / "run" / "redis.sock")
    )
    async with client:
        await client.hset(
            record_key(key_id),
            {
                "name": name,
                "scope": scope,
                "created": "1700000000.0",
                "hash": salted_hash(token, hash_key_from_salt(salt)),
            },
        )
        await client.hset(NAMES_KEY, {name: key_id})
    return token


async def test_keys_hashed_with_the_salt_by_an_older_version_survive_a_rotation() -> None:
    state = short_tempdir()
    env_file = state / "appliance.env"
    salt = secrets.token_urlsafe(24)
    key_id, admin = new_token()
    values = {
        "APPLIANCE_ENV": "development",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "PRIVACY_SALT": salt,
        # What `appliance init` wrote before: id and a hash keyed from PRIVACY_SALT.
        "APPLIANCE_ADMIN_KEY_HASH": f"{key_id}:{salted_hash(admin, hash_key_from_salt(salt))}",
    }
    _write_env(env_file, values)
    env = daemon_environment(state, {"APPLIANCE_ENV_FILE": str(env_file)})
    with trio.fail_after(600):
        async with running_daemon(env, state_dir=state) as daemon:
            user = await _legacy_key(daemon, "old-user", "user", salt)
            idle = await _legacy_key(daemon, "idle", "user", salt)
            listed = json.loads((await _appliance(env, "keys", "list", "--json")).out)
            assert {e["name"] for e in listed if e["salted_hash"]} == {"admin", "old-user", "idle"}

        _write_env(env_file, _rotated(values))
        async with running_daemon(env, state_dir=state) as daemon:
            rotated = await _appliance(env, "keys", "rotate")
            assert rotated.code == 0, rotated.err
            assert "API keys hashed with a PRIVACY_SALT" in rotated.out
            named = rotated.out.split("(made by an older version): ", 1)[1].splitlines()[0]
            assert set(named.split(", ")) == {"admin", "old-user", "idle"}
            assert "before removing PRIVACY_SALT_PREVIOUS" in rotated.out
            # Checked under PRIVACY_SALT_PREVIOUS, and re-hashed on the way.
            assert await _status(daemon, admin, "/api/v1/health/services") == 200
            assert await _status(daemon, user, "/api/v1/conversations") == 200
            status = json.loads((await _appliance(env, "keys", "status", "--json")).out)
            assert status["api_keys_with_salted_hash"] == ["idle"]

        _write_env(env_file, _without_previous(parse_env_file(env_file)))
        async with running_daemon(env, state_dir=state) as daemon:
            assert await _status(daemon, admin, "/api/v1/health/services") == 200
            assert await _status(daemon, user, "/api/v1/conversations") == 200
            # Never used while its salt was PRIVACY_SALT_PREVIOUS: as `keys rotate` warned.
            assert await _status(daemon, idle, "/api/v1/conversations") == 401
            listed = json.loads((await _appliance(env, "keys", "list", "--json")).out)
            assert [e["name"] for e in listed if e["salted_hash"]] == ["idle"]
