"""The Redis client service: one coredis client shared by the daemon, with a health probe.

It keeps pinging the server; `healthy()` is false once a ping failed or is overdue, which
makes readiness answer 503 and stops the systemd watchdog pings.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import coredis
import trio

from appliance.supervisor import Service

LOGGER = logging.getLogger("appliance.store")

PROBE_INTERVAL: Final = 1.0
PROBE_TIMEOUT: Final = 2.0
# A probe older than this counts as a failed one (a wedged server never answers).
PROBE_STALE_AFTER: Final = PROBE_INTERVAL + PROBE_TIMEOUT + 1.0
CONNECT_TIMEOUT: Final = 5.0
COMMAND_TIMEOUT: Final = 10.0


class StoreUnavailable(RuntimeError):
    """Redis cannot be reached right now."""


class Store(Service):
    """The daemon's Redis connection pool, alive while the service runs."""

    name = "store"
    critical = True

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: coredis.Redis[bytes] | None = None
        self._last_ok = 0.0

    @property
    def client(self) -> coredis.Redis[bytes]:
        if self._client is None:
            raise StoreUnavailable("the store is not connected")
        return self._client

    def healthy(self) -> bool:
        return time.monotonic() - self._last_ok < PROBE_STALE_AFTER

    async def ping(self, timeout: float = PROBE_TIMEOUT) -> float:
        """Round-trip time of one PING in seconds; StoreUnavailable when it fails."""
        started = time.monotonic()
        with trio.move_on_after(timeout):
            try:
                await self.client.ping()
            except (coredis.exceptions.RedisError, OSError) as exc:
                raise StoreUnavailable(f"Redis did not answer: {type(exc).__name__}") from None
            self._last_ok = time.monotonic()
            return self._last_ok - started
        raise StoreUnavailable(f"Redis did not answer within {timeout:.0f} s")

    async def memory(self) -> dict[str, Any]:
        try:
            info = await self.client.info("memory")
        except (coredis.exceptions.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis did not answer: {type(exc).__name__}") from None
        return {
            key: int(str(info.get(key, 0)))
            for key in ("used_memory", "maxmemory", "used_memory_rss")
        }

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        client: coredis.Redis[bytes] = coredis.Redis.from_url(
            self.url, connect_timeout=CONNECT_TIMEOUT, stream_timeout=COMMAND_TIMEOUT
        )
        async with client:
            self._client = client
            try:
                await self.ping(timeout=CONNECT_TIMEOUT)
                task_status.started()
                await self._probe_forever()
            finally:
                self._client = None

    async def _probe_forever(self) -> None:
        failing = False
        while True:
            await trio.sleep(PROBE_INTERVAL)
            try:
                await self.ping()
            except StoreUnavailable as exc:
                if not failing:
                    LOGGER.warning("%s", exc)
                failing = True
                continue
            if failing:
                LOGGER.info("Redis answers again")
            failing = False
