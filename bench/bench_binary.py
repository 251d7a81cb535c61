"""The PyInstaller binary against the venv: start to READY=1, size on disk, idle memory.

Both daemons get the same state (the tiny test model, preloaded before READY=1, so the
worker's start is part of the time) and take turns, so drift on a noisy box hits both.
The binary is dist/appliance/appliance, built with `make binary` (skipped when up to date);
the venv's daemon is `python -m appliance serve`. Page caches are warm for both: this is a
restart's start time, not a first boot's.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import psutil
from harness import PYTHON, REPO, Daemon, daemon_environment, note, result, short_tempdir

NAME: Final = "binary"
TREE: Final = REPO / "dist" / "appliance"
BINARY: Final = TREE / "appliance"
START_RATIO_GOAL: Final = 1.3
IDLE_WAIT: Final = 2.0
MB: Final = 1024 * 1024
COMMANDS: Final = {
    "binary": [str(BINARY), "serve"],
    "venv": [PYTHON, "-m", "appliance", "serve"],
}


class Started(Daemon):
    """bench/harness.py's Daemon (notify socket, logs, stop), running the given command."""

    def __init__(self, state_dir: Path, command: list[str]) -> None:
        super().__init__(state_dir)
        self.command = command

    def start(self) -> float:
        env = daemon_environment(
            self.state_dir,
            self.port,
            NOTIFY_SOCKET=str(self.notify_path),
            APPLIANCE_LOG_LEVEL=self.log_level,
        )
        if self.command[0] == str(BINARY):
            # As systemd would run it: nothing of the venv in its environment.
            for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
                env.pop(name, None)
        with self.log_path.open("wb") as log:
            started = time.monotonic()
            self.process = subprocess.Popen(
                self.command, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return started


def run(quick: bool) -> Iterator[dict[str, Any]]:
    build()
    yield from start_times(rounds=3 if quick else 7)
    yield from size()
    yield from idle_memory()


def build() -> None:
    started = time.monotonic()
    done = subprocess.run(
        ["make", "--no-print-directory", "binary"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"make binary failed: {done.stderr[-2000:]}")
    note(f"make binary: {time.monotonic() - started:.1f} s")


def _install_model(state: Path) -> None:
    """The tiny test model (tests/tiny_gguf.py, loaded by path like harness.install_gemma)."""
    spec = importlib.util.spec_from_file_location("tiny_gguf", REPO / "tests" / "tiny_gguf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (state / "models").mkdir()
    module.write_tiny_llama(state / "models" / "tiny.gguf")


def start_times(rounds: int) -> Iterator[dict[str, Any]]:
    samples: dict[str, list[float]] = {kind: [] for kind in COMMANDS}
    # One untimed start each first: the first start after a build reads everything from disk.
    for round_ in range(-1, rounds):
        order = list(COMMANDS) if round_ % 2 == 0 else list(COMMANDS)[::-1]
        for kind in order:
            with short_tempdir() as state:
                _install_model(state)
                with Started(state, COMMANDS[kind]) as daemon:
                    started = daemon.start()
                    ms = (daemon.wait_ready() - started) * 1000
            if round_ >= 0:
                samples[kind].append(ms)
                note(f"start {round_ + 1}/{rounds}: {kind} READY=1 after {ms:.0f} ms")
    medians = {kind: statistics.median(values) for kind, values in samples.items()}
    for kind, values in samples.items():
        yield result(
            NAME,
            "start_to_ready_median",
            round(medians[kind], 1),
            "ms",
            daemon=kind,
            samples=[round(v, 1) for v in values],
            model="tiny (preloaded)",
        )
    ratio = medians["binary"] / medians["venv"]
    yield result(
        NAME,
        "start_to_ready_ratio_binary_vs_venv",
        round(ratio, 3),
        "ratio",
        binary_ms=round(medians["binary"], 1),
        venv_ms=round(medians["venv"], 1),
        rounds=rounds,
        goal=f"<= {START_RATIO_GOAL}",
        meets_goal=ratio <= START_RATIO_GOAL,
    )


def size() -> Iterator[dict[str, Any]]:
    files = [p for p in TREE.rglob("*") if p.is_file() and not p.is_symlink()]
    total = sum(p.stat().st_size for p in files)
    yield result(
        NAME, "dist_size", round(total / MB, 1), "MB", path="dist/appliance", files=len(files)
    )
    debs = sorted((REPO / "dist").glob("appliance_*_amd64.deb"))
    if debs:
        yield result(
            NAME, "deb_size", round(debs[-1].stat().st_size / MB, 1), "MB", path=debs[-1].name
        )


def idle_memory() -> Iterator[dict[str, Any]]:
    """RSS of the supervisor and of each child (redis-server, the worker with its model)."""
    figures: dict[str, dict[str, float]] = {}
    for kind, command in COMMANDS.items():
        with short_tempdir() as state:
            _install_model(state)
            with Started(state, command) as daemon:
                daemon.start()
                daemon.wait_ready()
                time.sleep(IDLE_WAIT)  # let start-up garbage settle and the first probes run
                services = httpx.get(
                    daemon.base_url + "/api/v1/health/services", headers=daemon.auth(), timeout=5
                )
                names = {s["pid"]: s["name"] for s in services.json()["services"] if s["pid"]}
                assert daemon.process is not None
                supervisor = psutil.Process(daemon.process.pid)
                parts = {"supervisor": supervisor.memory_info().rss / MB}
                for child in supervisor.children(recursive=True):
                    name = names.get(child.pid, child.name())
                    parts[name] = parts.get(name, 0.0) + child.memory_info().rss / MB
        figures[kind] = parts
        total = sum(parts.values())
        shares = ", ".join(f"{name} {value:.0f}" for name, value in parts.items())
        note(f"idle RSS {kind}: {total:.0f} MB ({shares})")
        yield result(
            NAME,
            "idle_rss_total",
            round(total, 1),
            "MB",
            daemon=kind,
            parts={name: round(value, 1) for name, value in parts.items()},
        )
    ratio = sum(figures["binary"].values()) / sum(figures["venv"].values())
    yield result(NAME, "idle_rss_ratio_binary_vs_venv", round(ratio, 3), "ratio")
