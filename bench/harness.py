"""Process plumbing shared by the benchmarks: temp dirs, ports, children, the daemon."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
BENCH_DIR: Final = REPO / "bench"
VENV_BIN: Final = REPO / ".venv" / "bin"
PYTHON: Final = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
APPLIANCE: Final = str(VENV_BIN / "appliance")
LOOPBACK: Final = "127.0.0.1"
STOP_TIMEOUT: Final = 15.0
NOTIFY_POLL: Final = 0.2
# Variables that would make the daemon read settings or talk to systemd behind our back.
_INHERITED_NOISE: Final = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "JOURNAL_STREAM",
)


def note(message: str) -> None:
    """Progress for humans: stderr, so stdout stays one JSON object per line."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def result(bench: str, metric: str, value: float, unit: str, **extra: Any) -> dict[str, Any]:
    return {"bench": bench, "metric": metric, "value": value, "unit": unit, **extra}


@contextlib.contextmanager
def short_tempdir() -> Iterator[Path]:
    # Short on purpose: the daemon's redis socket and our notify socket live inside it, and
    # unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="ab", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout} s")


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM, wait, SIGKILL as a last resort; the exit code (None if it had to be killed)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            note(f"{process.args!r} ignored SIGTERM for {timeout} s; killing it")
            process.kill()
            process.wait()
            return None
    return process.returncode


def daemon_environment(state_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("APPLIANCE_") and k not in _INHERITED_NOISE
    }
    env_file = state_dir / "empty.env"
    env_file.touch()
    env.update(
        APPLIANCE_STATE_DIR=str(state_dir),
        APPLIANCE_BIND=f"{LOOPBACK}:{port}",
        # An empty file of our own, so a system-wide /etc/appliance/appliance.env is not read.
        APPLIANCE_ENV_FILE=str(env_file),
        **extra,
    )
    return env


class Daemon:
    """`appliance serve` in a temp state dir, with a notify socket of ours to hear READY=1.

    A thread keeps reading the notify socket, as systemd does: the daemon's sd_notify sends
    block once the socket's queue (net.unix.max_dgram_qlen, often 10) is full, and a
    blocked send stalls its whole event loop.
    """

    def __init__(
        self, state_dir: Path, log_level: str = "INFO", env: Mapping[str, str] | None = None
    ) -> None:
        self.state_dir = state_dir
        self.extra_env = dict(env or {})  # more APPLIANCE_* settings for this daemon
        self.port = free_port()
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        self.log_path = state_dir / "daemon.log"
        self.notify_path = state_dir / "notify.sock"
        self.log_level = log_level
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.notifications: list[tuple[float, str]] = []  # (monotonic time, datagram)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="notify", daemon=True)
        self._api_key = ""

    def __enter__(self) -> Daemon:
        # The socket must exist first: the daemon connects to it once, at start.
        self._notify.bind(str(self.notify_path))
        self._notify.settimeout(NOTIFY_POLL)
        self._listener.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.process is not None:
                self.exit_code = stop(self.process)
                self._report_trouble()
        finally:
            self._closing.set()
            self._listener.join()
            self._notify.close()

    def _listen(self) -> None:
        while not self._closing.is_set():
            try:
                datagram = self._notify.recv(4096)
            except TimeoutError:
                continue
            message = datagram.decode("ascii", "replace")
            self.notifications.append((time.monotonic(), message))
            if "READY=1" in message.split("\n"):
                self._ready.set()

    def _report_trouble(self) -> None:
        """Surface what a benchmark would otherwise hide: a bad exit, warnings, errors."""
        if self.exit_code != 0:
            note(f"the daemon exited with {self.exit_code} after SIGTERM")
        for line in self.log().splitlines():
            try:
                level = json.loads(line).get("level")
            except ValueError:
                level = "UNPARSED"
            if level in ("WARNING", "ERROR", "CRITICAL", "UNPARSED"):
                note(f"daemon log: {line[:300]}")

    def start(self) -> float:
        """Start the daemon; the monotonic time just before it was spawned."""
        env = daemon_environment(
            self.state_dir,
            self.port,
            NOTIFY_SOCKET=str(self.notify_path),
            APPLIANCE_LOG_LEVEL=self.log_level,
            **self.extra_env,
        )
        # Logs go to a file rather than a pipe nobody reads, so they never block the daemon.
        with self.log_path.open("wb") as log:
            started = time.monotonic()
            self.process = subprocess.Popen(
                [APPLIANCE, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return started

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Block until READY=1 has arrived; the monotonic time it arrived."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(NOTIFY_POLL):
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited with {self.process.returncode}: {self.log()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"no READY=1 within {timeout} s: {self.log()}")
        return next(at for at, message in self.notifications if "READY=1" in message.split("\n"))

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def api_key(self) -> str:
        """An admin API key for this daemon, made once with `appliance keys create`."""
        if not self._api_key:
            env = daemon_environment(self.state_dir, self.port, **self.extra_env)
            made = subprocess.run(
                [APPLIANCE, "keys", "create", "--name", "bench", "--scope", "admin"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            self._api_key = made.stdout.strip()
        return self._api_key

    def user_key(self, name: str, *extra: str) -> str:
        """A new user API key (with `extra` options of `appliance keys create`)."""
        env = daemon_environment(self.state_dir, self.port, **self.extra_env)
        made = subprocess.run(
            [APPLIANCE, "keys", "create", "--name", name, "--scope", "user", *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return made.stdout.strip()

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key()}"}


def install_gemma(models_dir: Path, name: str = "gemma") -> Path:
    """Gemma 3 270M (tests/real_model.py) hard-linked into `models_dir`.

    Loaded by path: tests/ is not an installed package, and bench/ is what is on sys.path.
    """
    target: Path = _real_model().install_gemma(models_dir, name)
    return target


def install_smollm2(models_dir: Path, name: str = "smollm2") -> Path:
    """The default model, SmolLM2-135M-Instruct (tests/real_model.py), into `models_dir`."""
    target: Path = _real_model().install_smollm2(models_dir, name)
    return target


def _real_model() -> Any:
    spec = importlib.util.spec_from_file_location("real_model", REPO / "tests" / "real_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spawn_python(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PYTHON, *argv], **kwargs)


LLAMA_SERVER: Final = REPO / "build" / "llama-server" / "bin" / "llama-server"


def llama_server_binary() -> Path | None:
    """llama.cpp's own server (`make llama-server`, or LLAMA_SERVER=path), if built."""
    binary = Path(os.environ.get("LLAMA_SERVER", LLAMA_SERVER))
    if not binary.is_file():
        note(f"llama.cpp's server not measured: {binary} is missing (make llama-server)")
        return None
    return binary


@contextlib.contextmanager
def llama_server(
    binary: Path, model: Path, log_path: Path, *args: str, timeout: float = 120.0
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """llama.cpp's server on a free loopback port, healthy (its model loaded): the port
    and the process."""
    port = free_port()
    argv = [str(binary), "-m", str(model), "--host", LOOPBACK, "--port", str(port), *args]
    with log_path.open("wb") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(port, server, timeout, log_path)
        yield port, server
    finally:
        stop(server)


def _wait_healthy(
    port: int, server: subprocess.Popen[bytes], timeout: float, log_path: Path
) -> None:
    """llama-server listens at once and answers /health 503 until its model is loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log_path.read_text("utf-8", "replace")[-600:]
            raise RuntimeError(f"llama-server exited with {server.returncode}: {tail}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            connection = http.client.HTTPConnection(LOOPBACK, port, timeout=1)
            try:
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            finally:
                connection.close()
        time.sleep(0.1)
    raise TimeoutError(f"llama-server not healthy after {timeout} s")
