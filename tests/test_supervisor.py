"""The restart policy, with trio's autojump clock so back-off costs no real time."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from appliance.supervisor import Service, ServiceFailed, Supervisor


class Flaky(Service):
    """Fails its first `failures` starts, then runs until cancelled."""

    critical = True

    def __init__(self, name: str, failures: int) -> None:
        self.name = name
        self.failures = failures
        self.starts: list[float] = []

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self.starts.append(trio.current_time())
        if len(self.starts) <= self.failures:
            raise RuntimeError(f"start {len(self.starts)} broke")
        task_status.started("up")
        await trio.sleep_forever()


class Dies(Service):
    """Starts fine, then dies after `after` seconds, every time."""

    def __init__(self, after: float) -> None:
        self.name = "dies"
        self.after = after
        self.runs = 0

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self.runs += 1
        task_status.started()
        await trio.sleep(self.after)
        raise OSError("child exited with code 1")


async def test_failed_starts_are_retried_with_exponential_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Flaky("flaky", failures=3)
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, restart_limit=5, restart_window=60)
        assert await supervisor.start(service) == "up"
        gaps = [b - a for a, b in zip(service.starts, service.starts[1:], strict=False)]
        assert gaps == pytest.approx([0.5, 1.0, 2.0])
        state = supervisor.snapshot()[0]
        assert state.state == "running"
        assert state.restarts == 3
        assert state.last_error == "RuntimeError: start 3 broke"
        nursery.cancel_scope.cancel()


async def test_too_many_failures_in_the_window_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(ExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(nursery, restart_limit=3, restart_window=60)
            await supervisor.start(Dies(after=1.0))
    failed = caught.value.exceptions[0]
    assert isinstance(failed, ServiceFailed)
    assert "service dies failed 4 times in 60 s" in str(failed)
    assert "OSError: child exited with code 1" in str(failed)


async def test_failures_spread_beyond_the_window_are_tolerated(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Dies(after=100.0)
    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery, restart_limit=2, restart_window=60)
        await supervisor.start(service)
        await trio.sleep(1000)
        assert service.runs >= 9
        assert supervisor.snapshot()[0].restarts == service.runs - 1
        nursery.cancel_scope.cancel()


async def test_stop_all_stops_in_reverse_order(autojump_clock: trio.testing.MockClock) -> None:
    stopped: list[str] = []

    class Recorder(Service):
        def __init__(self, name: str) -> None:
            self.name = name

        async def run(
            self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
        ) -> None:
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                stopped.append(self.name)

    async with trio.open_nursery() as nursery:
        supervisor = Supervisor(nursery)
        for name in ("redis", "store", "http"):
            await supervisor.start(Recorder(name))
        await supervisor.stop_all(timeout=5)
        assert stopped == ["http", "store", "redis"]
        assert {s.state for s in supervisor.snapshot()} == {"stopped"}
        assert supervisor.unhealthy_critical() == ["redis", "store", "http"]
