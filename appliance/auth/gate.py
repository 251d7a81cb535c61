"""The check every request passes before its handler: key, scope, failed-attempt and rate
limits. Only GET /api/v1/health/live and /ready (and CORS preflights) are open.

Failed attempts (a wrong or missing key) are counted per client address bucket: an IPv4
address, an IPv6 /64 (what one host or site is usually given), and all of loopback
(127.0.0.0/8 and ::1) as one. Past FAILURES_ALLOWED in a window, a bucket's requests without
a valid key get 429 instead of 401 until the window ends. A valid key is never refused for
what others did from its address: behind a proxy, or on a shared NAT, one scanner must not
lock everyone out. Keys carry 256 random bits, so the limit is there to slow scanners and
keep them visible, not to stop a guess that cannot succeed.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import time
from collections.abc import Callable, Iterator
from typing import Final

import coredis
import trio
from coredis.tokens import PureToken

from appliance.auth.apikeys import ApiKey, KeyStore
from appliance.store.client import RedisClient, StoreUnavailable, refuses_writes

# Who every request is with APPLIANCE_AUTH=off (development on loopback only): the owner
# of what was stored before keys existed.
LOCAL_ADMIN: Final = ApiKey(id="local", name="local", scope="admin", created=0.0)
PUBLIC_PATHS: Final = frozenset({"/api/v1/health/live", "/api/v1/health/ready"})
# The web console's pages and files hold no data (they call the API with the person's key).
OPEN_BLUEPRINTS: Final = frozenset({"console"})
# Blueprints whose routes need scope admin: administration, backups, keys, the model
# registry's details and the service/metrics internals. Chat, conversations, privacy and
# the OpenAI API take any key.
ADMIN_BLUEPRINTS: Final = frozenset({"admin", "health", "models", "keys"})
FAILURE_WINDOW: Final = 60
# Failures a bucket may have in a window and still get 401; the next ones get 429.
FAILURES_ALLOWED: Final = 10
LOOPBACK_BUCKET: Final = "loopback"
IPV6_BUCKET_PREFIX: Final = 64
# How long an open route waits for its optional key to be looked up.
OPTIONAL_KEY_TIMEOUT: Final = 1.0
RATE_WINDOW: Final = 60


@contextlib.contextmanager
def _unless_store_full() -> Iterator[None]:
    """Skip a bookkeeping write that a full store refuses (OOM or MISCONF)."""
    try:
        yield
    except coredis.exceptions.RedisError as exc:
        if not refuses_writes(exc):
            raise


class Refused(Exception):
    """Why a request is turned away: status, code, message and headers for the API error.
    `limit_reached` marks the first refusal of a bucket in its window (worth a log line)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        *,
        limit_reached: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.limit_reached = limit_reached


def failure_bucket(address: str) -> str:
    """Whose failed attempts count together: the address, its /64 for IPv6, one bucket for
    all of loopback (any 127.x.y.z reaches the same box). Not an IP address: itself."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return LOOPBACK_BUCKET
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_BUCKET_PREFIX), strict=False))
    return str(ip)


def bearer_token(header: str | None) -> str:
    if not header or header[:7].lower() != "bearer ":
        return ""
    return header[7:].strip()


class Gate:
    """Decides per request; counters live in Redis, so they hold across appliances (each
    counter is one key, so its INCR and EXPIRE transaction stays in one cluster slot)."""

    def __init__(
        self,
        client: Callable[[], RedisClient],
        keys: KeyStore,
        hash_key: bytes,
        rate_limit: int,
        *,
        enabled: bool = True,
    ) -> None:
        self._client = client
        self.keys = keys
        self.hash_key = hash_key
        self.rate_limit = rate_limit
        self.enabled = enabled

    def _client_id(self, address: str) -> str:
        return hashlib.blake2b(address.encode(), key=self.hash_key, digest_size=12).hexdigest()

    async def check(
        self, path: str, method: str, blueprint: str | None, header: str | None, address: str
    ) -> ApiKey | None:
        """The caller's key (None for open routes without a valid key); Refused otherwise."""
        if method == "OPTIONS" or blueprint in OPEN_BLUEPRINTS:
            return None
        if not self.enabled:
            return LOCAL_ADMIN
        token = bearer_token(header)
        if path in PUBLIC_PATHS:
            return await self._optional_key(token)
        key = await self.keys.authenticate(token) if token else None
        if key is None:
            await self._count_failure(address)
            raise Refused(
                401,
                "invalid_api_key",
                "a valid API key is needed: send Authorization: Bearer <key> "
                "(an admin creates keys with: appliance keys create --name NAME --scope user)",
                {"WWW-Authenticate": "Bearer"},
            )
        if blueprint in ADMIN_BLUEPRINTS and key.scope != "admin":
            raise Refused(403, "admin_scope_required", "this endpoint needs a key with scope admin")
        if self.rate_limit:
            # A full store cannot count; the request still gets through, so that reads
            # and deletes (which make room) keep working.
            with _unless_store_full():
                await self._count_request(key)
        return key

    async def _optional_key(self, token: str) -> ApiKey | None:
        """The key on an open route, where it only lets the handler say more (readiness
        details for admins). Open routes must answer while Redis does not (readiness says
        so), so a slow or failing lookup, or a wrong key, is just no key; not a failure."""
        if not token:
            return None
        with trio.move_on_after(OPTIONAL_KEY_TIMEOUT):
            try:
                return await self.keys.authenticate(token)
            except (coredis.exceptions.RedisError, StoreUnavailable):
                return None
        return None

    async def _count_failure(self, address: str) -> None:
        """Count one failed attempt of the address's bucket; Refused(429) past the limit.
        The window is fixed from the bucket's first failure: later failures do not extend
        it, so a client is never refused for longer than FAILURE_WINDOW seconds."""
        counter = f"authfail:{self._client_id(failure_bucket(address))}"
        failures = 0
        with _unless_store_full():
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.set(counter, "0", ex=FAILURE_WINDOW, condition=PureToken.NX)
                counted = pipe.incr(counter)
                remaining = pipe.ttl(counter)
            failures = await counted
        if failures <= FAILURES_ALLOWED:
            return
        wait = max(await remaining, 1)
        raise Refused(
            429,
            "too_many_failed_attempts",
            f"more than {FAILURES_ALLOWED} requests with a wrong or missing API key from this "
            f"address in {FAILURE_WINDOW} s; wait {wait} s (requests with a valid key are "
            "still served)",
            {"Retry-After": str(wait)},
            limit_reached=failures == FAILURES_ALLOWED + 1,
        )

    async def _count_request(self, key: ApiKey) -> None:
        window = int(time.time() // RATE_WINDOW)
        counter = f"rate:{{{key.id}}}:{window}"
        async with self._client().pipeline(transaction=True) as pipe:
            counted = pipe.incr(counter)
            pipe.expire(counter, RATE_WINDOW * 2)
        if await counted > self.rate_limit:
            wait = RATE_WINDOW - int(time.time()) % RATE_WINDOW
            raise Refused(
                429,
                "rate_limited",
                f"this key made more than {self.rate_limit} requests this minute "
                f"(APPLIANCE_RATE_LIMIT); wait {wait} s",
                {"Retry-After": str(wait)},
            )
