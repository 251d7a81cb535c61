"""The real daemon end to end: systemd notify, watchdog, Redis restarts, graceful stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import coredis
import httpx
import trio

from tests.harness import (
    daemon_environment,
    free_port,
    pid_alive,
    running_daemon,
    short_tempdir,
)


async def test_notify_ready_status_watchdog_stopping_in_order() -> None:
    with trio.fail_after(90):
        async with running_daemon({"WATCHDOG_USEC": "400000"}) as daemon:
            assert daemon.notify is not None
            first = daemon.notify.messages[-1][1]
            assert first.startswith("READY=1")
            assert "STATUS=ready:" in first
            # WATCHDOG_USEC=0.4 s: pings every 0.2 s while everything is healthy.
            for _ in range(3):
                await daemon.notify.wait_for("WATCHDOG=1", timeout=5)
            assert await daemon.stop() == 0
            # The socket still holds what was sent before exiting.
            with trio.move_on_after(2):
                while not any("STOPPING=1" in m for _, m in daemon.notify.messages):
                    await daemon.notify.receive()
            kinds = [m.split("=", 1)[0] for _, m in daemon.notify.messages]
            assert kinds[0] == "READY"
            assert "WATCHDOG" in kinds
            assert kinds.index("STOPPING") > kinds.index("WATCHDOG")
            assert "WATCHDOG" not in kinds[kinds.index("STOPPING") + 1 :]


async def test_wedged_redis_stops_watchdog_pings_and_they_resume() -> None:
    with trio.fail_after(90):
        async with running_daemon({"WATCHDOG_USEC": "400000"}) as daemon:
            assert daemon.notify is not None
            await daemon.notify.wait_for("WATCHDOG=1", timeout=5)
            redis_pid = await daemon.service_pid("redis")
            os.kill(redis_pid, signal.SIGSTOP)
            try:
                # The store's probe goes stale within a few seconds; then no more pings.
                silent = False
                with trio.move_on_after(20):
                    while True:
                        with trio.move_on_after(2.5) as gap:
                            await daemon.notify.wait_for("WATCHDOG=1", timeout=10)
                        if gap.cancelled_caught:
                            silent = True
                            break
                assert silent, "watchdog pings continued while redis-server was stopped"
                async with daemon.client() as client:
                    ready = await client.get("/api/v1/health/ready")
                assert ready.status_code == 503
            finally:
                os.kill(redis_pid, signal.SIGCONT)
            await daemon.notify.wait_for("WATCHDOG=1", timeout=15)
            status = [m for _, m in daemon.notify.messages if m.startswith("STATUS=degraded")]
            assert status, "STATUS= never said the daemon was degraded"


async def test_redis_kill9_restarts_and_keeps_acknowledged_writes() -> None:
    with trio.fail_after(90):
        async with running_daemon() as daemon:
            socket_path = daemon.state_dir / "run" / "redis.sock"
            client = coredis.Redis(unix_socket_path=str(socket_path))
            async with client:
                for number in range(200):
                    await client.set(f"test:key:{number}", f"value-{number}")
            old_pid = await daemon.service_pid("redis")
            os.kill(old_pid, signal.SIGKILL)

            seen = []
            async with daemon.client() as http:
                while not (seen and seen[-1] == 200 and 503 in seen):
                    seen.append((await http.get("/api/v1/health/ready")).status_code)
            assert 503 in seen
            new_pid = await daemon.service_pid("redis")
            assert new_pid != old_pid
            client = coredis.Redis(unix_socket_path=str(socket_path))
            async with client:
                values = [await client.get(f"test:key:{n}") for n in range(200)]
            assert values == [f"value-{n}".encode() for n in range(200)]
            async with daemon.client() as http:
                services = (await http.get("/api/v1/health/services")).json()["services"]
            redis = next(s for s in services if s["name"] == "redis")
            assert redis["restarts"] == 1
            assert "exited" in redis["last_error"]


async def test_sigterm_lets_a_slow_request_finish_then_exits_cleanly() -> None:
    with trio.fail_after(90):
        async with running_daemon() as daemon:
            redis_pid = await daemon.service_pid("redis")
            result: dict[str, httpx.Response] = {}

            async def slow_request() -> None:
                async with daemon.client() as client:
                    result["response"] = await client.get(
                        "/api/v1/health/metrics", params={"sample_seconds": "2"}
                    )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_request)
                await trio.sleep(0.5)
                daemon.process.send_signal(signal.SIGTERM)
            assert result["response"].status_code == 200
            assert "system" in result["response"].json()
            assert await daemon.wait_exit() == 0
            assert not pid_alive(redis_pid), "redis-server outlived the daemon"
            messages = [line.get("message", "") for line in daemon.log_lines()]
            assert any("received SIGTERM" in m for m in messages)
            # Redis saved on the way out.
            assert (daemon.state_dir / "redis" / "dump.rdb").exists()


async def test_without_notify_socket_the_daemon_still_serves() -> None:
    port = free_port()
    with trio.fail_after(60):
        async with running_daemon({"APPLIANCE_BIND": f"127.0.0.1:{port}"}, notify=False) as d:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                while True:
                    try:
                        response = await client.get("/api/v1/health/ready")
                    except httpx.TransportError:
                        await trio.sleep(0.1)
                        continue
                    if response.status_code == 200:
                        break
                    await trio.sleep(0.1)
            assert await d.stop() == 0


def test_production_with_weak_secret_refuses_to_start() -> None:
    state = short_tempdir()
    env = daemon_environment(
        state, {"APPLIANCE_ENV": "production", "SECRET_KEY": "too-short", "PRIVACY_SALT": "s"}
    )
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "SECRET_KEY" in done.stderr
    assert "32" in done.stderr
    assert "too-short" not in done.stderr + done.stdout
    # Nothing was started: no Redis data, no runtime dir.
    assert not (state / "redis").exists()
    assert not (state / "run").exists()


async def test_repeated_service_failure_exits_non_zero() -> None:
    state = short_tempdir()
    # A file where Redis's data directory belongs: every start of redis fails.
    (state / "redis").write_text("not a directory")
    env = daemon_environment(
        state, {"APPLIANCE_RESTART_LIMIT": "2", "APPLIANCE_RESTART_WINDOW": "60"}
    )
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-m", "appliance", "serve"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 1
    output = done.stdout.decode()
    assert "service redis failed 3 times" in output
    assert "systemd restarts the unit" in output


async def test_external_redis_url_skips_the_embedded_server() -> None:
    from appliance.store.server import redis_executable

    directory = short_tempdir()
    sock = directory / "ext.sock"
    server = await trio.lowlevel.open_process(
        [redis_executable(), "--port", "0", "--unixsocket", str(sock), "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(60):
            while not sock.exists():  # noqa: ASYNC110 - polling a file, no event to wait on
                await trio.sleep(0.05)
            async with running_daemon({"APPLIANCE_REDIS_URL": f"unix://{sock}"}) as daemon:
                async with daemon.client() as client:
                    names = [
                        s["name"]
                        for s in (await client.get("/api/v1/health/services")).json()["services"]
                    ]
                    ready = await client.get("/api/v1/health/ready")
                assert names == [
                    "store",
                    "retention",
                    "backups",
                    "models",
                    "worker:tiny",
                    "pulls",
                    "http",
                ]
                assert ready.status_code == 200
                assert not (daemon.state_dir / "redis").exists()
    finally:
        server.terminate()
        await server.wait()


async def test_kill9_of_the_supervisor_takes_redis_down_with_it() -> None:
    with trio.fail_after(60):
        async with running_daemon() as daemon:
            redis_pid = await daemon.service_pid("redis")
            daemon.process.kill()
            await daemon.wait_exit()
            while pid_alive(redis_pid):  # noqa: ASYNC110 - polling another process
                await trio.sleep(0.05)
        # A restarted daemon finds the old socket and data and starts cleanly.
        async with running_daemon(state_dir=daemon.state_dir) as again, again.client() as client:
            assert (await client.get("/api/v1/health/ready")).status_code == 200


async def test_children_outlive_trio_worker_threads() -> None:
    # PR_SET_PDEATHSIG follows the thread that forked the child; trio retires idle pool
    # threads after 10 s. A child forked from the pool would be killed then.
    with trio.fail_after(60):
        async with running_daemon() as daemon:
            pid = await daemon.service_pid("redis")
            await trio.sleep(12)
            assert await daemon.service_pid("redis") == pid
            async with daemon.client() as client:
                services = (await client.get("/api/v1/health/services")).json()["services"]
            assert all(s["restarts"] == 0 for s in services), services


async def test_idle_keep_alive_connections_do_not_hold_up_the_stop() -> None:
    async with (
        running_daemon({"APPLIANCE_GRACEFUL_TIMEOUT": "120"}) as daemon,
        daemon.client() as client,
    ):
        assert (await client.get("/api/v1/health/live")).status_code == 200
        # The client keeps its connection open; nothing is in flight.
        daemon.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await daemon.wait_exit() == 0
