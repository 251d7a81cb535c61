"""The HTTP service: the app served by hypercorn inside the supervisor's nursery."""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Quart

from appliance.config import Settings
from appliance.http.app import PROBE_USER_AGENT
from appliance.supervisor import Service

LOGGER = logging.getLogger("appliance.http")

PROBE_INTERVAL: Final = 1.0
PROBE_TIMEOUT: Final = 2.0
PROBE_STALE_AFTER: Final = PROBE_INTERVAL + PROBE_TIMEOUT + 1.0


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [settings.bind]
    config.graceful_timeout = settings.graceful_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    config.keep_alive_timeout = 5
    return config


class HttpService(Service):
    """Serves the API; `started` hands back the bound URLs; drains on stop."""

    name = "http"
    critical = True
    drains = True

    def __init__(self, app: Quart, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.urls: list[str] = []
        self._shutdown = trio.Event()
        self._last_ok = 0.0

    def healthy(self) -> bool:
        return time.monotonic() - self._last_ok < PROBE_STALE_AFTER

    async def drain(self) -> None:
        self._shutdown.set()

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self._shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            urls: list[str] = await nursery.start(self._serve, nursery.cancel_scope)
            self.urls = urls
            probe_url = _probe_url(urls[0])
            if not await self._probe(probe_url):
                raise RuntimeError(f"the HTTP server on {urls[0]} does not answer its own probe")
            task_status.started(urls)
            nursery.start_soon(self._probe_forever, probe_url)
        if not self._shutdown.is_set():
            raise RuntimeError("the HTTP server stopped without being asked to")

    async def _serve(
        self,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # serve() returns after a shutdown once requests in flight are done (or the
        # graceful timeout passed); then the probe loop beside it is cancelled too.
        await serve(
            self.app,
            hypercorn_config(self.settings),
            shutdown_trigger=self._shutdown.wait,
            task_status=task_status,
        )
        scope.cancel()

    async def _probe(self, url: str) -> bool:
        try:
            async with httpx.AsyncClient(
                timeout=PROBE_TIMEOUT, headers={"User-Agent": PROBE_USER_AGENT}
            ) as client:
                response = await client.get(url)
        except httpx.HTTPError:
            return False
        if response.status_code == 200:
            self._last_ok = time.monotonic()
            return True
        return False

    async def _probe_forever(self, url: str) -> None:
        while True:
            await trio.sleep(PROBE_INTERVAL)
            await self._probe(url)


def _probe_url(bound: str) -> str:
    # A wildcard bind answers on loopback too.
    url = bound.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")
    return url.rstrip("/") + "/api/v1/health/live"
