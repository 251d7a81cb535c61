"""Two appliances on one Redis, and what a default appliance connects to.

The first test runs two daemons that share the embedded Redis of one of them (the second
with APPLIANCE_REDIS_URL) and spends one key's budget through both at once; the last one
shows that they take turns at retention (once per period between them, waiting out the
lock of an appliance that died mid-sweep) and that the one on an external Redis refuses
backups. The second
proves that, with the remote LLM and search off, no process of the appliance opens a
connection anywhere but to itself: every Python process (daemon and worker) runs with an
audit hook (sitecustomize) that records each socket connect, sendto and name lookup.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import coredis
import trio

from appliance.privacy.retention import DAY_SECONDS, DONE_KEY, LOCK_KEY
from appliance.store.client import Store
from appliance.store.conversations import Conversations, meta_key
from appliance.store.sealing import KeyRing
from tests.harness import Daemon, daemon_environment, running_daemon, short_tempdir

SHARED_SECRETS = {
    # Both appliances must derive the same key hashes and sealing keys.
    "SECRET_KEY": "shared-secret-for-two-appliances-0123456789",
    "PRIVACY_SALT": "shared-salt-0123456789",
}


async def _spend(daemon: Daemon, key: str, results: list[int]) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 20,
        "temperature": 0,
    }
    async with daemon.client(key=key, timeout=60) as client:
        for _ in range(12):
            answer = await client.post("/v1/chat/completions", json=body)
            results.append(answer.status_code)
            if answer.status_code == 429:
                assert answer.json()["error"]["code"] == "budget_exhausted"
                return
            assert answer.status_code == 200, answer.text


async def test_two_appliances_on_one_redis_share_keys_conversations_and_budgets() -> None:
    with trio.fail_after(180):
        async with running_daemon(SHARED_SECRETS) as first:
            socket_path = Path(first.env["APPLIANCE_STATE_DIR"]) / "run" / "redis.sock"
            assert socket_path.exists()
            second_env = {**SHARED_SECRETS, "APPLIANCE_REDIS_URL": f"unix://{socket_path}"}
            async with running_daemon(second_env, state_dir=short_tempdir()) as second:
                budget = 150
                key = await first.create_key("shared", tokens_per_day=budget)
                # A conversation written through one is read and deleted through the other.
                async with first.client(key=key) as one, second.client(key=key) as two:
                    sent = await one.post(
                        "/api/v1/chat/send", json={"message": "hello", "max_tokens": 2}
                    )
                    assert sent.status_code == 200, sent.text
                    conversation = sent.json()["conversation_id"]
                    read = await two.get(f"/api/v1/conversations/{conversation}")
                    assert read.status_code == 200
                    assert read.json()["messages"][0]["content"] == "hello"
                    assert (await two.delete(f"/api/v1/conversations/{conversation}")).is_success
                    assert (await one.get(f"/api/v1/conversations/{conversation}")).status_code == (
                        404
                    )

                # Both spend the same budget at once; neither can overspend it by more
                # than one request's worth (a prompt is only estimated when reserving).
                results: list[int] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_spend, first, key, results)
                    nursery.start_soon(_spend, second, key, results)
                assert results.count(429) == 2
                async with second.client(key=key) as client:
                    usage = (await client.get("/api/v1/usage")).json()["local"]
                one_request = 20 + 40  # max_tokens + a generous prompt
                assert budget - one_request < usage["day"] <= budget + one_request
                async with first.client(key=key) as client:
                    assert (await client.get("/api/v1/usage")).json()["local"] == usage


# --- no outbound connections -------------------------------------------------------------

_AUDIT_HOOK = """
import json, os, sys

_LOG = os.environ.get("NETWORK_AUDIT_LOG")


def _address(value):
    return list(value) if isinstance(value, tuple) else value


def _write(record):
    record["pid"] = os.getpid()
    with open(_LOG, "a", encoding="utf-8") as log:
        log.write(json.dumps(record, default=repr) + "\\n")


def _hook(event, args):
    if _LOG is None:
        return
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        record = {"event": event, "family": int(args[0].family), "address": _address(args[1])}
    elif event == "socket.getaddrinfo":
        record = {"event": event, "host": _address(args[0])}
    else:
        return
    _write(record)


if _LOG is not None:
    _write({"event": "start"})
    sys.addaudithook(_hook)
"""


def _is_loopback(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host in (None, "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False


async def test_with_remote_and_search_off_nothing_connects_outside_the_box() -> None:
    hook_dir = short_tempdir("hk")
    (hook_dir / "sitecustomize.py").write_text(_AUDIT_HOOK)
    log = hook_dir / "network.jsonl"
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")])),
        "NETWORK_AUDIT_LOG": str(log),
        "APPLIANCE_BACKUP_INTERVAL": "0",
        # Configured but switched off (SEARCH_ENABLED=false): never contacted.
        "APPLIANCE_SEARCH_URL": "http://192.0.2.10:8888",
    }
    with trio.fail_after(120):
        async with running_daemon(env) as daemon:
            async with daemon.client() as client:
                chat = await client.post(
                    "/api/v1/chat/send", json={"message": "hi there", "max_tokens": 3}
                )
                assert chat.status_code == 200, chat.text
                streamed = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "tiny",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 3,
                        "stream": True,
                    },
                )
                assert streamed.status_code == 200
                remote = await client.post(
                    "/v1/chat/completions",
                    json={"model": "remote:gpt-4o", "messages": [{"role": "user", "content": "x"}]},
                )
                assert remote.status_code == 403
                searched = await client.post(
                    "/api/v1/chat/send", json={"message": "Who wrote Hamlet?", "search": "always"}
                )
                assert searched.status_code == 403
                for path in ("/v1/models", "/api/v1/usage", "/api/v1/health/metrics"):
                    assert (await client.get(path)).status_code == 200
                backup = await client.post("/api/v1/admin/backups")
                assert backup.status_code < 300, backup.text
                worker = await daemon.service_pid("worker:tiny")
            await daemon.stop()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    started = {record["pid"] for record in records if record["event"] == "start"}
    # The hook ran in the daemon and in the inference worker, and saw the daemon connect
    # to its Redis: it would have seen any other connection.
    assert daemon.process.pid in started and worker in started
    assert any(r["event"] == "socket.connect" and r["family"] == socket.AF_UNIX for r in records)

    def leaves_the_box(record: dict[str, Any]) -> bool:
        if record["event"] == "socket.getaddrinfo":
            return not _is_loopback(record["host"])
        if record["event"] == "start" or record["family"] == socket.AF_UNIX:
            return False
        return not _is_loopback(record["address"][0])

    assert [record for record in records if leaves_the_box(record)] == []


# --- retention turns and backups with a shared Redis ---------------------------------------


def sweep_times(daemon: Daemon) -> list[float]:
    """When this appliance's retention sweeps ran (from its log lines)."""
    times = []
    for line in daemon.log_lines():
        if str(line.get("message", "")).startswith("retention sweep deleted"):
            stamp = datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
            times.append(stamp.timestamp())
    return times


async def write_conversations(url: str, count: int, days_ago: float) -> list[str]:
    """Conversations last active `days_ago` days ago, written by the product's store code
    (retention is 7 days)."""
    codec = await trio.to_thread.run_sync(
        KeyRing, SHARED_SECRETS["SECRET_KEY"], SHARED_SECRETS["PRIVACY_SALT"]
    )
    written = []
    async with trio.open_nursery() as nursery:
        store = Store(url)
        await nursery.start(store.run)
        conversations = Conversations(
            store,
            codec,
            retention_seconds=7 * DAY_SECONDS,
            clock=lambda: time.time() - days_ago * DAY_SECONDS,
        )
        for n in range(count):
            conversation_id = os.urandom(16).hex()
            await conversations.record_exchange(
                conversation_id,
                owner="retention-test",
                model="tiny",
                question=f"question {n}",
                answer="answer",
                prompt_tokens=1,
                completion_tokens=1,
            )
            written.append(conversation_id)
        nursery.cancel_scope.cancel()
    return written


async def test_appliances_on_one_redis_take_turns_at_retention_and_refuse_backups() -> None:
    period = 1.5
    env = {**SHARED_SECRETS, "APPLIANCE_RETENTION_SWEEP_SECONDS": str(period)}
    with trio.fail_after(180):
        async with running_daemon({**env, "APPLIANCE_BACKUP_INTERVAL": "0"}) as first:
            socket_path = Path(first.env["APPLIANCE_STATE_DIR"]) / "run" / "redis.sock"
            url = f"unix://{socket_path}"
            second_env = {**env, "APPLIANCE_REDIS_URL": url, "APPLIANCE_BACKUP_INTERVAL": "1"}
            async with running_daemon(second_env, state_dir=short_tempdir()) as second:
                client: coredis.Redis[bytes] = coredis.Redis(unix_socket_path=str(socket_path))
                async with client:
                    await trio.sleep(3 * period)
                    # An appliance that died in the middle of a sweep: its lock is taken
                    # like any appliance takes it, and the period is not marked swept.
                    while True:
                        taken = await client.set(
                            LOCK_KEY, "dead-holder", condition=coredis.PureToken.NX, px=4000
                        )
                        if taken:
                            break
                        await trio.sleep(0.01)
                    await client.delete([DONE_KEY])
                    held_from = time.time()
                    expired = await write_conversations(url, 10, days_ago=8)
                    await trio.sleep(2 * period)
                    # Nobody sweeps, and nobody but its holder removes the lock.
                    assert await client.get(LOCK_KEY) == b"dead-holder"
                    assert all([await client.exists([meta_key(c)]) for c in expired])
                    # Once it has expired, the next sweep deletes what expired.
                    with trio.fail_after(4 + 2 * period):
                        while True:
                            if not any([await client.exists([meta_key(c)]) for c in expired]):
                                break
                            await trio.sleep(0.1)
                    gone_at = time.time()
                    assert gone_at >= held_from + 3.9

                # Backups: the embedded store's appliance makes them; the one using it
                # through APPLIANCE_REDIS_URL refuses, pointing at Redis' own persistence.
                async with second.client() as http:
                    refused = await http.post("/api/v1/admin/backups")
                assert refused.status_code == 409, refused.text
                assert "Redis' own persistence" in refused.json()["error"]["message"]
                command = await trio.run_process(
                    [sys.executable, "-m", "appliance", "backup"],
                    env=daemon_environment(second.state_dir, second.env),
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                assert command.returncode == 1
                assert b"RDB" in command.stderr and b"BGSAVE" in command.stderr
        sweeps = sorted(sweep_times(first) + sweep_times(second))
        # One sweep per period between the two; none while the dead holder's lock lasted.
        gaps = [later - earlier for earlier, later in itertools.pairwise(sweeps)]
        assert all(gap >= period for gap in gaps), gaps
        assert not [t for t in sweeps if held_from < t < held_from + 3.9]
        backup_lines = [
            line for line in second.log_lines() if line.get("logger") == "appliance.backup"
        ]
        assert len(backup_lines) <= 1, backup_lines
