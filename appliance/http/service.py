"""The HTTP service: the app served by hypercorn inside the supervisor's nursery."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from typing import Any, Final

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Quart

from appliance.config import Settings
from appliance.http.closing import CloseAfterLastBody
from appliance.http.context import PROBE_USER_AGENT
from appliance.http.framing import RejectAmbiguousFraming, use_json_protocol_errors
from appliance.http.proxies import ClientAddress
from appliance.metrics import RequestStats
from appliance.supervisor import Service

LOGGER = logging.getLogger("appliance.http")

# Every probe is a request through the whole HTTP stack, a few ms of CPU taken from the
# models' threads; a wedged server still shows within a watchdog period (15 s) this way.
PROBE_INTERVAL: Final = 5.0
PROBE_TIMEOUT: Final = 2.0
PROBE_STALE_AFTER: Final = PROBE_INTERVAL + PROBE_TIMEOUT + 1.0
PROBE_PATH: Final = "/api/v1/health/live"


class BindError(OSError):
    """APPLIANCE_BIND cannot be listened on; the message names it and the fix."""

    def __str__(self) -> str:
        return str(self.strerror)


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [settings.bind]
    config.graceful_timeout = settings.graceful_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    config.keep_alive_timeout = 5
    if settings.tls:
        # Checked at start (appliance.tls_files): readable, a pair, no passphrase.
        config.certfile = settings.tls_cert
        config.keyfile = settings.tls_key
        # HTTP/1.1 only: the one protocol whose edge cases (framing, header limits, error
        # shapes) are handled and tested here.
        config.alpn_protocols = ["http/1.1"]
    return config


def check_bind(settings: Settings) -> None:
    """Listen on APPLIANCE_BIND for a moment, the way hypercorn will, so that a taken port
    stops the start at once with a line that names it (not after Redis and the model, with
    a bare errno). BindError otherwise."""
    host, port = settings.host, settings.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            probe.listen(1)
    except OSError as exc:
        raise BindError(exc.errno, _bind_problem(settings.bind, host, port, exc)) from None


def _bind_problem(bind: str, host: str, port: int, exc: OSError) -> str:
    where = f"cannot listen on {bind} (APPLIANCE_BIND)"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where}: the port is already in use by another program (see which: "
            f"ss -ltnp 'sport = :{port}'); stop it or set APPLIANCE_BIND to a free port"
        )
    if exc.errno == errno.EACCES:
        return f"{where}: ports below 1024 need privileges; use a port of 1024 or more"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host} is not an address of this machine; use one of its addresses"
    if isinstance(exc, socket.gaierror):
        return f"{where}: the host name {host} does not resolve; use an IP address"
    return f"{where}: {exc.strerror or type(exc).__name__}"


class HttpService(Service):
    """Serves the API; `started` hands back the bound URLs; drains on stop."""

    name = "http"
    critical = True
    drains = True

    def __init__(self, app: Quart, settings: Settings, stats: RequestStats) -> None:
        self.app = app
        self.settings = settings
        self.stats = stats
        self.urls: list[str] = []
        self._shutdown = trio.Event()
        self._drained = trio.Event()
        self._last_ok = 0.0
        use_json_protocol_errors()
        # Outermost first: close what must close, refuse ambiguous framing, then find the
        # client behind proxies.
        self._asgi = CloseAfterLastBody(
            RejectAmbiguousFraming(
                ClientAddress(
                    self._count_requests, settings.trusted_networks, settings.proxy_header
                ),
                settings.max_body_bytes,
            )
        )
        # The self-probe checks that the port answers; it talks to itself, so it does not
        # verify the certificate (its name may not be the loopback address). Made once.
        self._probe_tls: ssl.SSLContext | None = None
        if settings.tls:
            self._probe_tls = ssl.create_default_context()
            self._probe_tls.check_hostname = False
            self._probe_tls.verify_mode = ssl.CERT_NONE

    def healthy(self) -> bool:
        return time.monotonic() - self._last_ok < PROBE_STALE_AFTER

    async def drain(self) -> None:
        self._shutdown.set()

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self._shutdown = trio.Event()
        # A restart after a failure meets the same port: say so plainly if it is taken.
        await trio.to_thread.run_sync(check_bind, self.settings)
        async with trio.open_nursery() as nursery:
            urls: list[str] = await nursery.start(self._serve, nursery.cancel_scope)
            self.urls = urls
            probe_url = _probe_url(urls[0])
            if not await self._probe(probe_url):
                raise RuntimeError(f"the HTTP server on {urls[0]} does not answer its own probe")
            task_status.started(urls)
            nursery.start_soon(self._probe_forever, probe_url)
            nursery.start_soon(self._close_when_drained, nursery.cancel_scope)
        if not self._shutdown.is_set():
            raise RuntimeError("the HTTP server stopped without being asked to")

    async def _serve(
        self,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await serve(
            self._asgi,
            hypercorn_config(self.settings),
            shutdown_trigger=self._shutdown.wait,
            task_status=task_status,
        )
        scope.cancel()

    async def _count_requests(self, scope: Any, receive: Any, send: Any) -> None:
        """ASGI wrapper that knows how many HTTP requests are in flight, streams included."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.stats.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.stats.in_flight -= 1
            if self.stats.in_flight == 0:
                self._drained.set()
                self._drained = trio.Event()

    async def _close_when_drained(self, scope: trio.CancelScope) -> None:
        # hypercorn keeps idle keep-alive connections open until graceful_timeout; once
        # the last request in flight is answered there is nothing left to wait for.
        await self._shutdown.wait()
        with trio.move_on_after(self.settings.graceful_timeout):
            while self.stats.in_flight:
                await self._drained.wait()
        if self.stats.in_flight:
            LOGGER.warning(
                "%d requests still running after %.0f s (APPLIANCE_GRACEFUL_TIMEOUT); closing them",
                self.stats.in_flight,
                self.settings.graceful_timeout,
            )
        scope.cancel()

    async def _probe(self, url: str) -> bool:
        """One real HTTP request to ourselves over a plain socket (no client library: an
        HTTP client would build a TLS context on every probe, 20 ms of CPU each)."""
        host, _, port = url.partition("://")[2].partition("/")[0].rpartition(":")
        request = (
            f"GET {PROBE_PATH} HTTP/1.1\r\nHost: {host}\r\n"
            f"User-Agent: {PROBE_USER_AGENT}\r\nConnection: close\r\n\r\n"
        ).encode()
        with trio.move_on_after(PROBE_TIMEOUT):
            try:
                stream: trio.abc.Stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
                if self._probe_tls is not None:
                    stream = trio.SSLStream(stream, self._probe_tls, server_hostname=None)
                async with stream:
                    await stream.send_all(request)
                    reply = await stream.receive_some(64)
            except (OSError, trio.BrokenResourceError):
                return False
            if reply.startswith(b"HTTP/1.1 200"):
                self._last_ok = time.monotonic()
                return True
        return False

    async def _probe_forever(self, url: str) -> None:
        while True:
            await trio.sleep(PROBE_INTERVAL)
            await self._probe(url)


def _probe_url(bound: str) -> str:
    # A wildcard bind answers on loopback too.
    return bound.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]").rstrip("/")
