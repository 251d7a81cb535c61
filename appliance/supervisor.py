"""The supervisor: starts services in one nursery, restarts them, stops them in order.

A service is an object with `name`, `critical` and `async def run(*, task_status)` that
calls `task_status.started(value)` once it is really ready and runs until it fails or is
cancelled. A failed service is restarted with exponential back-off; more failures than
the limit inside the window raise `ServiceFailed`, which ends the daemon with a non-zero
exit so that systemd restarts the whole unit.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Final, Literal

import msgspec
import trio

LOGGER = logging.getLogger("appliance.supervisor")

MAX_BACKOFF_SECONDS: Final = 30.0
FIRST_BACKOFF_SECONDS: Final = 0.5

State = Literal["starting", "running", "backoff", "stopping", "stopped", "failed"]


class ServiceFailed(Exception):
    """A service failed more often than the restart policy allows."""


class Service:
    """Base class of supervised services. Subclasses override `run` and maybe the rest."""

    name: str = "service"
    critical: bool = True
    # True when `drain` makes `run` return by itself (finishing work in flight);
    # otherwise stopping the service cancels it at once.
    drains: bool = False
    # False for a service whose failures the daemon survives (the inference worker: a
    # model that keeps crashing must not take the API down); it is restarted forever.
    give_up: bool = True

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    async def drain(self) -> None:
        """Ask the service to finish its work and return from `run`; default: cancel it."""

    def healthy(self) -> bool:
        """Whether the service currently answers; used by readiness and the watchdog."""
        return True

    def pid(self) -> int | None:
        """The pid of the child process behind the service, if any."""
        return None

    def parts(self) -> list[ServiceState]:
        """Processes the service runs and restarts itself (one worker per resident model),
        listed after it."""
        return []


class ServiceState(msgspec.Struct):
    """What `/api/v1/health/services` shows for one service."""

    name: str
    critical: bool
    state: State
    healthy: bool
    pid: int | None
    restarts: int
    last_error: str | None
    since: float


class _Record:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.state: State = "starting"
        self.restarts = 0
        self.last_error: str | None = None
        self.since = time.time()
        self.failures: deque[float] = deque()
        self.scope = trio.CancelScope()
        self.stopping = False
        self.done = trio.Event()

    def enter(self, state: State) -> None:
        self.state = state
        self.since = time.time()


def describe_error(exc: BaseException) -> str:
    """One line for an operator; the exception's own text is expected to be safe to show."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Supervisor:
    """Owns the services of one daemon; state belongs here, not in module globals."""

    def __init__(
        self, nursery: trio.Nursery, *, restart_limit: int = 5, restart_window: float = 60.0
    ) -> None:
        self._nursery = nursery
        self._limit = restart_limit
        self._window = restart_window
        self._records: dict[str, _Record] = {}
        self.changed = trio.Event()
        # Why services are stopped on purpose (a restore); the watchdog tolerates it.
        self.maintenance: str | None = None
        # The context variables services start with: the daemon's, from before any request.
        self._context = contextvars.copy_context()

    async def start(self, service: Service) -> Any:
        """Start `service` and wait until it is ready; later failures restart it."""
        if service.name in self._records:
            raise ValueError(f"service {service.name} is already supervised")
        record = _Record(service)
        self._records[service.name] = record
        return await self._start_supervising(record)

    async def _start_supervising(self, record: _Record) -> Any:
        """`nursery.start(self._supervise, record)`, from the supervisor's own context.

        A trio task starts with a copy of its starter's context variables: a service
        restarted while serving a request (a restore through the API) would carry that
        request's id in every line it logs afterwards. So the supervising task is started by
        a launcher task spawned in a copy of the daemon's context; if the caller is cancelled
        before the service is ready, the start is cancelled, as with `nursery.start`.
        """
        values: list[Any] = []
        errors: list[Exception] = []
        done = trio.Event()
        scope = trio.CancelScope()

        async def launch() -> None:
            with scope:
                try:
                    values.append(await self._nursery.start(self._supervise, record))
                except Exception as exc:
                    errors.append(exc)
                finally:
                    done.set()

        self._context.copy().run(self._nursery.start_soon, launch)
        try:
            await done.wait()
        except BaseException:
            scope.cancel()
            raise
        if errors:
            raise errors[0]
        if not values:
            raise ServiceFailed(f"service {record.service.name} did not start: it was cancelled")
        return values[0]

    def _notify_change(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _supervise(
        self, record: _Record, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        service = record.service
        reported = False
        with record.scope:
            try:
                while True:
                    record.enter("starting")
                    self._notify_change()
                    error: str
                    try:
                        async with trio.open_nursery() as nursery:
                            value = await nursery.start(service.run)
                            record.enter("running")
                            self._notify_change()
                            LOGGER.info("service %s is running", service.name)
                            if not reported:
                                reported = True
                                task_status.started(value)
                        error = "exited without an error"
                    except Exception as exc:
                        error = describe_error(exc)
                    if record.stopping:
                        return
                    await self._after_failure(record, error)
            finally:
                record.enter("stopped" if record.stopping else "failed")
                record.done.set()
                self._notify_change()

    async def _after_failure(self, record: _Record, error: str) -> None:
        service = record.service
        now = trio.current_time()
        record.failures.append(now)
        while record.failures and now - record.failures[0] > self._window:
            record.failures.popleft()
        record.last_error = error
        if service.give_up and len(record.failures) > self._limit:
            LOGGER.error(
                "service %s failed %d times in %.0f s (last: %s); giving up",
                service.name,
                len(record.failures),
                self._window,
                error,
            )
            raise ServiceFailed(
                f"service {service.name} failed {len(record.failures)} times in "
                f"{self._window:.0f} s; last error: {error}"
            )
        delay = min(FIRST_BACKOFF_SECONDS * 2 ** (len(record.failures) - 1), MAX_BACKOFF_SECONDS)
        LOGGER.warning("service %s stopped (%s); restarting in %.1f s", service.name, error, delay)
        record.restarts += 1
        record.enter("backoff")
        self._notify_change()
        await trio.sleep(delay)

    async def stop(self, name: str, timeout: float) -> None:
        """Drain one service (bounded by `timeout`), then cancel what is left of it."""
        record = self._records[name]
        if record.done.is_set():
            return
        record.stopping = True
        record.enter("stopping")
        self._notify_change()
        started = trio.current_time()
        if record.service.drains:
            with trio.move_on_after(timeout):
                await record.service.drain()
                await record.done.wait()
        record.scope.cancel()
        await record.done.wait()
        LOGGER.info("service %s stopped in %.2f s", name, trio.current_time() - started)

    async def restart(self, name: str) -> Any:
        """Start a service again after `stop`, keeping its place in the stop order."""
        old = self._records[name]
        if not old.done.is_set():
            raise ValueError(f"service {name} is still running")
        record = _Record(old.service)
        record.restarts = old.restarts
        self._records[name] = record
        return await self._start_supervising(record)

    @contextlib.contextmanager
    def planned_outage(self, reason: str) -> Iterator[None]:
        """Services stopped inside this block are down on purpose: readiness says 503, but
        the watchdog keeps pinging, so systemd does not kill a restore half-way."""
        self.maintenance = reason
        self._notify_change()
        try:
            yield
        finally:
            self.maintenance = None
            self._notify_change()

    def watchdog_problems(self) -> list[str]:
        """What should stop the watchdog pings: unhealthy critical services, unless planned."""
        return [] if self.maintenance is not None else self.unhealthy_critical()

    async def stop_all(self, timeout: float) -> None:
        """Stop every service, the last started first (HTTP drains before the store)."""
        for name in reversed(list(self._records)):
            await self.stop(name, timeout)

    def snapshot(self) -> list[ServiceState]:
        states = []
        for name, record in self._records.items():
            running = record.state == "running"
            states.append(
                ServiceState(
                    name=name,
                    critical=record.service.critical,
                    state=record.state,
                    healthy=running and record.service.healthy(),
                    pid=record.service.pid() if running else None,
                    restarts=record.restarts,
                    last_error=record.last_error,
                    since=record.since,
                )
            )
            if running:
                states.extend(record.service.parts())
        return states

    def unhealthy_critical(self) -> list[str]:
        """Names of critical services that are not running and answering."""
        return [s.name for s in self.snapshot() if s.critical and not s.healthy]

    def service(self, name: str) -> Service:
        return self._records[name].service
