"""systemd's notify protocol: READY, STATUS, WATCHDOG, STOPPING (through sdnotify).

Without NOTIFY_SOCKET every call is a no-op, so the daemon runs the same anywhere.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Final

import sdnotify
import trio

LOGGER = logging.getLogger("appliance.systemd")

MIN_WATCHDOG_INTERVAL: Final = 0.05


class Notifier:
    """Sends sd_notify messages for this process, if systemd asked for them."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        if self._notifier is not None and self._notifier.socket is not None:
            # Never block the event loop on a full notify queue: a dropped STATUS or
            # WATCHDOG is harmless; a frozen daemon is not.
            self._notifier.socket.setblocking(False)
        self.watchdog_interval = _watchdog_interval(environ)
        self._last_status = ""

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            # sdnotify encodes latin-1; keep messages ASCII.
            text = "\n".join(lines).encode("ascii", "replace").decode("ascii")
            self._notifier.notify(text)

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping: draining requests") -> None:
        self._last_status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC, when the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return max(int(usec) / 2 / 1_000_000, MIN_WATCHDOG_INTERVAL)


async def watchdog_loop(notifier: Notifier, unhealthy: Callable[[], list[str]]) -> None:
    """Ping at half the watchdog interval while every critical service answers.

    A wedged service (or a blocked event loop, which stops this task too) stops the pings,
    and systemd restarts the unit once WatchdogSec passes without one.
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    silent_since: list[str] = []
    while True:
        failing = unhealthy()
        if failing:
            if failing != silent_since:
                LOGGER.error("withholding watchdog pings: %s not healthy", ", ".join(failing))
            silent_since = failing
        else:
            if silent_since:
                LOGGER.info("services healthy again; watchdog pings resume")
            silent_since = []
            notifier.watchdog()
        await trio.sleep(interval)
