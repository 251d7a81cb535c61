"""Token budgets per key, per day and per month, counted in Redis.

Before a generation the request reserves what it may use (prompt plus max_tokens, capped at
what is left) with one Lua script that checks both periods and increments both counters
atomically, so several appliances on one Redis never hand out more than the budget. After
the generation the unused part is given back. A request whose reservation is smaller than
its max_tokens is cut when it reaches the reservation: the budget, not the model, ended it.
Local and remote usage are separate counters; remote usage is also counted in money.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Final, Literal

import coredis
import msgspec

Kind = Literal["local", "remote"]
USAGE_PREFIX: Final = "usage:"
# A day's counter outlives its day by a little (for `keys usage` around midnight).
DAY_TTL: Final = 3 * 86_400
MONTH_TTL: Final = 40 * 86_400

# KEYS: day counter, month counter. ARGV: wanted, day limit, month limit (-1 = none),
# minimum (less than this is a refusal), day ttl, month ttl.
# Returns {granted, day used before, month used before}; granted 0 means refused.
_RESERVE: Final = """
local day = tonumber(redis.call('GET', KEYS[1]) or '0')
local month = tonumber(redis.call('GET', KEYS[2]) or '0')
local wanted = tonumber(ARGV[1])
local left = wanted
if tonumber(ARGV[2]) >= 0 then left = math.min(left, tonumber(ARGV[2]) - day) end
if tonumber(ARGV[3]) >= 0 then left = math.min(left, tonumber(ARGV[3]) - month) end
if left < tonumber(ARGV[4]) then return {0, day, month} end
redis.call('INCRBY', KEYS[1], left)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('INCRBY', KEYS[2], left)
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {left, day, month}
"""


class BudgetExceeded(Exception):
    """The named budget is used up; says how much was used and when it resets."""

    def __init__(self, budget: str, used: int, limit: int, resets: datetime.datetime) -> None:
        self.budget, self.used, self.limit, self.resets = budget, used, limit, resets
        super().__init__(
            f"the {budget} budget of this key is used up: {used} of {limit} tokens; it resets "
            f"at {resets.isoformat().replace('+00:00', 'Z')}"
        )


class Usage(msgspec.Struct):
    kind: str
    day: int
    month: int
    tokens_per_day: int | None
    tokens_per_month: int | None
    day_resets: str
    month_resets: str
    cost_month: float | None = None


def _periods(now: datetime.datetime) -> tuple[str, str, datetime.datetime, datetime.datetime]:
    day_end = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    month_end = (now.replace(day=28) + datetime.timedelta(days=4)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    return now.strftime("%Y%m%d"), now.strftime("%Y%m"), day_end, month_end


def counter_keys(key_id: str, kind: Kind, now: datetime.datetime) -> tuple[str, str]:
    day, month, _, _ = _periods(now)
    base = f"{USAGE_PREFIX}{{{key_id}}}:{kind}"
    return f"{base}:day:{day}", f"{base}:month:{month}"


class Reservation(msgspec.Struct):
    key_id: str
    kind: str
    granted: int
    day_key: str
    month_key: str


class Budgets:
    """Reserve, settle and report token budgets; `limits=None` for a key means no budget."""

    def __init__(self, client: Callable[[], coredis.Redis[bytes]], enforce: bool) -> None:
        self._client = client
        self.enforce = enforce

    async def reserve(
        self,
        key_id: str,
        kind: Kind,
        wanted: int,
        minimum: int,
        tokens_per_day: int | None,
        tokens_per_month: int | None,
        now: datetime.datetime | None = None,
    ) -> Reservation:
        """Up to `wanted` tokens, at least `minimum`, or BudgetExceeded naming the budget."""
        now = now or datetime.datetime.now(datetime.UTC)
        day_key, month_key = counter_keys(key_id, kind, now)
        day_limit = tokens_per_day if self.enforce and tokens_per_day is not None else -1
        month_limit = tokens_per_month if self.enforce and tokens_per_month is not None else -1
        reply = await self._client().eval(
            _RESERVE,
            keys=[day_key, month_key],
            args=[wanted, day_limit, month_limit, minimum, DAY_TTL, MONTH_TTL],
        )
        assert isinstance(reply, list | tuple)  # the script returns a three-item list
        granted, day_used, month_used = (int(str(item)) for item in reply)
        if granted == 0:
            _, _, day_end, month_end = _periods(now)
            if day_limit >= 0 and day_used + minimum > day_limit:
                raise BudgetExceeded(f"daily {kind}", day_used, day_limit, day_end)
            raise BudgetExceeded(f"monthly {kind}", month_used, month_limit, month_end)
        return Reservation(key_id, kind, granted, day_key, month_key)

    async def settle(self, reservation: Reservation, used: int) -> None:
        """Count what the request really used: give back the unused part of the
        reservation, or add what it used beyond it (a prompt longer than estimated; at most
        one request's worth over the budget)."""
        difference = used - reservation.granted
        if difference:
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.incrby(reservation.day_key, difference)
                pipe.incrby(reservation.month_key, difference)

    async def usage(
        self,
        key_id: str,
        kind: Kind,
        tokens_per_day: int | None,
        tokens_per_month: int | None,
        now: datetime.datetime | None = None,
    ) -> Usage:
        now = now or datetime.datetime.now(datetime.UTC)
        day_key, month_key = counter_keys(key_id, kind, now)
        day, month = await self._client().mget([day_key, month_key])
        _, _, day_end, month_end = _periods(now)
        return Usage(
            kind=kind,
            day=int(day or 0),
            month=int(month or 0),
            tokens_per_day=tokens_per_day,
            tokens_per_month=tokens_per_month,
            day_resets=day_end.isoformat(),
            month_resets=month_end.isoformat(),
        )
