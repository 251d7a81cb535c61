"""Start the real daemon as a child process, with a real NOTIFY_SOCKET, for tests.

Nothing here stands in for a part of the product: the daemon, its redis-server and its
HTTP server are the real ones; the test talks to them over loopback and unix sockets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

READY_TIMEOUT = 60.0


def short_tempdir(prefix: str = "ap") -> Path:
    """A short directory under /tmp: unix socket paths must stay under 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NotifySocket:
    """A unix datagram socket where the daemon sends its sd_notify messages."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self._socket = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.messages: list[tuple[float, str]] = []

    async def bind(self) -> None:
        self.path.unlink(missing_ok=True)
        await self._socket.bind(str(self.path))

    async def receive(self) -> str:
        data = await self._socket.recv(4096)
        text = data.decode()
        self.messages.append((trio.current_time(), text))
        return text

    async def wait_for(self, needle: str, timeout: float = READY_TIMEOUT) -> str:
        """Receive until a message contains `needle`; return that message."""
        with trio.fail_after(timeout):
            while True:
                message = await self.receive()
                if needle in message:
                    return message

    def close(self) -> None:
        self._socket.close()


def daemon_log(state_dir: Path) -> Path:
    """Beside the state dir, not in it: a backup refuses a file that changes while it is
    archived (under systemd the log goes to the journal, not to the state dir)."""
    return state_dir.with_name(state_dir.name + ".log")


@dataclass
class Daemon:
    process: trio.Process
    state_dir: Path
    log_path: Path
    url: str
    notify: NotifySocket | None
    env: dict[str, str] = field(default_factory=dict)
    # An admin key made right after READY; `client()` sends it unless told otherwise.
    api_key: str = ""

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        token = self.api_key if key is None else key
        headers = dict(kwargs.pop("headers", {}))
        if token:
            headers.setdefault("Authorization", f"Bearer {token}")
        kwargs.setdefault("timeout", 10)
        return httpx.AsyncClient(base_url=self.url, headers=headers, **kwargs)

    async def create_key(self, name: str, scope: str = "user", **limits: int) -> str:
        """A new API key, made the way `appliance keys create` does (in the daemon's Redis)."""
        return await create_api_key(self.env, name, scope, **limits)

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                lines.append({"raw": raw})
        return lines

    async def service_pid(self, name: str) -> int:
        async with self.client() as client:
            services = (await client.get("/api/v1/health/services")).json()["services"]
        for service in services:
            if service["name"] == name and service["pid"]:
                return int(service["pid"])
        raise LookupError(f"no running service {name}")

    async def wait_exit(self, timeout: float = 60) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signum)
        with trio.fail_after(timeout):
            return await self.process.wait()


async def create_api_key(env: Mapping[str, str], name: str, scope: str, **limits: int) -> str:
    from appliance.auth.apikeys import KeyStore
    from appliance.config import load_settings
    from appliance.privacy.keys import hash_key_for
    from appliance.store.access import store_url
    from appliance.store.client import connect

    settings = load_settings(environ=env)
    client = connect(store_url(settings))
    async with client:
        store = KeyStore(lambda: client, hash_key_for(settings))
        _, token = await store.create(name, scope, **limits)
    return token


async def _admin_key(daemon: Daemon) -> str:
    """The state dir's test admin key: kept across restarts of the daemon on the same data
    (what a key owns must stay visible), made anew when the store no longer knows it."""
    saved = daemon.state_dir / "test-admin.key"
    if saved.exists():
        token = saved.read_text().strip()
        async with httpx.AsyncClient(base_url=daemon.url, timeout=10) as client:
            answer = await client.get(
                "/api/v1/health/services", headers={"Authorization": f"Bearer {token}"}
            )
        if answer.status_code == 200:
            return token
    token = await create_api_key(daemon.env, f"test-admin-{os.urandom(4).hex()}", "admin")
    saved.write_text(token)
    return token


def daemon_environment(state_dir: Path, extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        env.pop(name, None)
    empty_env_file = state_dir / "test.env"
    empty_env_file.touch()
    env.update(
        {
            "APPLIANCE_ENV_FILE": str(empty_env_file),
            "APPLIANCE_STATE_DIR": str(state_dir),
            "APPLIANCE_BIND": "127.0.0.1:0",
            "APPLIANCE_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


_TINY_MODEL: list[Path] = []


def install_tiny_model(models_dir: Path, name: str = "tiny", **kwargs: Any) -> Path:
    """Put the tiny test model (a real GGUF that llama.cpp loads) into `models_dir`."""
    from tests.tiny_gguf import write_tiny_llama

    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / f"{name}.gguf"
    if kwargs:
        return write_tiny_llama(target, **kwargs)
    if not _TINY_MODEL:
        _TINY_MODEL.append(write_tiny_llama(short_tempdir("tm") / "tiny.gguf"))
    shutil.copyfile(_TINY_MODEL[0], target)
    return target


async def start_daemon(
    state_dir: Path,
    extra_env: Mapping[str, str] | None = None,
    *,
    notify: bool = True,
    with_model: bool = True,
    wrapper: Sequence[str] = (),
) -> Daemon:
    """Start `appliance serve` (through `wrapper`, a command that execs its arguments, if
    given); with `notify`, wait for READY=1 and read the URL from STATUS."""
    if with_model and not (state_dir / "models").exists():
        install_tiny_model(state_dir / "models")
    env = daemon_environment(state_dir, extra_env or {})
    notifier = None
    if notify:
        notifier = NotifySocket(state_dir)
        await notifier.bind()
        env["NOTIFY_SOCKET"] = str(notifier.path)
    log_path = daemon_log(state_dir)
    with log_path.open("ab") as log:
        process = await trio.lowlevel.open_process(
            [*wrapper, sys.executable, "-m", "appliance", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    daemon = Daemon(process, state_dir, log_path, url="", notify=notifier, env=env)
    if notifier is not None:
        try:
            ready = await notifier.wait_for("READY=1")
        except trio.TooSlowError:
            process.kill()
            raise AssertionError("daemon never became ready:\n" + log_path.read_text()) from None
        daemon.url = ready.split("serving ", 1)[1].strip()
        daemon.api_key = await _admin_key(daemon)
    return daemon


@asynccontextmanager
async def running_daemon(
    extra_env: Mapping[str, str] | None = None,
    *,
    notify: bool = True,
    state_dir: Path | None = None,
    with_model: bool = True,
    wrapper: Sequence[str] = (),
) -> AsyncIterator[Daemon]:
    state_dir = state_dir or short_tempdir()
    daemon = await start_daemon(
        state_dir, extra_env, notify=notify, with_model=with_model, wrapper=wrapper
    )
    try:
        yield daemon
    finally:
        with trio.CancelScope(shield=True):
            if daemon.process.returncode is None:
                daemon.process.send_signal(signal.SIGTERM)
                with trio.move_on_after(60):
                    await daemon.process.wait()
                if daemon.process.returncode is None:
                    daemon.process.kill()
                    await daemon.process.wait()
            if daemon.notify is not None:
                daemon.notify.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
