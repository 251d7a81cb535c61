"""Token budgets per key, per day and per month, counted in Redis.

Before a generation the request reserves what it may use (prompt plus max_tokens, capped at
what is left) with one Lua script that checks both periods and increments both counters
atomically, so several appliances on one Redis never hand out more than the budget. After
the generation the unused part is given back. A request whose reservation is smaller than
its max_tokens is cut when it reaches the reservation: the budget, not the model, ended it.
Local and remote usage are separate counters; remote usage is also counted in money.
Web searches are counted per key and day too (SEARCH_BUDGET_DAILY), one at a time.
A key's counters share its hash tag (`usage:{<key id>}:...`), so the script and the
settling transaction stay in one slot of a Redis Cluster.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Final, Literal

import msgspec

from appliance.store.client import RedisClient

Kind = Literal["local", "remote"]
USAGE_PREFIX: Final = "usage:"
# Remote spending is counted in millionths of the currency, so that Redis adds integers.
MICROS: Final = 1_000_000
# The remote spending budget is the whole appliance's (one bill), not a key's.
APPLIANCE_OWNER: Final = "appliance"
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
            f"at {_when(resets)}"
        )


class SpendingExceeded(BudgetExceeded):
    """The appliance's monthly remote spending budget is used up."""

    def __str__(self) -> str:
        return (
            f"the monthly remote spending budget of this appliance is used up: "
            f"{self.used / MICROS:.4f} of {self.limit / MICROS:.4f} "
            f"(APPLIANCE_REMOTE_BUDGET_MONTHLY); it resets at {_when(self.resets)}"
        )


class SearchBudgetExceeded(BudgetExceeded):
    """A key's daily search budget is used up."""

    def __str__(self) -> str:
        return (
            f"the daily search budget of this key is used up: {self.used} of {self.limit} "
            f"searches (SEARCH_BUDGET_DAILY); it resets at {_when(self.resets)}"
        )


def _when(moment: datetime.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


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


def counter_keys(key_id: str, kind: str, now: datetime.datetime) -> tuple[str, str]:
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

    def __init__(self, client: Callable[[], RedisClient], enforce: bool) -> None:
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
        granted, day_used, month_used = await self._reserve(
            day_key, month_key, wanted, day_limit, month_limit, minimum
        )
        if granted == 0:
            _, _, day_end, month_end = _periods(now)
            if day_limit >= 0 and day_used + minimum > day_limit:
                raise BudgetExceeded(f"daily {kind}", day_used, day_limit, day_end)
            raise BudgetExceeded(f"monthly {kind}", month_used, month_limit, month_end)
        return Reservation(key_id, kind, granted, day_key, month_key)

    async def reserve_spending(
        self,
        wanted: int,
        minimum: int,
        monthly_limit: int | None,
        now: datetime.datetime | None = None,
    ) -> Reservation:
        """Up to `wanted` micros of the appliance's monthly remote spending, at least
        `minimum`, or SpendingExceeded."""
        now = now or datetime.datetime.now(datetime.UTC)
        day_key, month_key = counter_keys(APPLIANCE_OWNER, "spend", now)
        limit = monthly_limit if self.enforce and monthly_limit is not None else -1
        granted, _, month_used = await self._reserve(day_key, month_key, wanted, -1, limit, minimum)
        if granted == 0:
            raise SpendingExceeded("monthly remote spending", month_used, limit, _periods(now)[3])
        return Reservation(APPLIANCE_OWNER, "spend", granted, day_key, month_key)

    async def count_search(
        self, key_id: str, per_day: int | None, now: datetime.datetime | None = None
    ) -> None:
        """Count one search of a key, or SearchBudgetExceeded when `per_day` are done
        today (with budgets not enforced, it is only counted)."""
        now = now or datetime.datetime.now(datetime.UTC)
        day_key, month_key = counter_keys(key_id, "search", now)
        limit = per_day if self.enforce and per_day else -1
        granted, day_used, _ = await self._reserve(day_key, month_key, 1, limit, -1, 1)
        if granted == 0:
            raise SearchBudgetExceeded("daily search", day_used, limit, _periods(now)[2])

    async def searches_today(self, key_id: str, now: datetime.datetime | None = None) -> int:
        day_key, _ = counter_keys(key_id, "search", now or datetime.datetime.now(datetime.UTC))
        return int(await self._client().get(day_key) or 0)

    async def record_spending(self, key_id: str, micros: int) -> None:
        """Count what a key's remote requests cost (for its usage report)."""
        if micros > 0:
            day_key, month_key = counter_keys(key_id, "spend", datetime.datetime.now(datetime.UTC))
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.incrby(day_key, micros)
                pipe.expire(day_key, DAY_TTL)
                pipe.incrby(month_key, micros)
                pipe.expire(month_key, MONTH_TTL)

    async def spending(self, owner: str, now: datetime.datetime | None = None) -> float:
        """This month's remote spending of a key (or of APPLIANCE_OWNER), in money."""
        _, month_key = counter_keys(owner, "spend", now or datetime.datetime.now(datetime.UTC))
        return int(await self._client().get(month_key) or 0) / MICROS

    async def _reserve(
        self, day_key: str, month_key: str, wanted: int, day: int, month: int, minimum: int
    ) -> tuple[int, int, int]:
        reply = await self._client().eval(
            _RESERVE,
            keys=[day_key, month_key],
            args=[wanted, day, month, minimum, DAY_TTL, MONTH_TTL],
        )
        assert isinstance(reply, list | tuple)  # the script returns a three-item list
        granted, day_used, month_used = (int(str(item)) for item in reply)
        return granted, day_used, month_used

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
            cost_month=await self.spending(key_id, now) if kind == "remote" else None,
        )

    async def report(
        self, key_id: str, tokens_per_day: int | None, tokens_per_month: int | None
    ) -> dict[str, Usage]:
        """A key's local and remote usage; each kind has the key's token budgets."""
        return {
            kind: await self.usage(key_id, kind, tokens_per_day, tokens_per_month)
            for kind in ("local", "remote")
        }


def key_limits(
    key_day: int | None, key_month: int | None, default_day: int, default_month: int
) -> tuple[int | None, int | None]:
    """A key's token budgets per day and month: its own, else the defaults (0 = none)."""
    day = key_day if key_day is not None else default_day
    month = key_month if key_month is not None else default_month
    return day or None, month or None
