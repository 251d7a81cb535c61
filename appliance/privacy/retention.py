"""The retention sweep: conversations idle longer than PRIVACY_RETENTION_DAYS are deleted.

It walks the time index from its oldest end, so a sweep costs in proportion to what
expires, not to what is stored. Only counts are logged, never content.

Appliances that share a Redis sweep once per period between them, not once each. Two keys
in one hash slot (`retention:{sweep}:...`) decide whose turn it is:

    retention:{sweep}:lock    held while one appliance sweeps: SET NX PX with a random
                              token, renewed while the sweep runs, removed only by its
                              holder (compare-and-delete); it expires by itself if the
                              holder dies, and then another appliance takes over
    retention:{sweep}:done    set by the holder when its sweep is complete, expiring one
                              period later: until then nobody sweeps again
    retention:{sweep}:sweeps  how many sweeps all appliances together have made

An appliance that finds the period taken sleeps until it ends (Redis says when), so the
next sweep starts about one period after the last one finished, whichever appliance runs
it. Expiry is measured by Redis, so the appliances' clocks need not agree.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

import trio

from appliance.store.client import RedisClient
from appliance.store.conversations import Conversations
from appliance.supervisor import Service

LOGGER = logging.getLogger("appliance.privacy")

DAY_SECONDS = 86_400
LOCK_KEY: Final = "retention:{sweep}:lock"
DONE_KEY: Final = "retention:{sweep}:done"
SWEEPS_KEY: Final = "retention:{sweep}:sweeps"
# How long a sweeper holds the lock without renewing it; renewed every third of that.
LOCK_LEASE_SECONDS: Final = 60.0
# Waiting for a period to end, appliances add up to this much (or a tenth of the period)
# so that they do not all ask at the same millisecond.
JITTER_SECONDS: Final = 0.1

# KEYS: lock, done. ARGV: token, lease ms.
# Returns {"done", ms left of the period} | {"busy", ms left of the lock} | {"mine", 0}.
_BEGIN: Final = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {'done', redis.call('PTTL', KEYS[2])} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'mine', 0} end
return {'busy', redis.call('PTTL', KEYS[1])}
"""
# KEYS: lock. ARGV: token, lease ms. 1 while the token still holds the lock.
_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: lock, done, sweeps. ARGV: token, period ms. Marks the period swept (only while the
# token holds the lock) and releases the lock.
_FINISH: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('INCR', KEYS[3])
redis.call('DEL', KEYS[1])
return 1
"""
# KEYS: lock. ARGV: token. Releases the lock only for its holder.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SweepTurns:
    """Whose turn it is to sweep, among the appliances that share one Redis."""

    def __init__(self, client: Callable[[], RedisClient], period: float) -> None:
        self._client = client
        self.period = period
        self._lease_ms = int(LOCK_LEASE_SECONDS * 1000)

    async def begin(self) -> tuple[str, str | None, float]:
        """("mine", token, 0) when this appliance sweeps now, else ("done" or "busy",
        None, seconds until it is worth asking again)."""
        token = secrets.token_hex(16)
        reply = await self._client().eval(
            _BEGIN, keys=[LOCK_KEY, DONE_KEY], args=[token, self._lease_ms]
        )
        assert isinstance(reply, list | tuple)  # the script returns a two-item list
        state, left_ms = _text(reply[0]), int(_text(reply[1]))
        if state == "mine":
            return state, token, 0.0
        return state, None, max(left_ms, 0) / 1000

    async def renew(self, token: str) -> bool:
        reply = await self._client().eval(_RENEW, keys=[LOCK_KEY], args=[token, self._lease_ms])
        return int(_text(reply)) == 1

    async def finish(self, token: str) -> bool:
        """Mark this period swept; False when the lock was lost meanwhile."""
        reply = await self._client().eval(
            _FINISH,
            keys=[LOCK_KEY, DONE_KEY, SWEEPS_KEY],
            args=[token, max(int(self.period * 1000), 1)],
        )
        return int(_text(reply)) == 1

    async def release(self, token: str) -> None:
        await self._client().eval(_RELEASE, keys=[LOCK_KEY], args=[token])


class RetentionService(Service):
    """Sweeps at start and then every `interval` seconds, taking turns with the other
    appliances on the same Redis; failures are logged and retried."""

    name = "retention"
    critical = False

    def __init__(
        self,
        conversations: Conversations,
        retention_days: int,
        interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.conversations = conversations
        self.retention_days = retention_days
        self.interval = interval
        self.clock = clock
        self.turns = SweepTurns(lambda: conversations.store.client, interval)
        self.last_sweep: float | None = None
        self.last_removed = 0
        self.total_removed = 0
        self.sweeps = 0
        self.last_error: str | None = None

    async def sweep(self) -> int:
        """One sweep now, whoever else sweeps (`take_turn` is the shared schedule)."""
        cutoff = self.clock() - self.retention_days * DAY_SECONDS
        removed = await self.conversations.expire_older_than(cutoff)
        self.last_sweep = self.clock()
        self.last_removed = removed
        self.total_removed += removed
        self.sweeps += 1
        self.last_error = None
        LOGGER.info(
            "retention sweep deleted %d conversations idle for over %d days",
            removed,
            self.retention_days,
        )
        return removed

    def _jitter(self) -> float:
        return random.uniform(0.0, min(JITTER_SECONDS, self.interval / 10))

    async def take_turn(self) -> float:
        """Sweep if this period is not swept yet and nobody else is sweeping; the seconds
        to wait before asking again."""
        state, token, left = await self.turns.begin()
        if token is None:
            LOGGER.debug("retention: %s by another appliance; asking again in %.1f s", state, left)
            return min(self.interval, left) + self._jitter()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_lock, token, nursery.cancel_scope)
                await self.sweep()
                nursery.cancel_scope.cancel()
        except BaseException:
            with trio.move_on_after(2.0) as cleanup:
                cleanup.shield = True
                await self.turns.release(token)
            raise
        if not await self.turns.finish(token):
            LOGGER.warning(
                "retention: the sweep lock expired before the sweep finished; another "
                "appliance may sweep this period again"
            )
        return self.interval

    async def _keep_lock(self, token: str, sweeping: trio.CancelScope) -> None:
        while True:
            await trio.sleep(LOCK_LEASE_SECONDS / 3)
            if not await self.turns.renew(token):
                LOGGER.warning("retention: lost the sweep lock; leaving the sweep to its holder")
                sweeping.cancel()
                return

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                wait = await self.take_turn()
            except Exception as exc:
                # The store may be restarting; the next turn catches up.
                self.last_error = type(exc).__name__
                LOGGER.warning("retention sweep failed (%s); retrying later", type(exc).__name__)
                wait = min(self.interval, LOCK_LEASE_SECONDS)
            await trio.sleep(wait)
