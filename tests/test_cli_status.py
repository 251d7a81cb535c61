"""`appliance status` against the real daemon, and when nothing runs."""

from __future__ import annotations

import json
import sys

import trio

from tests.harness import daemon_environment, free_port, running_daemon, short_tempdir


async def _status(env: dict[str, str], *args: str) -> trio.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "appliance", "status", *args],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_status_table_and_json_from_the_running_daemon() -> None:
    port = free_port()
    with trio.fail_after(60):
        async with running_daemon({"APPLIANCE_BIND": f"127.0.0.1:{port}"}) as daemon:
            table = await _status(daemon.env)
            assert table.returncode == 0, table.stderr
            text = table.stdout.decode()
            assert "ready" in text.splitlines()[0]
            for name in ("redis", "store", "http"):
                assert any(line.startswith(name) for line in text.splitlines()), name
            as_json = await _status(daemon.env, "--json")
            report = json.loads(as_json.stdout)
            assert report["ready"] is True
            assert {s["name"] for s in report["services"]} == {
                "redis",
                "store",
                "retention",
                "backups",
                "models",
                "worker:tiny",
                "pulls",
                "http",
            }


async def test_status_says_clearly_when_the_daemon_is_not_running() -> None:
    env = daemon_environment(short_tempdir(), {"APPLIANCE_BIND": f"127.0.0.1:{free_port()}"})
    with trio.fail_after(60):
        done = await _status(env)
    assert done.returncode == 3
    assert "not running" in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()
