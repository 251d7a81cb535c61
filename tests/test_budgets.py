"""Token budgets in the real redis-server: atomic reservations across clients."""

from __future__ import annotations

import datetime

import coredis
import pytest
import trio

from appliance.auth.budgets import BudgetExceeded, Budgets
from appliance.store.server import EmbeddedRedis
from tests.harness import short_tempdir

NOW = datetime.datetime(2026, 11, 25, 23, 59, 30, tzinfo=datetime.UTC)


async def test_reservations_never_exceed_the_budget_even_from_many_clients() -> None:
    directory = short_tempdir()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = EmbeddedRedis(directory, directory / "run", "64mb")
            await nursery.start(server.run)
            clients = [coredis.Redis(unix_socket_path=str(server.socket_path)) for _ in range(4)]
            granted: list[int] = []
            refused: list[BudgetExceeded] = []

            async def spend(client: coredis.Redis[bytes]) -> None:
                async with client:
                    budgets = Budgets(lambda: client, enforce=True)
                    for _ in range(20):
                        try:
                            reservation = await budgets.reserve(
                                "k1", "local", 100, 10, 1000, 5000, now=NOW
                            )
                        except BudgetExceeded as exc:
                            refused.append(exc)
                            continue
                        granted.append(reservation.granted)
                        # Use 70 of what was reserved; the rest goes back.
                        await budgets.settle(reservation, min(70, reservation.granted))

            async with trio.open_nursery() as spenders:
                for client in clients:
                    spenders.start_soon(spend, client)
            reader: coredis.Redis[bytes] = coredis.Redis(unix_socket_path=str(server.socket_path))
            async with reader:
                budgets = Budgets(lambda: reader, enforce=True)
                usage = await budgets.usage("k1", "local", 1000, 5000, now=NOW)
            nursery.cancel_scope.cancel()
    assert usage.day <= 1000
    assert usage.day >= 1000 - 10  # used up to within less than one minimum reservation
    assert refused and refused[0].budget == "daily local"
    message = str(refused[0])
    assert "daily local budget" in message and "of 1000 tokens" in message
    assert "2026-11-26T00:00:00Z" in message  # when it resets


async def test_not_enforced_counts_but_never_refuses_and_month_limits_apply() -> None:
    directory = short_tempdir()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server = EmbeddedRedis(directory, directory / "run", "64mb")
            await nursery.start(server.run)
            client: coredis.Redis[bytes] = coredis.Redis(unix_socket_path=str(server.socket_path))
            async with client:
                free = Budgets(lambda: client, enforce=False)
                for _ in range(3):
                    await free.reserve("k2", "remote", 400, 1, 100, 100, now=NOW)
                assert (await free.usage("k2", "remote", 100, 100, now=NOW)).month == 1200
                strict = Budgets(lambda: client, enforce=True)
                with pytest.raises(BudgetExceeded, match="monthly local"):
                    await strict.reserve("k3", "local", 10, 5, None, 4, now=NOW)
            nursery.cancel_scope.cancel()
