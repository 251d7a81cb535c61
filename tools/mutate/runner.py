"""Run a module's tests against each of its mutants, one at a time.

The tree is copied to a temporary directory and only the copy is mutated, so the working tree
is never touched (an interrupted run leaves nothing behind). Each run is a child forked from
this process after the heavy third-party imports are done (pytest, trio, hypothesis, ...):
the child imports `appliance` and `tests` fresh from the copy, so a mutant costs its tests'
time and not a Python start-up. `PYTHONPATH` names the copy, so processes that the tests start
(the daemon, redis-server's clients, the inference worker) run the mutant too. Bytecode is never
written: a mutant of the same size written within the same second would otherwise load a
stale .pyc.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# Imported once here so that each forked run starts with them loaded.
PRELOAD: Final = (
    "pytest",
    "_pytest.python",
    "pytest_trio",
    "hypothesis",
    "trio",
    "msgspec",
    "coredis",
    "nacl.secret",
    "nacl.pwhash",
    "nacl.hash",
    "httpx",
    "quart",
    "quart_trio",
    "quart_schema",
    "hypercorn.trio",
    "psutil",
    "gguf",
)
POLL_S: Final = 0.02
# pytest's exit codes: 0 passed, 5 no test ran (a wrong selection in modules.toml).
PASSED: Final = 0
NO_TESTS: Final = 5


class Outcome(enum.Enum):
    KILLED = "killed"
    TIMEOUT = "timeout"  # counted as killed: the mutant made the tests hang
    SURVIVED = "survived"


@dataclass(frozen=True)
class Run:
    outcome: Outcome
    seconds: float
    exit_code: int


def preload() -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def tracked_files(root: Path) -> list[str]:
    """The files of the working tree that git knows or would add (no .venv, no caches)."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [name for name in listing.split("\0") if name and (root / name).is_file()]


@contextlib.contextmanager
def tree_copy(root: Path) -> Iterator[Path]:
    """A copy of the working tree in a short temporary directory (unix socket paths in the
    tests must stay under 107 bytes), removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="mut", dir="/tmp"))
    try:
        for name in tracked_files(root):
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, target)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class Executor:
    """Runs pytest on a set of test files in the copy, in a forked child with a time limit."""

    def __init__(self, copy_root: Path, log_dir: Path) -> None:
        self.copy_root = copy_root
        self.log_dir = log_dir
        os.environ["PYTHONPATH"] = str(copy_root)
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
        sys.dont_write_bytecode = True

    def run(self, tests: Sequence[str], timeout: float, log_name: str) -> Run:
        log = self.log_dir / log_name
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            self._child(tests, log)
        deadline = started + timeout
        try:
            while True:
                waited, status = os.waitpid(pid, os.WNOHANG)
                if waited:
                    code = os.waitstatus_to_exitcode(status)
                    seconds = time.monotonic() - started
                    if code == NO_TESTS:
                        raise RuntimeError(f"no test ran for {' '.join(tests)}; see {log}")
                    outcome = Outcome.SURVIVED if code == PASSED else Outcome.KILLED
                    return Run(outcome, seconds, code)
                if time.monotonic() > deadline:
                    _kill_group(pid)
                    return Run(Outcome.TIMEOUT, time.monotonic() - started, -signal.SIGKILL)
                time.sleep(POLL_S)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): leave no test run behind
            _kill_group(pid)
            raise

    def _child(self, tests: Sequence[str], log: Path) -> None:
        code = 99
        try:
            os.setpgid(0, 0)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(self.copy_root)
            root = str(self.copy_root)
            sys.path[:] = [root] + [p for p in sys.path if p and Path(p).resolve() != _HERE_ROOT]
            import pytest

            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests]))
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _kill_group(pid: int) -> None:
    """The child leads a process group of its own: the daemons its tests started die with it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


_HERE_ROOT: Final = Path(__file__).resolve().parents[2]
