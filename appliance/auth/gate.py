"""The check every request passes before its handler: key, scope, failed-attempt and rate
limits. Only GET /api/v1/health/live and /ready (and CORS preflights) are open."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Final

import coredis

from appliance.auth.apikeys import ApiKey, KeyStore
from appliance.store.client import RedisClient, refuses_writes

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
FAILURES_ALLOWED: Final = 10
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
    """Why a request is turned away: status, code, message and headers for the API error."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


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
        """The caller's key (None for open routes); Refused otherwise."""
        if method == "OPTIONS" or path in PUBLIC_PATHS or blueprint in OPEN_BLUEPRINTS:
            return None
        if not self.enabled:
            return LOCAL_ADMIN
        failures_key = f"authfail:{self._client_id(address)}"
        failures = await self._client().get(failures_key)
        if failures is not None and int(failures) >= FAILURES_ALLOWED:
            wait = max(await self._client().ttl(failures_key), 1)
            raise Refused(
                429,
                "too_many_failed_attempts",
                f"too many requests with a wrong or missing API key from this address; "
                f"wait {wait} s",
                {"Retry-After": str(wait)},
            )
        token = bearer_token(header)
        key = await self.keys.authenticate(token) if token else None
        if key is None:
            with _unless_store_full():
                async with self._client().pipeline(transaction=True) as pipe:
                    pipe.incr(failures_key)
                    pipe.expire(failures_key, FAILURE_WINDOW)
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
