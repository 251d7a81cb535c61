"""The daily search budget in a real redis-server: never more searches than the budget,
even from several clients at once; counted only when budgets are not enforced."""

from __future__ import annotations

import datetime

import coredis
import pytest
import trio

from appliance.auth.budgets import Budgets, SearchBudgetExceeded
from appliance.store.server import EmbeddedRedis
from tests.harness import short_tempdir

NOW = datetime.datetime(2026, 11, 25, 23, 59, 30, tzinfo=datetime.UTC)


async def test_search_budget_is_exact_under_concurrency_and_only_counted_when_not_enforced() -> (
    None
):
    directory = short_tempdir()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = EmbeddedRedis(directory, directory / "run", "64mb")
            await nursery.start(server.run)
            clients = [coredis.Redis(unix_socket_path=str(server.socket_path)) for _ in range(4)]
            counted: list[int] = []
            refused: list[SearchBudgetExceeded] = []

            async def search(client: coredis.Redis[bytes]) -> None:
                async with client:
                    budgets = Budgets(lambda: client, enforce=True)
                    for _ in range(5):
                        try:
                            await budgets.count_search("k1", 7, now=NOW)
                        except SearchBudgetExceeded as exc:
                            refused.append(exc)
                        else:
                            counted.append(1)

            async with trio.open_nursery() as searchers:
                for client in clients:
                    searchers.start_soon(search, client)
            reader: coredis.Redis[bytes] = coredis.Redis(unix_socket_path=str(server.socket_path))
            async with reader:
                budgets = Budgets(lambda: reader, enforce=True)
                assert await budgets.searches_today("k1", now=NOW) == 7
                # Token budgets are other counters.
                assert (await budgets.usage("k1", "local", None, None, now=NOW)).day == 0
                free = Budgets(lambda: reader, enforce=False)
                for _ in range(3):
                    await free.count_search("k2", 1, now=NOW)
                assert await free.searches_today("k2", now=NOW) == 3
                # No limit at all (SEARCH_BUDGET_DAILY=0 gives None).
                for _ in range(3):
                    await budgets.count_search("k3", None, now=NOW)
                with pytest.raises(SearchBudgetExceeded):
                    await budgets.count_search("k2", 3, now=NOW)
            nursery.cancel_scope.cancel()
    assert len(counted) == 7 and len(refused) == 13
    message = str(refused[0])
    assert message == (
        "the daily search budget of this key is used up: 7 of 7 searches "
        "(SEARCH_BUDGET_DAILY); it resets at 2026-11-26T00:00:00Z"
    )
