"""The Redis client service: one coredis client shared by the daemon, with a health probe.

It keeps pinging the server; `healthy()` is false once a ping failed or is overdue, which
makes readiness answer 503 and stops the systemd watchdog pings.

`APPLIANCE_REDIS_URL` says which kind of Redis it is: `redis://`, `rediss://` or `unix://`
for one server, `redis+cluster://HOST:PORT[,HOST:PORT...]` (or `rediss+cluster://`) for a
Redis Cluster, whose named nodes are only where the client starts to discover the rest.
A URL of one kind that reaches a server of the other is refused with a message that says
which scheme to write.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Final, TypeAlias

import coredis
import trio
from coredis.connection import TCPLocation

from appliance.supervisor import Service

LOGGER = logging.getLogger("appliance.store")

PROBE_INTERVAL: Final = 1.0
PROBE_TIMEOUT: Final = 2.0
# A probe older than this counts as a failed one (a wedged server never answers).
PROBE_STALE_AFTER: Final = PROBE_INTERVAL + PROBE_TIMEOUT + 1.0
CONNECT_TIMEOUT: Final = 5.0
COMMAND_TIMEOUT: Final = 10.0
# Cluster scheme -> the scheme coredis reads for its first node.
CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
DEFAULT_PORT: Final = 6379
_NODE: Final = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-]+))(?::(?P<port>[0-9]{1,5}))?"
)

# A standalone server or a cluster: both have the same commands, and pipelines with
# transaction=True (a cluster's only within one hash slot).
RedisClient: TypeAlias = "coredis.Redis[bytes] | coredis.RedisCluster[bytes]"


class StoreUnavailable(RuntimeError):
    """Redis cannot be reached right now."""


class StoreMisconfigured(StoreUnavailable):
    """APPLIANCE_REDIS_URL cannot work as written; the message says what to change."""


def refuses_writes(exc: BaseException) -> bool:
    """Redis answered, but refuses writes: maxmemory is reached (OOM, with noeviction) or it
    cannot write its files (MISCONF: a full disk). Reads and deletes still work."""
    text = str(exc)
    return isinstance(exc, coredis.exceptions.RedisError) and ("OOM" in text or "MISCONF" in text)


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def _cluster_nodes(url: str) -> tuple[str, list[TCPLocation]]:
    """The URL coredis reads (its first node, credentials and options) and every node."""
    scheme, _, rest = url.partition("://")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    credentials, at, hosts = netloc.rpartition("@")
    nodes: list[TCPLocation] = []
    for node in hosts.split(","):
        match = _NODE.fullmatch(node)
        if match is None or not 0 < int(match["port"] or DEFAULT_PORT) < 65536:
            raise StoreMisconfigured(
                f"APPLIANCE_REDIS_URL names the cluster node {node!r}; write the nodes as "
                f"{scheme}://HOST:PORT[,HOST:PORT...]"
            )
        nodes.append(TCPLocation(match["v6"] or match["host"], int(match["port"] or DEFAULT_PORT)))
    first = hosts.split(",")[0]
    return f"{CLUSTER_SCHEMES[scheme]}://{credentials}{at}{first}{tail}", nodes


def connect(
    url: str, *, connect_timeout: float | None = None, stream_timeout: float | None = None
) -> RedisClient:
    """A client for the URL: a RedisCluster for the cluster schemes, else a Redis. Use it
    as an async context manager (coredis connects inside it)."""
    if is_cluster_url(url):
        first, nodes = _cluster_nodes(url)
        cluster: coredis.RedisCluster[bytes] = coredis.RedisCluster.from_url(
            first,
            startup_nodes=nodes,
            connect_timeout=connect_timeout,
            stream_timeout=stream_timeout,
        )
        return cluster
    single: coredis.Redis[bytes] = coredis.Redis.from_url(
        url, connect_timeout=connect_timeout, stream_timeout=stream_timeout
    )
    return single


async def check_mode(url: str) -> None:
    """Refuse a standalone URL that reaches a cluster node, and the other way round.

    Asks the (first) named server with a plain client; when it does not answer, nothing is
    said here and the real client reports that."""
    cluster = is_cluster_url(url)
    plain_url = _cluster_nodes(url)[0] if cluster else url
    probe: coredis.Redis[bytes] = coredis.Redis.from_url(plain_url, connect_timeout=CONNECT_TIMEOUT)
    try:
        async with probe:
            info = await probe.info("cluster")
    except (coredis.exceptions.RedisError, OSError):
        return
    except ExceptionGroup as group:
        # coredis's pool raises a refused connection from inside its task group.
        _, rest = group.split((coredis.exceptions.RedisError, OSError))
        if rest is not None:
            raise
        return
    enabled = str(info.get("cluster_enabled", "0")) == "1"
    where = plain_url.partition("://")[2].rpartition("@")[2] or plain_url
    if cluster and not enabled:
        raise StoreMisconfigured(
            f"APPLIANCE_REDIS_URL says Redis Cluster, but {where} is a standalone server "
            "(cluster_enabled:0); write it as redis://HOST:PORT"
        )
    if not cluster and enabled:
        raise StoreMisconfigured(
            f"the Redis at {where} is a cluster node (cluster_enabled:1); write "
            "APPLIANCE_REDIS_URL as redis+cluster://HOST:PORT[,HOST:PORT...]"
        )


def _memory(info: dict[str, Any]) -> dict[str, int]:
    return {
        key: int(str(info.get(key, 0))) for key in ("used_memory", "maxmemory", "used_memory_rss")
    }


def _fullness(memory: dict[str, int]) -> float:
    return memory["used_memory"] / memory["maxmemory"] if memory["maxmemory"] else 0.0


class Store(Service):
    """The daemon's Redis connection pool, alive while the service runs."""

    name = "store"
    critical = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.cluster = is_cluster_url(url)
        # The store's id (appliance.store.identity), set once the daemon has read it.
        self.identity = ""
        self._client: RedisClient | None = None
        self._last_ok = 0.0

    @property
    def client(self) -> RedisClient:
        if self._client is None:
            raise StoreUnavailable("the store is not connected")
        return self._client

    def healthy(self) -> bool:
        return time.monotonic() - self._last_ok < PROBE_STALE_AFTER

    async def ping(self, timeout: float = PROBE_TIMEOUT) -> float:
        """Round-trip time of one PING in seconds (every primary of a cluster answers);
        StoreUnavailable when it fails."""
        started = time.monotonic()
        with trio.move_on_after(timeout):
            try:
                await self.client.ping()
            except (coredis.exceptions.RedisError, OSError) as exc:
                # On a full disk Redis answers even PING with MISCONF: it is alive (reads
                # work), and restarting it would not make room.
                if not refuses_writes(exc):
                    raise StoreUnavailable(f"Redis did not answer: {type(exc).__name__}") from None
            self._last_ok = time.monotonic()
            return self._last_ok - started
        raise StoreUnavailable(f"Redis did not answer within {timeout:.0f} s")

    async def memory(self) -> dict[str, Any]:
        """used_memory, maxmemory and used_memory_rss; of a cluster, those of the fullest
        primary (a full primary refuses the writes of its slots, whatever the others have)."""
        client = self.client
        try:
            if not isinstance(client, coredis.RedisCluster):
                return _memory(await client.info("memory"))
            found: list[dict[str, int]] = []
            for node in client.connection_pool.cluster_layout.primaries:
                node_client = node.as_client(**client.connection_pool.connection_kwargs)
                async with node_client:
                    found.append(_memory(await node_client.info("memory")))
        except (coredis.exceptions.RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis did not answer: {type(exc).__name__}") from None
        if not found:
            raise StoreUnavailable("the cluster has no primary to ask")
        return max(found, key=_fullness)

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await check_mode(self.url)
        client = connect(self.url, connect_timeout=CONNECT_TIMEOUT, stream_timeout=COMMAND_TIMEOUT)
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
