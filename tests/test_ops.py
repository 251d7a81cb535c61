"""Operations: update with rollback, service control without systemd, logs from journald.

systemd is not PID 1 on the test machines, so the update test stands in a small
`systemctl` of its own (APPLIANCE_SYSTEMCTL) that does what systemd would do for
`restart appliance.service`: stop the running daemon with SIGTERM and start the installed
build's `appliance serve`. Everything else is real: the daemon, its redis-server, the HTTP
readiness checks, the backup taken first and the directory swap.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import trio

from tests.harness import (
    daemon_environment,
    free_port,
    install_tiny_model,
    running_daemon,
    short_tempdir,
)
from tests.test_logs import journald  # noqa: F401 - the real journald fixture

KEYS = {"SECRET_KEY": "u" * 40, "PRIVACY_SALT": "update-test-salt"}

FAKE_SYSTEMCTL = """\
#!{python}
# Stands in for systemctl where systemd is not PID 1: restart/start/stop of the one unit,
# running the installed build's `appliance serve` directly.
import os, signal, subprocess, sys, time
action, pidfile = sys.argv[1], os.environ["FAKE_PIDFILE"]
def stop():
    try:
        pid = int(open(pidfile).read())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    for _ in range(600):
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.1)
if action in ("stop", "restart"):
    stop()
if action in ("start", "restart"):
    log = open(os.environ["FAKE_LOG"], "ab")
    child = subprocess.Popen([os.environ["FAKE_EXEC"], "serve"], stdout=log, stderr=log,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    open(pidfile, "w").write(str(child.pid))
"""

WORKING_BUILD = """\
#!/bin/sh
exec {python} -m appliance "$@"
"""

BROKEN_BUILD = """\
#!/bin/sh
# Says its version, then fails at once: the kind of build an update must roll back.
if [ "$1" = "--version" ]; then echo "appliance 9.9.9"; exit 0; fi
exit 1
"""


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )


async def _ready(port: int) -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        return (await client.get(f"http://127.0.0.1:{port}/api/v1/health/ready")).status_code


async def test_update_swaps_backs_up_and_rolls_back_a_broken_build() -> None:
    work = short_tempdir()
    state = work / "s"
    state.mkdir()
    port = free_port()
    root = Path(__file__).parent.parent
    python = sys.executable
    install = work / "lib" / "appliance"
    _executable(install / "appliance", WORKING_BUILD.format(python=python))
    good = _executable(work / "good" / "appliance", WORKING_BUILD.format(python=python))
    broken = _executable(work / "broken" / "appliance", BROKEN_BUILD)
    systemctl = _executable(work / "systemctl", FAKE_SYSTEMCTL.format(python=python))
    install_tiny_model(state / "models")
    env = daemon_environment(state, {**KEYS, "APPLIANCE_BIND": f"127.0.0.1:{port}"})
    env.update(
        {
            "APPLIANCE_SYSTEMCTL": str(systemctl),
            "FAKE_PIDFILE": str(work / "service.pid"),
            "FAKE_LOG": str(work / "service.log"),
            "FAKE_EXEC": str(install / "appliance"),
            "PYTHONPATH": str(root),
        }
    )
    try:
        with trio.fail_after(300):
            started = await trio.to_thread.run_sync(lambda: _run(env, "restart", "--timeout", "60"))
            assert started.returncode == 0, started.stderr
            assert await _ready(port) == 200

            updated = await trio.to_thread.run_sync(
                lambda: _run(env, "update", str(good), "--install-dir", str(install))
            )
            assert updated.returncode == 0, updated.stderr
            assert "backed up to" in updated.stdout and "is ready" in updated.stdout
            assert (work / "lib" / "appliance.previous" / "appliance").exists()
            assert len(list((state / "backups").glob("data-backup-*.tar.gz"))) == 1

            failed = await trio.to_thread.run_sync(
                lambda: _run(
                    env, "update", str(broken), "--install-dir", str(install), "--timeout", "10"
                )
            )
            assert failed.returncode == 1
            assert "9.9.9 did not become ready" in failed.stderr
            assert "rolled back" in failed.stderr and "serving again" in failed.stderr
            assert "Traceback" not in failed.stderr
            # The working build is installed and serving again; the broken one is kept aside.
            assert (install / "appliance").read_text() == WORKING_BUILD.format(python=python)
            assert (work / "lib" / "appliance.failed" / "appliance").read_text() == BROKEN_BUILD
            assert await _ready(port) == 200
            assert len(list((state / "backups").glob("data-backup-*.tar.gz"))) == 2

            # A build that cannot even say its version is refused before anything changes.
            dud = _executable(work / "dud" / "appliance", "#!/bin/sh\nexit 3\n")
            refused = await trio.to_thread.run_sync(
                lambda: _run(env, "update", str(dud), "--install-dir", str(install))
            )
            assert refused.returncode == 1 and "nothing changed" in refused.stderr
    finally:
        subprocess.run([str(systemctl), "stop"], env=env, timeout=120, check=False)  # noqa: ASYNC221 - cleanup must finish


def test_service_commands_say_clearly_that_systemd_is_not_running() -> None:
    if Path("/run/systemd/system").is_dir():
        pytest.skip("systemd runs on this machine")
    state = short_tempdir()
    env = daemon_environment(state, {})
    for action in ("start", "stop", "restart"):
        done = _run(env, action)
        assert done.returncode == 1
        assert "systemd is not running on this machine" in done.stderr
        assert "appliance serve" in done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.journald
async def test_logs_finds_a_request_in_the_journal(journald: None) -> None:  # noqa: F811
    request_id = f"req-{uuid.uuid4().hex[:12]}"
    with trio.fail_after(90):
        async with running_daemon() as daemon, daemon.client() as client:
            await client.get("/api/v1/health/ready", headers={"X-Request-ID": request_id})
        env = daemon_environment(daemon.state_dir, {})
        entries: list[dict[str, str]] = []
        for _ in range(50):
            done = await trio.to_thread.run_sync(
                lambda: _run(env, "logs", "--request-id", request_id, "--json")
            )
            entries = [json.loads(line) for line in done.stdout.splitlines()]
            # Nothing found (yet) is exit 1 with a line that says where the logs are.
            assert done.returncode == (0 if entries else 1), done.stderr
            if entries:
                break
            await trio.sleep(0.2)
        assert len(entries) == 1
        assert entries[0]["request_id"] == request_id
        assert entries[0]["endpoint"] == "/api/v1/health/ready"
        assert entries[0]["status"] == "200"
        assert entries[0]["level"] == "INFO"
        readable = await trio.to_thread.run_sync(
            lambda: _run(env, "logs", "--request-id", request_id)
        )
        assert f"[{request_id}]" in readable.stdout
        assert "GET /api/v1/health/ready 200" in readable.stdout
        errors_only = await trio.to_thread.run_sync(
            lambda: _run(env, "logs", "--request-id", request_id, "--level", "ERROR", "--json")
        )
        assert errors_only.stdout.strip() == ""
        assert errors_only.returncode == 1 and "no matching entries" in errors_only.stderr
