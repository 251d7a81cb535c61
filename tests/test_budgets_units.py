"""Token budgets and remote spending, one rule at a time, in the real redis-server.

Each test pins a number a key's owner or the appliance's bill would show: what a reservation
grants, what settling gives back or adds, which budget a refusal names and when it resets,
what the remote spending counters hold and how long the counters live.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import coredis
import pytest
import trio

from appliance.auth.budgets import (
    BudgetExceeded,
    Budgets,
    SearchBudgetExceeded,
    SpendingExceeded,
    counter_keys,
    key_limits,
)
from appliance.store.server import EmbeddedRedis
from tests.harness import short_tempdir

# Far from the real date, so that a counter of "now" can never be mistaken for one of NOW.
NOW = datetime.datetime(2001, 11, 25, 23, 59, 30, 123_456, tzinfo=datetime.UTC)
DAY_KEY = "usage:{k}:local:day:20011125"
MONTH_KEY = "usage:{k}:local:month:200111"
DAY_TTL_S = 3 * 86_400
MONTH_TTL_S = 40 * 86_400


@asynccontextmanager
async def redis() -> AsyncIterator[coredis.Redis[bytes]]:
    directory = short_tempdir()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = EmbeddedRedis(directory, directory / "run", "64mb")
            await nursery.start(server.run)
            client: coredis.Redis[bytes] = coredis.Redis(unix_socket_path=str(server.socket_path))
            async with client:
                yield client
            nursery.cancel_scope.cancel()


async def counters(client: coredis.Redis[bytes], *keys: str) -> list[int | None]:
    return [None if value is None else int(value) for value in await client.mget(list(keys))]


def test_counter_keys_name_the_day_and_the_month_under_the_key_hash_tag() -> None:
    assert counter_keys("k", "local", NOW) == (DAY_KEY, MONTH_KEY)
    assert counter_keys("k", "spend", NOW) == (
        "usage:{k}:spend:day:20011125",
        "usage:{k}:spend:month:200111",
    )


@pytest.mark.parametrize(
    ("now", "day_resets", "month_resets"),
    [
        (NOW, "2001-11-26T00:00:00+00:00", "2001-12-01T00:00:00+00:00"),
        # The last day of a 31-day month, and February of a year that is not a leap year.
        (
            datetime.datetime(2001, 12, 31, 12, 0, 1, 1, tzinfo=datetime.UTC),
            "2002-01-01T00:00:00+00:00",
            "2002-01-01T00:00:00+00:00",
        ),
        (
            datetime.datetime(2003, 2, 10, 1, 2, 3, tzinfo=datetime.UTC),
            "2003-02-11T00:00:00+00:00",
            "2003-03-01T00:00:00+00:00",
        ),
    ],
)
async def test_usage_says_when_the_day_and_the_month_reset(
    now: datetime.datetime, day_resets: str, month_resets: str
) -> None:
    async with redis() as client:
        usage = await Budgets(lambda: client, enforce=True).usage("k", "local", 10, 20, now=now)
    assert (usage.day_resets, usage.month_resets) == (day_resets, month_resets)
    assert (usage.day, usage.month) == (0, 0)  # nothing used yet is 0, not missing
    assert (usage.tokens_per_day, usage.tokens_per_month) == (10, 20)
    assert usage.kind == "local" and usage.cost_month is None


async def test_a_reservation_grants_what_is_left_and_counts_it_in_both_periods() -> None:
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=True)
        first = await budgets.reserve("k", "local", 60, 10, 100, 1000, now=NOW)
        assert (first.key_id, first.kind, first.granted) == ("k", "local", 60)
        assert (first.day_key, first.month_key) == (DAY_KEY, MONTH_KEY)
        # Only 40 are left today: that is what the second request gets.
        second = await budgets.reserve("k", "local", 60, 10, 100, 1000, now=NOW)
        assert second.granted == 40
        assert await counters(client, DAY_KEY, MONTH_KEY) == [100, 100]
        day_ttl, month_ttl = await client.ttl(DAY_KEY), await client.ttl(MONTH_KEY)
    assert DAY_TTL_S - 10 <= day_ttl <= DAY_TTL_S
    assert MONTH_TTL_S - 10 <= month_ttl <= MONTH_TTL_S


async def test_settling_gives_back_the_unused_part_and_adds_overuse() -> None:
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=True)
        reservation = await budgets.reserve("k", "local", 100, 10, 1000, 5000, now=NOW)
        await budgets.settle(reservation, 30)
        assert await counters(client, DAY_KEY, MONTH_KEY) == [30, 30]
        reservation = await budgets.reserve("k", "local", 100, 10, 1000, 5000, now=NOW)
        await budgets.settle(reservation, 150)  # a prompt longer than estimated
        assert await counters(client, DAY_KEY, MONTH_KEY) == [180, 180]
        reservation = await budgets.reserve("k", "local", 20, 10, 1000, 5000, now=NOW)
        await budgets.settle(reservation, 20)
        usage = await budgets.usage("k", "local", 1000, 5000, now=NOW)
    assert (usage.day, usage.month) == (200, 200)


async def test_a_refusal_names_the_daily_budget_its_use_and_when_it_resets() -> None:
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=True)
        await budgets.reserve("k", "local", 95, 1, 100, 1000, now=NOW)
        with pytest.raises(BudgetExceeded) as refused:
            await budgets.reserve("k", "local", 50, 10, 100, 1000, now=NOW)
        assert await counters(client, DAY_KEY, MONTH_KEY) == [95, 95]  # nothing taken
    exc = refused.value
    assert (exc.budget, exc.used, exc.limit) == ("daily local", 95, 100)
    assert exc.resets == datetime.datetime(2001, 11, 26, tzinfo=datetime.UTC)
    assert str(exc) == (
        "the daily local budget of this key is used up: 95 of 100 tokens; it resets at "
        "2001-11-26T00:00:00Z"
    )


async def test_a_month_refusal_is_not_blamed_on_the_day() -> None:
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=True)
        await budgets.reserve("k", "remote", 90, 1, 100, 95, now=NOW)
        # 10 more would still fit today's 100, but not the month's 95.
        with pytest.raises(BudgetExceeded) as refused:
            await budgets.reserve("k", "remote", 10, 10, 100, 95, now=NOW)
    exc = refused.value
    assert (exc.budget, exc.used, exc.limit) == ("monthly remote", 90, 95)
    assert exc.resets == datetime.datetime(2001, 12, 1, tzinfo=datetime.UTC)


async def test_a_zero_daily_budget_refuses_naming_the_day() -> None:
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=True)
        with pytest.raises(BudgetExceeded) as refused:
            await budgets.reserve("k", "local", 10, 1, 0, None, now=NOW)
    assert (refused.value.budget, refused.value.used, refused.value.limit) == (
        "daily local",
        0,
        0,
    )


async def test_no_daily_budget_means_only_the_month_counts() -> None:
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=True)
        granted = await budgets.reserve("k", "local", 500, 1, None, 600, now=NOW)
        assert granted.granted == 500
        assert (await budgets.reserve("k", "local", 500, 1, 10_000, None, now=NOW)).granted == 500
        with pytest.raises(BudgetExceeded, match="monthly local"):
            await budgets.reserve("k", "local", 500, 200, None, 600, now=NOW)


async def test_without_a_time_the_counters_of_today_are_used() -> None:
    today = datetime.datetime.now(datetime.UTC)
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=True)
        reservation = await budgets.reserve("k", "local", 7, 1, 100, 100)
        spending = await budgets.reserve_spending(3, 1, 100)
        await budgets.record_spending("k", 250_000)
        usage = await budgets.usage("k", "local", 100, 100)
        assert await budgets.spending("k") == 0.25
        assert await budgets.spending("appliance") == 0.000003
    if datetime.datetime.now(datetime.UTC).date() != today.date():
        pytest.skip("the day changed during the test")
    assert (reservation.day_key, reservation.month_key) == counter_keys("k", "local", today)
    assert spending.month_key == counter_keys("appliance", "spend", today)[1]
    assert (usage.day, usage.month) == (7, 7)


async def test_remote_spending_is_reserved_against_the_appliance_monthly_budget() -> None:
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=True)
        first = await budgets.reserve_spending(600_000, 1, 1_000_000, now=NOW)
        assert (first.key_id, first.kind, first.granted) == ("appliance", "spend", 600_000)
        assert (first.day_key, first.month_key) == (
            "usage:{appliance}:spend:day:20011125",
            "usage:{appliance}:spend:month:200111",
        )
        second = await budgets.reserve_spending(600_000, 1, 1_000_000, now=NOW)
        assert second.granted == 400_000  # what is left of the month
        assert await budgets.spending("appliance", now=NOW) == 1.0
        with pytest.raises(SpendingExceeded) as refused:
            await budgets.reserve_spending(10, 1, 1_000_000, now=NOW)
        month_ttl = await client.ttl(first.month_key)
    exc = refused.value
    assert (exc.used, exc.limit) == (1_000_000, 1_000_000)
    assert exc.resets == datetime.datetime(2001, 12, 1, tzinfo=datetime.UTC)
    assert str(exc) == (
        "the monthly remote spending budget of this appliance is used up: 1.0000 of 1.0000 "
        "(APPLIANCE_REMOTE_BUDGET_MONTHLY); it resets at 2001-12-01T00:00:00Z"
    )
    assert MONTH_TTL_S - 10 <= month_ttl <= MONTH_TTL_S


async def test_spending_below_the_minimum_left_is_refused_and_settles_like_tokens() -> None:
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=True)
        reservation = await budgets.reserve_spending(900_000, 1, 1_000_000, now=NOW)
        await budgets.settle(reservation, 850_000)  # the answer cost less than reserved
        assert await budgets.spending("appliance", now=NOW) == 0.85
        with pytest.raises(SpendingExceeded):
            await budgets.reserve_spending(200_000, 150_001, 1_000_000, now=NOW)
        assert (await budgets.reserve_spending(200_000, 150_000, 1_000_000, now=NOW)).granted == (
            150_000
        )


async def test_unenforced_or_unlimited_spending_is_counted_and_never_refused() -> None:
    async with redis() as client:
        unenforced = Budgets(lambda: client, enforce=False)
        for _ in range(3):
            assert (await unenforced.reserve_spending(700, 700, 1000, now=NOW)).granted == 700
        assert await unenforced.spending("appliance", now=NOW) == 0.0021
        unlimited = Budgets(lambda: client, enforce=True)
        assert (await unlimited.reserve_spending(10**9, 1, None, now=NOW)).granted == 10**9


async def test_recorded_spending_counts_only_a_positive_cost_for_its_key() -> None:
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=True)
        await budgets.record_spending("k", 0)
        await budgets.record_spending("k", -5)
        day_key, month_key = counter_keys("k", "spend", datetime.datetime.now(datetime.UTC))
        assert await client.exists([day_key, month_key]) == 0
        await budgets.record_spending("k", 1_500_000)
        await budgets.record_spending("k", 1)
        assert await counters(client, day_key, month_key) == [1_500_001, 1_500_001]
        day_ttl, month_ttl = await client.ttl(day_key), await client.ttl(month_key)
        assert await budgets.spending("k") == 1.500001
        assert await budgets.spending("nobody") == 0.0
        usage = await budgets.usage("k", "remote", None, None)
    assert DAY_TTL_S - 10 <= day_ttl <= DAY_TTL_S
    assert MONTH_TTL_S - 10 <= month_ttl <= MONTH_TTL_S
    assert usage.kind == "remote" and usage.cost_month == 1.500001


async def test_the_report_has_local_and_remote_usage_with_the_key_budgets() -> None:
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=True)
        await budgets.reserve("k", "remote", 12, 1, 100, 1000)
        report = await budgets.report("k", 100, 1000)
    assert sorted(report) == ["local", "remote"]
    assert (report["local"].day, report["remote"].day) == (0, 12)
    assert report["local"].cost_month is None and report["remote"].cost_month == 0.0
    assert (report["remote"].tokens_per_day, report["remote"].tokens_per_month) == (100, 1000)


@pytest.mark.parametrize(
    ("key_day", "key_month", "default_day", "default_month", "expected"),
    [
        (None, None, 100, 2000, (100, 2000)),  # the defaults
        (5, 60, 100, 2000, (5, 60)),  # the key's own
        (0, None, 100, 0, (None, None)),  # 0 is no budget, the key's or the default
        (None, 7, 0, 2000, (None, 7)),
    ],
)
def test_key_limits_take_the_key_own_else_the_defaults(
    key_day: int | None,
    key_month: int | None,
    default_day: int,
    default_month: int,
    expected: tuple[int | None, int | None],
) -> None:
    assert key_limits(key_day, key_month, default_day, default_month) == expected


# --- web searches ----------------------------------------------------------------------------

SEARCH_DAY_KEY = "usage:{k}:search:day:20011125"


async def test_a_search_counts_one_and_the_one_past_the_daily_budget_is_refused() -> None:
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=True)
        assert await budgets.searches_today("k", now=NOW) == 0
        for done in (1, 2):
            await budgets.count_search("k", 2, now=NOW)
            assert await budgets.searches_today("k", now=NOW) == done
        with pytest.raises(SearchBudgetExceeded) as caught:
            await budgets.count_search("k", 2, now=NOW)
        assert await budgets.searches_today("k", now=NOW) == 2  # a refusal counts nothing
        day_ttl = await client.ttl(SEARCH_DAY_KEY)
        # Another key, and the same key's tokens, are counted apart.
        await budgets.count_search("other", 2, now=NOW)
        assert await budgets.searches_today("k", now=NOW) == 2
        assert (await budgets.usage("k", "local", None, None, now=NOW)).day == 0
    assert DAY_TTL_S - 10 <= day_ttl <= DAY_TTL_S
    refusal = caught.value
    assert (refusal.used, refusal.limit) == (2, 2)
    assert str(refusal) == (
        "the daily search budget of this key is used up: 2 of 2 searches "
        "(SEARCH_BUDGET_DAILY); it resets at 2001-11-26T00:00:00Z"
    )


@pytest.mark.parametrize(("enforce", "per_day"), [(False, 1), (True, None), (True, 0)])
async def test_unenforced_or_unlimited_searches_are_counted_and_never_refused(
    enforce: bool, per_day: int | None
) -> None:
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=enforce)
        for _ in range(3):
            await budgets.count_search("k", per_day, now=NOW)
        assert await budgets.searches_today("k", now=NOW) == 3


async def test_searches_are_counted_today_when_no_time_is_given() -> None:
    async with redis() as client:
        budgets = Budgets(lambda: client, enforce=True)
        await budgets.count_search("k", 5)
        assert await budgets.searches_today("k") == 1
        assert await budgets.searches_today("k", now=NOW) == 0
