"""Privacy on the real daemon: sealed storage, tampering, rotation, retention, erasure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import coredis
import trio

from appliance.privacy.retention import DAY_SECONDS, RetentionService
from appliance.store.client import Store
from appliance.store.conversations import (
    BYKEY_PREFIX,
    INDEX_KEY,
    Conversations,
    messages_key,
    meta_key,
    owner_key,
)
from appliance.store.sealing import KeyRing
from appliance.store.server import EmbeddedRedis
from tests.harness import daemon_environment, install_tiny_model, running_daemon, short_tempdir

KEY_A = "a" * 40
KEY_B = "b" * 40
SALT = "pepper-salt-value"
EMAIL = "jane.doe@example.com"
CARD = "4111111111111111"
MARKER = "ZQXJUNIQUEMARKER7781"


def _redis(daemon_state: Path) -> coredis.Redis[bytes]:
    return coredis.Redis(unix_socket_path=str(daemon_state / "run" / "redis.sock"))


async def _chat(client: Any, message: str) -> str:
    response = await client.post("/api/v1/chat/send", json={"message": message, "max_tokens": 4})
    assert response.status_code == 200, response.text
    conversation_id: str = response.json()["conversation_id"]
    return conversation_id


async def test_nothing_readable_reaches_redis_files_or_logs() -> None:
    env = {"SECRET_KEY": KEY_A, "PRIVACY_SALT": SALT}
    message = f"mail me at {EMAIL}, card {CARD}, reference {MARKER}"
    with trio.fail_after(90):
        async with running_daemon(env) as daemon:
            async with daemon.client() as client:
                conversation_id = await _chat(client, message)
                shown = (await client.get(f"/api/v1/conversations/{conversation_id}")).json()
            # What is kept is redacted (and readable through the API, which opens it).
            kept = shown["messages"][0]["content"]
            assert "[EMAIL]" in kept and "[CARD]" in kept and MARKER in kept
            assert EMAIL not in kept and CARD not in kept
            redis = _redis(daemon.state_dir)
            async with redis:
                await redis.save()
                await redis.bgrewriteaof()
                await trio.sleep(1)
                raw_values = await redis.lrange(messages_key(conversation_id), 0, -1)
            await daemon.stop()
        stored = b"".join(raw_values)
        files = b"".join(
            p.read_bytes() for p in (daemon.state_dir / "redis").iterdir() if p.is_file()
        )
        logs = daemon.log_path.read_bytes()
        for place, data in (("values", stored), ("redis files", files), ("logs", logs)):
            for secret in (MARKER, EMAIL, CARD, "jane.doe"):
                assert secret.encode() not in data, f"{secret} in clear in {place}"
        assert len(files) > 0


async def test_tampered_or_moved_values_fail_to_open() -> None:
    with trio.fail_after(90):
        async with (
            running_daemon({"SECRET_KEY": KEY_A, "PRIVACY_SALT": SALT}) as daemon,
            daemon.client() as client,
        ):
            first = await _chat(client, "first conversation")
            second = await _chat(client, "second conversation")
            redis = _redis(daemon.state_dir)
            async with redis:
                value = (await redis.lrange(messages_key(first), 0, 0))[0]
                flipped = bytearray(value)
                flipped[len(flipped) // 2] ^= 0x01
                await redis.lset(messages_key(first), 0, bytes(flipped))
                # A valid sealed value, moved to another conversation's key.
                await redis.lset(messages_key(second), 0, value)
            for conversation_id in (first, second):
                response = await client.get(f"/api/v1/conversations/{conversation_id}")
                assert response.status_code == 500
                error = response.json()["error"]
                assert error["code"] == "record_unreadable"
                assert "first conversation" not in response.text
            assert (await client.get("/api/v1/health/ready")).status_code == 200


def _keys(state: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "keys", *args],
        env=daemon_environment(state, env),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_rotation_end_to_end() -> None:
    state = short_tempdir()
    install_tiny_model(state / "models")
    with trio.fail_after(180):
        async with (
            running_daemon({"SECRET_KEY": KEY_A, "PRIVACY_SALT": SALT}, state_dir=state) as a,
            a.client() as client,
        ):
            ids = [await _chat(client, f"question {n} under key A") for n in range(3)]
            before = {i: (await client.get(f"/api/v1/conversations/{i}")).json() for i in ids}

        # Key B alone cannot read A's data: a clear refusal, nothing started.
        refused = subprocess.run(  # noqa: ASYNC221 - the test waits for this exit on purpose
            [sys.executable, "-m", "appliance", "serve"],
            env=daemon_environment(state, {"SECRET_KEY": KEY_B, "PRIVACY_SALT": SALT}),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 1
        assert "sealed with key id" in refused.stderr
        assert "SECRET_KEY_PREVIOUS" in refused.stderr
        assert KEY_A not in refused.stderr + refused.stdout

        rotating = {
            "SECRET_KEY": KEY_B,
            "PRIVACY_SALT": SALT,
            "SECRET_KEY_PREVIOUS": KEY_A,
            "PRIVACY_SALT_PREVIOUS": SALT,
        }
        async with running_daemon(rotating, state_dir=state) as b, b.client() as client:
            metrics = (await client.get("/api/v1/health/metrics")).json()["privacy"]
            assert metrics["conversations_under_old_keys"] == 3
            status = _keys(state, rotating, "status", "--json")
            assert '"under_old_keys": 3' in status.stdout
            # Rotate while the daemon runs; it uses the daemon's Redis.
            rotated = await trio.to_thread.run_sync(_keys, state, rotating, "rotate")
            assert rotated.returncode == 0, rotated.stderr
            assert "re-sealed 3 conversations" in rotated.stdout
            metrics = (await client.get("/api/v1/health/metrics")).json()["privacy"]
            assert metrics["conversations_under_old_keys"] == 0

        async with (
            running_daemon({"SECRET_KEY": KEY_B, "PRIVACY_SALT": SALT}, state_dir=state) as c,
            c.client() as client,
        ):
            after = {i: (await client.get(f"/api/v1/conversations/{i}")).json() for i in ids}
        assert after == before


async def test_retention_sweeps_what_expired_and_its_index_entries() -> None:
    directory = short_tempdir()
    now = [1_000_000_000.0]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            redis = EmbeddedRedis(directory, directory / "run", "64mb")
            await nursery.start(redis.run)
            store = Store(f"unix://{redis.socket_path}")
            await nursery.start(store.run)
            codec = await trio.to_thread.run_sync(KeyRing, KEY_A, SALT)
            conversations = Conversations(
                store, codec, retention_seconds=7 * DAY_SECONDS, clock=lambda: now[0]
            )

            async def write(text: str) -> str:
                conversation_id = os.urandom(16).hex()
                await conversations.record_exchange(
                    conversation_id,
                    owner="local",
                    model="tiny",
                    question=text,
                    answer="ok",
                    prompt_tokens=1,
                    completion_tokens=1,
                )
                return conversation_id

            old = [await write(f"old {n}") for n in range(5)]
            now[0] += 6 * DAY_SECONDS
            recent = [await write(f"recent {n}") for n in range(3)]
            now[0] += 2 * DAY_SECONDS  # the old ones are now 8 days idle, the recent ones 2
            sweeper = RetentionService(conversations, 7, 3600, clock=lambda: now[0])
            assert await sweeper.sweep() == 5
            client = store.client
            for conversation_id in old:
                assert await conversations.get(conversation_id) is None
            for conversation_id in recent:
                assert await conversations.get(conversation_id) is not None
            assert await client.zcard(INDEX_KEY) == 3
            assert await client.scard(owner_key("local")) == 3
            assert await client.scard(BYKEY_PREFIX + codec.current_id) == 3
            assert await sweeper.sweep() == 0
            # Redis TTLs back the sweep up.
            assert 0 < await client.ttl(messages_key(recent[0])) <= 8 * DAY_SECONDS

            # A conversation whose keys expired by TTL before any sweep leaves no trace.
            ghost = recent[0]
            await client.delete([meta_key(ghost), messages_key(ghost)])
            # One written just now whose index entry still has its old score (the
            # writer's MULTI ran, its ZADD not yet) is not deleted by a sweep.
            busy = recent[1]
            await client.zadd(INDEX_KEY, {ghost: now[0] - 30 * DAY_SECONDS})
            await client.zadd(INDEX_KEY, {busy: now[0] - 30 * DAY_SECONDS})
            assert await sweeper.sweep() == 1
            assert await conversations.get(busy) is not None
            assert await client.zscore(INDEX_KEY, busy) > now[0] - 7 * DAY_SECONDS
            assert not await client.sismember(owner_key("local"), ghost)
            assert not await client.sismember(BYKEY_PREFIX + codec.current_id, ghost)
            assert await client.scard(owner_key("local")) == 2
            nursery.cancel_scope.cancel()


async def test_erasure_and_redaction_endpoint_and_hashed_clients_in_logs() -> None:
    with trio.fail_after(90):
        async with running_daemon({"SECRET_KEY": KEY_A, "PRIVACY_SALT": SALT}) as daemon:
            async with daemon.client() as client:
                ids = [await _chat(client, f"talk {n}") for n in range(3)]
                one = await client.delete(f"/api/v1/conversations/{ids[0]}")
                assert one.json()["messages_removed"] == 2
                erased = (await client.delete("/api/v1/privacy/data")).json()
                assert erased == {"conversations_removed": 2, "messages_removed": 4}
                assert (await client.get("/api/v1/conversations")).json()["total"] == 0
                redis = _redis(daemon.state_dir)
                async with redis:
                    left = [k async for k in redis.scan_iter(match="conv:*")]
                    members = await redis.scard(BYKEY_PREFIX + "x")
                assert all(not k.startswith(b"conv:{") for k in left), left
                assert members == 0
                redacted = await client.post(
                    "/api/v1/privacy/redact", json={"text": f"write to {EMAIL} now"}
                )
                body = redacted.json()
                assert body["text"] == "write to [EMAIL] now"
                assert body["level"] == "strict"
                assert body["counts"] == {"EMAIL": 1}
            await daemon.stop()
        access = [line for line in daemon.log_lines() if line.get("logger") == "appliance.access"]
        assert access and all(len(line["client"]) == 16 for line in access)
        assert b"127.0.0.1" not in b"".join(str(line.get("client", "")).encode() for line in access)
