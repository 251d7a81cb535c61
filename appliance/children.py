"""Child processes of the supervisor: started so they die with it, stopped politely."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import Final

import trio

LOGGER = logging.getLogger("appliance.children")

_PR_SET_PDEATHSIG: Final = 1
# Signals that say a child crashed on its own (not killed from outside).
_CRASH_SIGNALS: Final = frozenset(
    {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}
)
# Variables a child must not inherit: it is not the unit's main process.
_PRIVATE_ENV: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
_LEVELS: Final = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}
_NAMED_LEVEL: Final = re.compile(f"({'|'.join(_LEVELS)}):")


def describe_exit(code: int) -> str:
    """A child's exit status (Popen's returncode) in words."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def crashed_by_itself(code: int) -> bool:
    """An error exit or a crash signal; a SIGKILL or SIGTERM may have come from outside (the
    operator, the OOM killer)."""
    return code > 0 or (code < 0 and -code in _CRASH_SIGNALS)


def _die_with_parent() -> None:
    # If the supervisor is killed with SIGKILL, the kernel sends SIGTERM to the child, so
    # no redis-server or worker outlives it (systemd would clean up the cgroup; a shell
    # or a test would not).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
    env.update(extra or {})
    return env


async def spawn(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, pass_fds: Sequence[int] = ()
) -> trio.Process:
    """Start a child whose stdout and stderr come back to us as one pipe.

    The fork happens on the calling (event loop) thread, not in trio's thread pool:
    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, and trio
    retires idle pool threads after 10 s, which would kill a healthy child.
    """
    read_end, write_end = os.pipe()
    try:
        popen = subprocess.Popen(  # noqa: ASYNC220 - on the loop thread on purpose, see above
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.STDOUT,
            env=child_environment(env),
            preexec_fn=_die_with_parent,
            # Its own session: a terminal's Ctrl-C (or a process-group kill) reaches only
            # the supervisor, which then stops the child in order, after draining requests.
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    # trio offers no public way to adopt a Popen; _create is its own constructor.
    return trio.Process._create(popen, None, trio.lowlevel.FdStream(read_end), None)


def _level_of(line: str) -> int:
    """The level a child's line names (`LEVEL:logger:message`, the worker's format), else
    WARNING for a line that says so (redis-server's `# WARNING ...`), else INFO."""
    named = _NAMED_LEVEL.match(line)
    if named is not None:
        return _LEVELS[named[1]]
    return logging.WARNING if "WARNING" in line else logging.INFO


async def forward_output(process: trio.Process, logger: logging.Logger) -> None:
    """Log each line the child prints, so its messages reach the journal with ours."""
    assert process.stdout is not None
    pending = b""
    async for chunk in process.stdout:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                text = line.decode("utf-8", "replace").rstrip()
                logger.log(_level_of(text), "%s", text)
    if pending.strip():
        text = pending.decode("utf-8", "replace").rstrip()
        logger.log(_level_of(text), "%s", text)


async def terminate(process: trio.Process, grace: float) -> int:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL. Safe to call when cancelled."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await process.wait()
            if process.returncode is None:
                LOGGER.warning(
                    "child %d ignored SIGTERM for %.0f s; killing it", process.pid, grace
                )
                process.kill()
        await process.wait()
    return process.returncode if process.returncode is not None else -1
