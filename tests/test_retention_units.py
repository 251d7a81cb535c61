"""The retention sweep and its turns among appliances, in the real redis-server: what a sweep
deletes at its exact cutoff and what it reports, and the lock, lease and period that decide
whose turn it is.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import coredis
import pytest
import trio

from appliance.privacy import retention
from appliance.privacy.retention import (
    DONE_KEY,
    LOCK_KEY,
    SWEEPS_KEY,
    RetentionService,
    SweepTurns,
)
from appliance.store.client import Store
from appliance.store.conversations import INDEX_KEY, Conversations
from appliance.store.sealing import PlainCodec
from appliance.store.server import EmbeddedRedis
from tests.harness import short_tempdir

DAY = 86_400
NOW = 1_700_000_000.0


@dataclass
class Setup:
    conversations: Conversations
    client: coredis.Redis[bytes]
    now: list[float]

    async def write(self, conversation_id: str) -> None:
        await self.conversations.record_exchange(
            conversation_id,
            owner="alice",
            model="tiny",
            question="q",
            answer="a",
            prompt_tokens=1,
            completion_tokens=1,
        )


@asynccontextmanager
async def stored() -> AsyncIterator[Setup]:
    directory = short_tempdir()
    now = [NOW]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            redis = EmbeddedRedis(directory, directory / "run", "64mb")
            await nursery.start(redis.run)
            store = Store(f"unix://{redis.socket_path}")
            await nursery.start(store.run)
            conversations = Conversations(
                store, PlainCodec(), retention_seconds=7 * DAY, clock=lambda: now[0]
            )
            client = store.client
            assert isinstance(client, coredis.Redis)
            yield Setup(conversations, client, now)
            nursery.cancel_scope.cancel()


async def test_a_sweep_deletes_what_is_idle_longer_than_the_retention_days() -> None:
    async with stored() as s:
        await s.write("a" * 32)  # will be 7 days and 1 second idle
        s.now[0] += 1
        await s.write("b" * 32)  # exactly 7 days idle: kept
        s.now[0] += 7 * DAY
        sweeper = RetentionService(s.conversations, 7, 3600, clock=lambda: s.now[0])
        assert (sweeper.sweeps, sweeper.last_sweep, sweeper.total_removed) == (0, None, 0)
        assert sweeper.last_removed == 0
        sweeper.last_error = "RedisError"
        assert await sweeper.sweep() == 1
        assert list(await s.client.zrange(INDEX_KEY, 0, -1)) == [b"b" * 32]
        assert (sweeper.sweeps, sweeper.last_sweep) == (1, NOW + 1 + 7 * DAY)
        assert (sweeper.last_removed, sweeper.total_removed, sweeper.last_error) == (1, 1, None)
        s.now[0] += 1
        assert await sweeper.sweep() == 1
        assert await sweeper.sweep() == 0
        assert (sweeper.sweeps, sweeper.last_removed, sweeper.total_removed) == (3, 0, 2)


async def test_one_retention_day_is_86400_seconds() -> None:
    async with stored() as s:
        await s.write("a" * 32)
        s.now[0] += DAY
        one_day = RetentionService(s.conversations, 1, 3600, clock=lambda: s.now[0])
        assert await one_day.sweep() == 0
        s.now[0] += 1
        assert await one_day.sweep() == 1


async def test_turns_lock_lease_and_period() -> None:
    async with stored() as s:
        turns = SweepTurns(lambda: s.client, 120.0)
        other = SweepTurns(lambda: s.client, 120.0)
        state, token, wait = await turns.begin()
        assert (state, wait) == ("mine", 0.0) and token is not None and len(token) == 32
        assert 59_000 < await s.client.pttl(LOCK_KEY) <= 60_000  # a 60-second lease
        busy = await other.begin()
        assert busy[:2] == ("busy", None) and 59.0 < busy[2] <= 60.0
        await s.client.pexpire(LOCK_KEY, 1_000_000_000)
        assert 999_990.0 < (await other.begin())[2] <= 1_000_000.0  # milliseconds to seconds
        assert not await other.renew("not-the-token")
        await s.client.pexpire(LOCK_KEY, 5_000)
        assert await turns.renew(token)
        assert 59_000 < await s.client.pttl(LOCK_KEY) <= 60_000
        await other.release("not-the-token")
        assert await s.client.get(LOCK_KEY) == token.encode()
        assert await turns.finish(token)
        assert await s.client.exists([LOCK_KEY]) == 0
        assert 119_000 < await s.client.pttl(DONE_KEY) <= 120_000  # one period
        assert await s.client.get(SWEEPS_KEY) == b"1"
        done = await other.begin()
        assert done[:2] == ("done", None) and 119.0 < done[2] <= 120.0
        assert not await turns.finish(token)  # the lock is gone: nothing is marked
        assert await s.client.get(SWEEPS_KEY) == b"1"


async def test_a_released_lock_is_free_for_the_next_appliance() -> None:
    async with stored() as s:
        turns = SweepTurns(lambda: s.client, 120.0)
        _, token, _ = await turns.begin()
        assert token is not None
        await turns.release(token)
        assert await s.client.exists([LOCK_KEY]) == 0
        assert (await turns.begin())[0] == "mine"


async def test_a_tiny_period_still_marks_the_sweep_for_a_millisecond() -> None:
    async with stored() as s:
        turns = SweepTurns(lambda: s.client, 0.0001)
        _, token, _ = await turns.begin()
        assert token is not None
        assert await turns.finish(token)
        assert await s.client.get(SWEEPS_KEY) == b"1"


async def test_take_turn_sweeps_once_per_period_among_appliances() -> None:
    async with stored() as s:
        await s.write("a" * 32)
        s.now[0] += 8 * DAY
        first = RetentionService(s.conversations, 7, 50.0, clock=lambda: s.now[0])
        second = RetentionService(s.conversations, 7, 50.0, clock=lambda: s.now[0])
        assert await first.take_turn() == 50.0
        assert first.sweeps == 1 and first.total_removed == 1
        # The period is taken: the other waits for what is left of it, plus a jitter of at
        # most a tenth of the period (and at most 0.1 s).
        waits = [await second.take_turn() for _ in range(20)]
        assert all(49.0 < wait <= 50.1 for wait in waits)
        assert second.sweeps == 0
        await s.client.pexpire(DONE_KEY, 2_000)
        short = await second.take_turn()
        assert 1.0 < short <= 2.1
        await s.client.delete([DONE_KEY])
        assert await second.take_turn() == 50.0
        assert second.sweeps == 1
        assert await s.client.get(SWEEPS_KEY) == b"2"


async def test_a_short_interval_caps_the_wait_and_the_jitter() -> None:
    async with stored() as s:
        first = RetentionService(s.conversations, 7, 0.5, clock=lambda: s.now[0])
        second = RetentionService(s.conversations, 7, 0.5, clock=lambda: s.now[0])
        await s.client.set(DONE_KEY, "x", px=60_000)
        waits = [await second.take_turn() for _ in range(200)]
        # The jitter is at most a tenth of the interval, and it does reach near that.
        assert all(0.5 <= wait <= 0.55 for wait in waits)
        assert max(waits) > 0.546
        assert first.sweeps == 0


def test_a_failing_sweep_never_makes_the_appliance_unhealthy() -> None:
    assert RetentionService.critical is False


async def test_a_failed_sweep_releases_the_lock_and_raises() -> None:
    async with stored() as s:
        await s.write("a" * 32)
        await s.client.hset("conv:{" + "a" * 32 + "}:meta", {"updated": "not a time"})
        s.now[0] += 8 * DAY
        sweeper = RetentionService(s.conversations, 7, 50.0, clock=lambda: s.now[0])
        with pytest.raises(ExceptionGroup) as caught:
            await sweeper.take_turn()
        assert caught.group_contains(ValueError, match="could not convert")
        assert await s.client.exists([LOCK_KEY, DONE_KEY]) == 0
        assert sweeper.sweeps == 0


async def test_a_sweep_cancelled_half_way_releases_the_lock() -> None:
    async with stored() as s:
        for n in range(300):
            await s.write(f"{n:032x}")
        s.now[0] += 8 * DAY
        sweeper = RetentionService(s.conversations, 7, 50.0, clock=lambda: s.now[0])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sweeper.take_turn)
            while not await s.client.exists([LOCK_KEY]):  # noqa: ASYNC110 (state in Redis)
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
        # The release ran, shielded, although the sweep was cancelled.
        assert await s.client.exists([LOCK_KEY]) == 0


async def test_a_finished_sweep_logs_no_lost_lock(caplog: pytest.LogCaptureFixture) -> None:
    async with stored() as s:
        sweeper = RetentionService(s.conversations, 7, 50.0, clock=lambda: s.now[0])
        with caplog.at_level(logging.WARNING, logger="appliance.privacy"):
            assert await sweeper.take_turn() == 50.0
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "appliance.privacy" and r.levelno >= logging.WARNING
    ]
    assert warnings == []


async def test_the_lock_is_renewed_while_sweeping_and_a_lost_lock_stops_the_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(retention, "LOCK_LEASE_SECONDS", 0.9)  # renewed every 0.3 s
    async with stored() as s:
        sweeper = RetentionService(s.conversations, 7, 50.0, clock=lambda: s.now[0])
        state, token, _ = await sweeper.turns.begin()
        assert state == "mine" and token is not None
        held_past_the_lease = False
        left: list[int] = []
        with trio.move_on_after(10), trio.CancelScope() as sweeping:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sweeper._keep_lock, token, sweeping)
                for _ in range(30):  # 1.5 s, longer than the lease
                    await trio.sleep(0.05)
                    left.append(await s.client.pttl(LOCK_KEY))
                held_past_the_lease = await s.client.get(LOCK_KEY) == token.encode()
                await s.client.delete([LOCK_KEY])  # expired, or taken by another appliance
                await trio.sleep_forever()
        assert held_past_the_lease
        assert min(left) > 0 and min(left) < 800  # renewed now and then, not all the time
        assert sweeping.cancelled_caught  # the sweep was stopped


async def test_the_service_sweeps_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    async with stored() as s:
        sweeper = RetentionService(s.conversations, 7, 0.3, clock=lambda: s.now[0])
        before = await s.client.info("commandstats")
        async with trio.open_nursery() as nursery:
            await nursery.start(sweeper.run)
            with trio.fail_after(20):
                while sweeper.sweeps < 3:  # noqa: ASYNC110 (polls the service's counter)
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        after = await s.client.info("commandstats")
    calls = after["cmdstat_eval"]["calls"] - before.get("cmdstat_eval", {"calls": 0})["calls"]
    # A few turns (begin, finish) per sweep: the service waits between them, it never spins.
    assert calls < 40
