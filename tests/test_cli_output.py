"""CLI output an operator pipes on: a closed pipe ends a command quietly, and `appliance
logs` says where the logs are, shows errors only (journal priority) or access lines only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping

import pytest
import trio

from tests.harness import daemon_environment, free_port, running_daemon, short_tempdir
from tests.test_logs import journald  # noqa: F401 - the real journald fixture


def _to_closed_pipe(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run a command whose stdout is a pipe nobody reads any more (`... | head -1` once
    head has gone)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "appliance", *args],
            env=dict(env),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)


def _quiet(done: subprocess.CompletedProcess[str]) -> None:
    # 141 = 128 + SIGPIPE: what a shell shows for a tool stopped by a closed pipe.
    assert done.returncode == 141, done.stderr
    for noise in ("Traceback", "Exception ignored", "BrokenPipe", "Broken pipe"):
        assert noise not in done.stderr


async def test_output_to_a_closed_pipe_ends_quietly() -> None:
    port = free_port()
    with trio.fail_after(240):
        async with running_daemon({"APPLIANCE_BIND": f"127.0.0.1:{port}"}) as daemon:
            for command in (["status"], ["keys", "list"], ["keys", "list", "--json"]):
                done = await trio.to_thread.run_sync(_to_closed_pipe, daemon.env, *command)
                _quiet(done)
    env = daemon_environment(short_tempdir(), {})
    _quiet(await trio.to_thread.run_sync(_to_closed_pipe, env, "config", "check"))


def _logs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "logs", *args],
        env=daemon_environment(short_tempdir(), {}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_logs_that_find_nothing_say_where_the_logs_are() -> None:
    done = _logs("--request-id", f"req-{uuid.uuid4().hex}")
    assert done.returncode == 1 and done.stdout == ""
    assert "standard output" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.journald
def test_logs_show_errors_only_and_access_lines_only(journald: None) -> None:  # noqa: F811
    marker = f"req-{uuid.uuid4().hex[:16]}"
    script = (
        "import logging; from appliance.logs import configure_logging; "
        "configure_logging('INFO'); "
        f"extra = {{'request_id': '{marker}'}}; "
        "logging.getLogger('appliance.t').info('an info line', extra=extra); "
        "logging.getLogger('appliance.t').warning('a warning line', extra=extra); "
        "logging.getLogger('appliance.t').error('an error line', extra=extra); "
        "logging.getLogger('appliance.access').info('GET /api/v1/usage 200', "
        "extra={**extra, 'endpoint': '/api/v1/usage', 'method': 'GET', 'status': 200, "
        "'duration_ms': 1.5})"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    deadline = time.monotonic() + 20
    while True:
        every = _logs("--request-id", marker, "--json")
        if len(every.stdout.splitlines()) == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(every.stdout.splitlines()) == 4, every.stderr
    errors = _logs("--request-id", marker, "--level", "error", "--json")
    assert errors.returncode == 0, errors.stderr
    assert [json.loads(line)["message"] for line in errors.stdout.splitlines()] == ["an error line"]
    access = _logs("--request-id", marker, "--access", "--json")
    assert access.returncode == 0, access.stderr
    lines = [json.loads(line) for line in access.stdout.splitlines()]
    assert [line["message"] for line in lines] == ["GET /api/v1/usage 200"]
    assert lines[0]["logger"] == "appliance.access" and lines[0]["status"] == "200"
    readable = _logs("--request-id", marker, "--access")
    assert f"GET /api/v1/usage 200 [{marker}]" in readable.stdout
    _quiet(_to_closed_pipe(daemon_environment(short_tempdir(), {}), "logs", "--request-id", marker))
