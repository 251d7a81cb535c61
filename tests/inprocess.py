"""The daemon's services started in the test's own nursery, for tests of the HTTP surface.

The same services `appliance serve` starts (appliance.daemon.start_services): the real
redis-server and inference worker as child processes, the real Quart app served by
Hypercorn on a loopback port, the real logging set-up writing JSON lines. Only the process
around them is the test's: no interpreter start, no READY over a notify socket. What
needs the daemon's own process (signals, sd_notify, the watchdog, kill -9) uses
tests.harness.running_daemon.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.commands.serve import logged_secrets
from appliance.config import Settings, load_settings
from appliance.daemon import STORE_STOP_TIMEOUT, prepare_directories, start_services
from appliance.http.context import Runtime
from appliance.logs import configure_logging
from appliance.store.access import daemon_lock
from appliance.supervisor import Supervisor
from tests.harness import create_api_key, daemon_environment, install_tiny_model, short_tempdir

# No journald here, whatever the machine has: the lines are read from the stream.
_NO_JOURNAL = "/nonexistent/journal/socket"


@dataclass
class InProcessDaemon:
    """What tests use of tests.harness.Daemon (client, keys, log lines), in this process."""

    state: Runtime
    state_dir: Path
    env: dict[str, str]
    url: str
    log: io.StringIO
    # An admin key made once the services are up; `client()` sends it unless told otherwise.
    api_key: str = ""

    @property
    def settings(self) -> Settings:
        return self.state.settings

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        token = self.api_key if key is None else key
        headers = dict(kwargs.pop("headers", {}))
        if token:
            headers.setdefault("Authorization", f"Bearer {token}")
        kwargs.setdefault("timeout", 10)
        return httpx.AsyncClient(base_url=self.url, headers=headers, **kwargs)

    async def create_key(self, name: str, scope: str = "user", **limits: int) -> str:
        """A new API key, made the way `appliance keys create` does (in the store)."""
        return await create_api_key(self.env, name, scope, **limits)

    def log_text(self) -> str:
        return self.log.getvalue()

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_text().splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                lines.append({"raw": raw})
        return lines


@asynccontextmanager
async def _logging_to(stream: io.StringIO, settings: Settings) -> AsyncIterator[None]:
    """The daemon's logging set-up writing to `stream`; the test runner's put back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access = logging.getLogger("hypercorn.access")
    access_disabled = access.disabled
    configure_logging(
        settings.log_level,
        secrets=logged_secrets(settings),
        stream=stream,
        journal_socket=_NO_JOURNAL,
    )
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        access.disabled = access_disabled
        logging.captureWarnings(False)


@asynccontextmanager
async def inprocess_daemon(
    extra_env: Mapping[str, str] | None = None, *, with_model: bool = True
) -> AsyncIterator[InProcessDaemon]:
    """The daemon's services on a fresh state dir, stopped in order at the end."""
    state_dir = short_tempdir()
    if with_model:
        install_tiny_model(state_dir / "models")
    env = daemon_environment(state_dir, extra_env or {})
    settings = load_settings(environ=env)
    stream = io.StringIO()
    async with _logging_to(stream, settings), trio.open_nursery() as nursery:
        await trio.to_thread.run_sync(prepare_directories, settings)
        lock = await daemon_lock(settings)
        supervisor = Supervisor(
            nursery, restart_limit=settings.restart_limit, restart_window=settings.restart_window
        )
        try:
            state = await start_services(supervisor, settings, lock)
            daemon = InProcessDaemon(state, state_dir, env, state.urls[0], stream)
            daemon.api_key = await daemon.create_key(f"test-admin-{os.urandom(4).hex()}", "admin")
            yield daemon
        finally:
            with trio.CancelScope(shield=True):
                await supervisor.stop_all(timeout=settings.graceful_timeout + STORE_STOP_TIMEOUT)
            nursery.cancel_scope.cancel()
            lock.release()
