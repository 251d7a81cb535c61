"""One daemon per state dir: its lock, commands that use the running daemon's Redis, and
never two redis-servers on one AOF (watched with psutil for the whole of each test)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

from tests.harness import (
    NotifySocket,
    daemon_environment,
    free_port,
    install_tiny_model,
    running_daemon,
    short_tempdir,
)


def redis_servers(state: Path) -> set[int]:
    """redis-server processes on this state dir's data (a redis-server works in its data
    dir; it rewrites its command line, so that cannot tell). A server's own fork (the
    child that writes a snapshot or rewrites the AOF, as when a store that has only
    dump.rdb turns its AOF on) is part of that server, not another one."""
    data = (state / "redis").resolve()
    parents: dict[int, int] = {}
    for process in psutil.process_iter(["name", "ppid"]):
        if "redis-server" not in (process.info["name"] or ""):
            continue
        if _serves(process, data):
            parents[process.pid] = process.info["ppid"]
    return {pid for pid, parent in parents.items() if parent not in parents}


def _serves(process: psutil.Process, data: Path) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE and Path(process.cwd()) == data
    except psutil.Error:
        return False


def redis_servers_at_once(state: Path) -> set[int]:
    """The state dir's redis-servers that all ran at one moment. A scan is not one moment:
    it can meet a server that is stopping and, a few pids later, the one that replaced it.
    Those found are looked at again: each was running when the scan met it and is still
    running when looked at again, so all were running when the first was looked at again
    (the rest were already running then)."""
    found = redis_servers(state)
    if len(found) < 2:
        return found
    data = (state / "redis").resolve()
    again = set()
    for pid in sorted(found):
        with contextlib.suppress(psutil.Error):
            if _serves(psutil.Process(pid), data):
                again.add(pid)
    return again


class RedisWatch:
    """Polls the state dir's redis-servers until cancelled: `most` is the largest number
    seen running at once, `seen` every pid."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.most = 0
        self.seen: set[int] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            now = await trio.to_thread.run_sync(redis_servers_at_once, self.state)
            self.most = max(self.most, len(now))
            self.seen |= now
            await trio.sleep(0.02)


@dataclass
class Done:
    code: int
    out: str
    err: str


async def _appliance(env: Mapping[str, str], *args: str, timeout: float = 180) -> Done:
    with trio.fail_after(timeout):
        done = await trio.run_process(
            [sys.executable, "-m", "appliance", *args],
            env=dict(env),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return Done(done.returncode, done.stdout.decode(), done.stderr.decode())


async def _answers(url: str, token: str) -> int:
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        return (await client.get("/api/v1/conversations")).status_code


async def test_a_second_daemon_refuses_at_once_and_the_first_keeps_its_files() -> None:
    state = short_tempdir()
    watch = RedisWatch(state)
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            async with running_daemon(state_dir=state) as first:
                socket, pidfile = state / "run" / "redis.sock", state / "redis" / "redis-server.pid"
                redis_pid = await first.service_pid("redis")
                assert socket.exists() and pidfile.read_text().strip() == str(redis_pid)
                env = daemon_environment(state, {"APPLIANCE_BIND": f"127.0.0.1:{free_port()}"})
                second = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "appliance", "serve"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                with trio.move_on_after(60):
                    await second.wait()
                if second.returncode is None:
                    second.send_signal(signal.SIGTERM)
                    await second.wait()
                    raise AssertionError("a second daemon served on the same state dir")
                assert second.stderr is not None
                refusal = b"".join([chunk async for chunk in second.stderr]).decode()
                assert second.returncode == 1
                assert f"pid {first.process.pid}" in refusal and "one appliance per" in refusal
                # Nothing of the first daemon's went with the second.
                assert socket.exists() and pidfile.read_text().strip() == str(redis_pid)
                made = await _appliance(env, "keys", "create", "--name", "after")
                assert made.code == 0, made.err
                assert await _answers(first.url, made.out.strip()) == 200
                assert await first.service_pid("redis") == redis_pid
            nursery.cancel_scope.cancel()
    assert watch.most == 1, watch.seen


async def test_commands_use_the_running_daemons_redis_wherever_its_socket_is() -> None:
    state, runtime = short_tempdir(), short_tempdir("rt")
    watch = RedisWatch(state)
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            async with running_daemon(
                {"APPLIANCE_RUNTIME_DIR": str(runtime)}, state_dir=state
            ) as daemon:
                # The command is not told the daemon's runtime dir: the state dir's lock says
                # where its Redis is.
                env = daemon_environment(state, {})
                made = await _appliance(env, "keys", "create", "--name", "ops")
                assert made.code == 0, made.err
                assert await _answers(daemon.url, made.out.strip()) == 200
                listed = await _appliance(env, "keys", "list")
                assert listed.code == 0 and "ops" in listed.out
            nursery.cancel_scope.cancel()
    assert watch.most == 1 and len(watch.seen) == 1, watch.seen


async def test_a_command_given_another_stores_settings_says_so_and_starts_nothing() -> None:
    port = free_port()
    other = short_tempdir()
    with trio.fail_after(180):
        async with running_daemon({"APPLIANCE_BIND": f"127.0.0.1:{port}"}) as daemon:
            env = daemon_environment(other, {"APPLIANCE_BIND": f"127.0.0.1:{port}"})
            made = await _appliance(env, "keys", "create", "--name", "lost")
            assert made.code == 1 and made.out == ""
            assert "APPLIANCE_BIND" in made.err and "another store" in made.err
            assert "Traceback" not in made.err
            status = await _appliance(env, "status")
            assert status.code == 1 and "serves another store" in status.err, status.err
            # Settings naming a state dir that does not exist: refused, not created.
            missing = other / "missing"
            gone = await _appliance({**env, "APPLIANCE_STATE_DIR": str(missing)}, "keys", "list")
            assert gone.code == 1 and "does not exist" in gone.err and not missing.exists()
            # With the daemon's own settings, status finds it.
            mine = await _appliance(daemon.env, "status")
            assert mine.code == 0, mine.err
    assert redis_servers(other) == set() and not (other / "redis").exists()


async def test_commands_at_once_on_a_stopped_state_dir_take_turns() -> None:
    state = short_tempdir()
    env = daemon_environment(state, {})
    watch = RedisWatch(state)
    made: dict[int, Done] = {}

    async def create(n: int) -> None:
        made[n] = await _appliance(env, "keys", "create", "--name", f"turn{n}")

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            async with trio.open_nursery() as commands:
                for n in range(4):
                    commands.start_soon(create, n)
            nursery.cancel_scope.cancel()
        assert all(done.code == 0 for done in made.values()), [d.err for d in made.values()]
        listed = await _appliance(env, "keys", "list")
    assert all(f"turn{n}" in listed.out for n in range(4))
    assert watch.most == 1, watch.seen


@dataclass
class Serve:
    process: trio.Process
    notify: NotifySocket
    err: Path


async def _start_serve(state: Path, env: dict[str, str]) -> Serve:
    notify = NotifySocket(short_tempdir("ns"))
    await notify.bind()
    err = notify.path.with_name("stderr")
    with err.open("wb") as sink:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "appliance", "serve"],
            env={**env, "NOTIFY_SOCKET": str(notify.path)},
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    return Serve(process, notify, err)


async def _first_exit(serve: Serve, scope: trio.CancelScope) -> None:
    await serve.process.wait()
    scope.cancel()


async def test_two_daemons_and_commands_at_once_share_one_redis_and_lose_nothing() -> None:
    state = short_tempdir()
    install_tiny_model(state / "models")
    env = daemon_environment(state, {})
    watch = RedisWatch(state)
    made: dict[int, Done] = {}
    serves: list[Serve] = []

    async def create(n: int) -> None:
        made[n] = await _appliance(env, "keys", "create", "--name", f"c{n}")

    try:
        with trio.fail_after(400):
            async with trio.open_nursery() as nursery:
                await nursery.start(watch.run)
                async with trio.open_nursery() as starting:
                    for _ in range(2):
                        serves.append(await _start_serve(state, env))
                    for n in range(5):
                        starting.start_soon(create, n)
                    starting.start_soon(_appliance, env, "keys", "list")
                assert all(done.code == 0 for done in made.values()), [d.err for d in made.values()]
                tokens = {n: done.out.strip() for n, done in made.items()}
                # One daemon serves; the other was refused, naming it.
                with trio.fail_after(120):
                    async with trio.open_nursery() as waiting:
                        for serve in serves:
                            waiting.start_soon(_first_exit, serve, waiting.cancel_scope)
                loser = next(s for s in serves if s.process.returncode is not None)
                winner = next(s for s in serves if s is not loser)
                assert loser.process.returncode == 1
                refusal = loser.err.read_text()
                assert f"in use by appliance serve (pid {winner.process.pid}" in refusal, refusal
                ready = await winner.notify.wait_for("READY=1")
                url = ready.split("serving ", 1)[1].strip()
                for token in tokens.values():
                    assert await _answers(url, token) == 200
                winner.process.send_signal(signal.SIGTERM)
                with trio.fail_after(120):
                    assert await winner.process.wait() == 0
                # Every acknowledged key is in the append-only file...
                aof = (state / "redis" / "appendonly.aof").read_bytes()
                for token in tokens.values():
                    assert f"apikey:{{{token[3:19]}}}".encode() in aof
                # ...and there after a restart.
                async with running_daemon(state_dir=state) as again:
                    for token in tokens.values():
                        assert await _answers(again.url, token) == 200
                nursery.cancel_scope.cancel()
    finally:
        for serve in serves:
            if serve.process.returncode is None:
                serve.process.kill()
            serve.notify.close()
    assert watch.most == 1, watch.seen


async def test_a_redis_server_left_by_a_killed_daemon_is_stopped_before_a_new_one() -> None:
    state = short_tempdir()
    watch = RedisWatch(state)
    orphan = 0
    try:
        with trio.fail_after(240):
            async with trio.open_nursery() as nursery:
                await nursery.start(watch.run)
                async with running_daemon(state_dir=state) as first:
                    token = await first.create_key("before")
                    orphan = await first.service_pid("redis")
                    # A redis-server that does not act on the SIGTERM its parent's death
                    # sends (busy saving, say): it must be gone before another starts.
                    os.kill(orphan, signal.SIGSTOP)
                    first.process.kill()
                    await first.process.wait()
                async with running_daemon(state_dir=state) as second:
                    assert await _answers(second.url, token) == 200
                    assert not psutil.pid_exists(orphan) or _zombie(orphan)
                nursery.cancel_scope.cancel()
    finally:
        if orphan and psutil.pid_exists(orphan):
            os.kill(orphan, signal.SIGCONT)
    assert watch.most == 1, watch.seen


def _zombie(pid: int) -> Any:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
