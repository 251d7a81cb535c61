"""One resident model: its worker process, its generation slots and the requests on it.

The pool (appliance.llm.engine) makes one `ModelWorker` per resident model and runs it in
its nursery. The worker process is started, given the model (Load), and then serves up to
APPLIANCE_PARALLEL generations at once (continuous batching), shared fairly between API keys
(appliance.llm.slots). If the process dies, only this model's requests in flight get
`WorkerCrashed` (503); the process is started again with back-off and the model loaded
again. A model that kills the process while loading (a crash signal, or any death twice in a
row: a SIGKILL alone may be the operator or the OOM killer), or that llama.cpp refuses, is
marked failed in the registry and the worker gives up (`failed`): the pool drops it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import psutil
import trio

from appliance.children import (
    crashed_by_itself,
    describe_exit,
    forward_output,
    spawn,
    terminate,
)
from appliance.config import Settings
from appliance.llm.errors import (
    DeadlineExceeded,
    InferenceError,
    ModelFailed,
    WorkerCrashed,
)
from appliance.llm.handoff import Handing, Handoff
from appliance.llm.huge_pages import huge_pages_environment
from appliance.llm.memory import MemoryEstimate
from appliance.llm.protocol import (
    Attached,
    Cancel,
    Detached,
    Done,
    Embed,
    Embedded,
    Error,
    FromWorker,
    Generate,
    Load,
    Loaded,
    Token,
)
from appliance.llm.registry import ModelRegistry, RegistryError
from appliance.llm.slots import FairSlots, share_per_key
from appliance.llm.thread_binding import allowed_cores, binding_environment
from appliance.llm.worker_link import Pending, WorkerLink

LOGGER = logging.getLogger("appliance.llm")

STOP_GRACE: Final = 5.0
CANCEL_GRACE: Final = 5.0
# Deaths of any kind in a row while loading one model that mark it failed.
LOAD_DEATHS_TO_FAIL: Final = 2
FIRST_BACKOFF_SECONDS: Final = 0.5
MAX_BACKOFF_SECONDS: Final = 30.0
# Crashes further apart than this do not add to the back-off.
CRASH_WINDOW_SECONDS: Final = 60.0


# Worker error codes and their HTTP status: the client's to fix (4xx), or a busy KV cache
# that frees as other generations end (503, retry). Any other code is a 500.
_ERROR_STATUS: Final = {
    "context_length_exceeded": 400,
    "template_error": 422,
    "context_full": 503,
    "invalid_grammar": 400,
    "invalid_logit_bias": 400,
    "invalid_input": 400,
}

WorkerState = Literal["starting", "running", "backoff", "failed", "stopped"]


def worker_command() -> list[str]:
    """The same program, re-executed (inside a PyInstaller binary there is no -m)."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "worker"]
    return [sys.executable, "-m", "appliance", "worker"]


def worker_threads(settings: Settings) -> int:
    """llama.cpp's threads in a worker: APPLIANCE_THREADS, else every usable core."""
    return settings.threads or len(allowed_cores()) or 1


@dataclass
class GenerationStats:
    """Figures for the metrics endpoint, kept by the pool for all its models."""

    completed: int = 0
    failed: int = 0
    rejected: int = 0
    crashes: int = 0
    tokens: int = 0
    last_tokens_per_second: float = 0.0
    last_time_to_first_token: float = 0.0
    last_queue_wait: float = 0.0
    recent_ttft: list[float] = field(default_factory=list)

    def first_token(self, seconds: float) -> None:
        self.last_time_to_first_token = seconds
        self.recent_ttft = [*self.recent_ttft[-99:], seconds]

    def done(self, done: Done, first_token: float | None) -> None:
        self.completed += 1
        if first_token is not None and done.completion_tokens > 1:
            seconds = time.monotonic() - first_token
            if seconds > 0:
                self.last_tokens_per_second = (done.completion_tokens - 1) / seconds


@dataclass(frozen=True)
class LoadPlan:
    """What the pool decided to load: the checked file, its context and what it needs."""

    model: str
    path: Path
    n_ctx: int
    estimate: MemoryEstimate


class ModelWorker:
    """One model's worker process and the generations on it."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        plan: LoadPlan,
        stats: GenerationStats,
        *,
        keep_alive: float,
        changed: Callable[[], None],
        cores: tuple[int, ...] = (),
    ) -> None:
        self.settings = settings
        # The cores its llama.cpp threads are bound to (appliance.llm.thread_binding).
        self.cores = cores
        self.registry = registry
        self.plan = plan
        self.name = plan.model
        self.stats = stats
        self.state: WorkerState = "starting"
        self.since = time.time()
        self.restarts = 0
        self.last_error: str | None = None
        # Why it gave up (the model failed to load); the pool drops it.
        self.failed: InferenceError | None = None
        # Times the model was loaded into a fresh process (a crash or a recycle loads again).
        self.loads = 0
        self.n_ctx = 0
        # Requests that chose this model and have not ended; idle when 0.
        self.users = 0
        self.waiting = 0
        self.running = 0
        self.keep_alive = keep_alive
        self.last_used = trio.current_time()
        self.slots = FairSlots(
            settings.parallel, share_per_key(settings.parallel, settings.parallel_per_key)
        )
        self._changed = changed
        self._ready = trio.Event()
        self._link: WorkerLink | None = None
        self._process: trio.Process | None = None
        self._next_id = 1
        self._served = 0
        self._recycle = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._loading = False
        self._load_deaths = 0
        self._crashes: list[float] = []
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._log = logging.getLogger(f"appliance.worker.{self.name}")

    # -- what the pool reads -----------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.state == "running"

    @property
    def idle(self) -> bool:
        """Loaded and without requests: may be unloaded (keep-alive, or to make room)."""
        return self.users == 0 and self.state == "running" and self.failed is None

    @property
    def expires_at(self) -> float:
        """When an idle worker's keep-alive runs out (trio time; inf for ever)."""
        return self.last_used + self.keep_alive if not math.isinf(self.keep_alive) else math.inf

    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def rss(self) -> int:
        pid = self.pid()
        if pid is None:
            return 0
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return 0

    def needs(self) -> int:
        """Bytes it counts against APPLIANCE_MODEL_MEMORY: the estimate, or its real RSS if
        that is larger."""
        return max(self.plan.estimate.total, self.rss())

    # -- life ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Load the model and keep it served until stopped; returns when the worker gives
        up (`failed`) or is stopped. Run it in the pool's nursery."""
        with self._scope:
            try:
                await self._serve()
            except ModelFailed as exc:
                self.failed = exc
                self.state = "failed"
                self.last_error = str(exc)
            finally:
                if self.failed is None:
                    self.state = "stopped"
                self.since = time.time()
                self._ready.set()  # wakes the requests waiting for it: they see why
                self._done.set()
                self._changed()

    async def stop(self) -> None:
        """Stop the process (requests in flight get WorkerCrashed) and wait for it."""
        self._scope.cancel()
        await self._done.wait()

    async def wait_ready(self) -> None:
        """Until the model is loaded; raises why it will not be."""
        while True:
            await self._ready.wait()
            if self.failed is not None:
                raise self.failed
            if self.state == "stopped":
                raise WorkerCrashed(f"model {self.name} was unloaded")
            if self._ready.is_set():
                return

    async def _serve(self) -> None:
        while True:
            try:
                # Returns only when the worker is recycled.
                await self._run_once()
                continue
            except WorkerCrashed as exc:
                error = str(exc)
            self.restarts += 1
            self.last_error = error
            self.state = "backoff"
            self.since = time.time()
            self._changed()
            now = trio.current_time()
            self._crashes = [t for t in self._crashes if now - t < CRASH_WINDOW_SECONDS] + [now]
            delay = min(FIRST_BACKOFF_SECONDS * 2 ** (len(self._crashes) - 1), MAX_BACKOFF_SECONDS)
            LOGGER.warning(
                "the worker of model %s stopped (%s); restarting in %.1f s", self.name, error, delay
            )
            await trio.sleep(delay)

    async def _run_once(self) -> None:
        self._recycle = trio.Event()
        self.state = "starting"
        self.since = time.time()
        parent, child = socket.socketpair()
        try:
            process = await spawn(
                [*worker_command(), "--fd", str(child.fileno())],
                pass_fds=[child.fileno()],
                env={
                    "APPLIANCE_LOG_LEVEL": self.settings.log_level,
                    **binding_environment(self.cores, os.environ, allowed_cores()),
                    **huge_pages_environment(os.environ),
                },
            )
        finally:
            child.close()
        self._process = process
        self._served = 0
        link = WorkerLink(parent, lambda: _kill(process))
        self._link = link
        exit_: list[tuple[int, bool]] = []
        failure: ModelFailed | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_exit, process, link, nursery.cancel_scope, exit_)
                nursery.start_soon(forward_output, process, self._log)
                # A crash fails the pending requests (so a load in progress raises
                # WorkerCrashed here) and cancels this nursery; it is reported below.
                with contextlib.suppress(WorkerCrashed):
                    try:
                        await self._load(link)
                    except ModelFailed as exc:
                        failure = exc
                    else:
                        self.state = "running"
                        self.since = time.time()
                        self.last_used = trio.current_time()
                        self._ready.set()
                        self._changed()
                        await self._recycle.wait()
                        LOGGER.info(
                            "recycling the worker of model %s after %d requests",
                            self.name,
                            self._served,
                        )
                nursery.cancel_scope.cancel()
        finally:
            self._link = None
            if self._ready.is_set():
                self._ready = trio.Event()
            self._loading = False
            await link.aclose()
            await terminate(process, STOP_GRACE)
            link.fail(WorkerCrashed("the worker stopped"))
        if failure is not None:
            raise failure
        if exit_:
            code, loading = exit_[0]
            self.stats.crashes += 1
            if loading:
                await self._died_loading(code)
            raise WorkerCrashed(describe_exit(code))

    async def _watch_exit(
        self,
        process: trio.Process,
        link: WorkerLink,
        scope: trio.CancelScope,
        exit_: list[tuple[int, bool]],
    ) -> None:
        code = await process.wait()
        exit_.append((code, self._loading))
        LOGGER.error("the worker of model %s %s", self.name, describe_exit(code))
        link.fail(WorkerCrashed(describe_exit(code)))
        scope.cancel()

    async def _load(self, link: WorkerLink) -> None:
        plan = self.plan
        request_id, pending = self._open(link)
        self._loading = True
        try:
            await link.send(
                Load(
                    id=request_id,
                    model=self.name,
                    path=str(plan.path),
                    n_ctx=plan.n_ctx,
                    n_threads=worker_threads(self.settings),
                    n_gpu_layers=self.settings.gpu_layers,
                    parallel=self.settings.parallel,
                )
            )
            reply = await link.receive(request_id, pending)
        finally:
            link.forget(request_id)
            self._loading = False
        if isinstance(reply, Error):
            await self._mark_failed(reply.message)
            raise ModelFailed(
                503, "model_unavailable", f"model {self.name} failed to load: {reply.message}"
            )
        assert isinstance(reply, Loaded)
        self._load_deaths = 0
        self.loads += 1
        self.n_ctx = reply.n_ctx
        LOGGER.info(
            "model %s loaded in %.2f s (context %d, estimated %s)",
            self.name,
            reply.load_seconds,
            reply.n_ctx,
            plan.estimate.describe(),
        )

    async def _died_loading(self, code: int) -> None:
        self._load_deaths += 1
        deaths = self._load_deaths
        if not crashed_by_itself(code) and deaths < LOAD_DEATHS_TO_FAIL:
            LOGGER.warning(
                "the worker died while loading %s (%s); loading it again",
                self.name,
                describe_exit(code),
            )
            return
        times = "" if deaths == 1 else f", {deaths} times in a row"
        reason = f"the worker died while loading it ({describe_exit(code)}{times})"
        await self._mark_failed(reason)
        raise ModelFailed(503, "model_unavailable", f"model {self.name} failed to load: {reason}")

    async def _mark_failed(self, reason: str) -> None:
        LOGGER.error("model %s marked failed: %s", self.name, reason)
        try:
            await trio.to_thread.run_sync(self.registry.mark_failed, self.name, reason)
        except RegistryError as exc:
            LOGGER.warning("could not mark model %s failed: %s", self.name, exc)

    # -- requests --------------------------------------------------------------------

    def _open(self, link: WorkerLink | None) -> tuple[int, Pending]:
        """A new request id on `link` (the current process's), waiting for its frames."""
        if link is None:
            raise WorkerCrashed("the worker is restarting")
        request_id = self._next_id
        self._next_id += 1
        return request_id, link.open(request_id)

    async def generate(
        self,
        request: Generate,
        *,
        deadline: float,
        owner: str,
        queued_at: float,
        handoff: Handoff | None = None,
    ) -> AsyncGenerator[Token | Detached | Done, None]:
        """Wait for a slot and the model, then stream Token events and one final Done.

        `request` is sent as it is, with its id replaced. No cancel scope stays open across
        a yield, so the caller may consume this generator from anywhere in its task. Once
        `handoff` is ready (appliance.llm.handoff), the worker is asked to write the token
        events itself: then no Token comes, and a Detached when it gives the stream back.
        Every Token must be written before the next event is asked for.
        """
        await self._admit(deadline, owner)
        link: WorkerLink | None = None
        request_id = 0
        sent = finished = False
        handing = Handing(handoff)
        self._start_running()
        try:
            self.stats.last_queue_wait = time.monotonic() - queued_at
            link = self._link
            request_id, pending = self._open(link)
            assert link is not None  # _open raised otherwise
            await link.send(msgspec.structs.replace(request, id=request_id))
            sent = True
            first_token: float | None = None
            while True:
                if handing.due:
                    await handing.attach(link, request_id)
                event: FromWorker | None = None
                with trio.move_on_at(deadline):
                    event = await link.receive(request_id, pending)
                if event is None:
                    raise DeadlineExceeded("the generation ran past the request's deadline")
                if isinstance(event, Error):
                    finished = True
                    self.stats.failed += 1
                    raise ModelFailed(_ERROR_STATUS.get(event.code, 500), event.code, event.message)
                if isinstance(event, Token):
                    self.stats.tokens += 1
                    if first_token is None:
                        first_token = time.monotonic()
                        # As the client sees it: queueing and any model load included.
                        self.stats.first_token(first_token - queued_at)
                    if handing.holds(event):
                        continue
                    yield event
                elif isinstance(event, Attached):
                    self.stats.tokens -= handing.attached()  # the worker counts them
                elif isinstance(event, Detached):
                    self.stats.tokens += handing.detached(event)
                    LOGGER.info(
                        "the worker gave the stream back (its client fell behind) after "
                        "writing %d token events; %d bytes are left to write",
                        event.written_events,
                        len(event.pending),
                    )
                    yield event
                elif isinstance(event, Done):
                    finished = True
                    self.stats.tokens += handing.counted(event.written_events)
                    self.stats.done(event, first_token)
                    for held in handing.never_attached():
                        yield held
                    yield event
                    return
        finally:
            if link is not None:
                # A Generate never written needs no Cancel (and no Done will come).
                if sent and not finished:
                    last = await _cancel(link, request_id, pending)
                    if isinstance(last, Done):
                        self.stats.tokens += handing.counted(last.written_events)
                link.forget(request_id)
            self._finish_running(owner)

    async def embed(self, request: Embed, *, deadline: float, owner: str) -> list[Embedded]:
        """The vectors of the request's inputs (in parts, in order), reached like `generate`:
        a slot of the owner's share, then this model's worker. Raises InferenceError."""
        await self._admit(deadline, owner)
        link: WorkerLink | None = None
        request_id = 0
        sent = finished = False
        self._start_running()
        parts: list[Embedded] = []
        try:
            link = self._link
            request_id, pending = self._open(link)
            assert link is not None  # _open raised otherwise
            await link.send(msgspec.structs.replace(request, id=request_id))
            sent = True
            while True:
                event: FromWorker | None = None
                with trio.move_on_at(deadline):
                    event = await link.receive(request_id, pending)
                if event is None:
                    raise DeadlineExceeded("the embeddings ran past the request's deadline")
                if isinstance(event, Error):
                    finished = True
                    raise ModelFailed(_ERROR_STATUS.get(event.code, 500), event.code, event.message)
                if isinstance(event, Embedded):
                    parts.append(event)
                    if event.last:
                        finished = True
                        return parts
                elif isinstance(event, Done):  # cancelled
                    finished = True
                    raise WorkerCrashed("the embedding request was cancelled")
        finally:
            if link is not None:
                if sent and not finished:
                    await _cancel(link, request_id, pending)
                link.forget(request_id)
            self._finish_running(owner)

    async def _admit(self, deadline: float, owner: str) -> None:
        """Wait for a slot (the owner's share of APPLIANCE_PARALLEL) and the loaded model,
        within `deadline`."""
        self.waiting += 1
        stage = "waited in the queue"
        acquired = False
        try:
            with trio.move_on_at(deadline) as waiting:
                await self.slots.acquire(owner)
                acquired = True
                if not self.ready:
                    stage = "waited for its model to load"
                await self.wait_ready()
                # A recycle in progress (or due: this worker took all the requests it may):
                # start on the fresh worker.
                while self._took_enough():
                    self._close_gate()
                    await self.wait_ready()
                self._served += 1
        except BaseException:
            if acquired:
                self.slots.release(owner)
            raise
        finally:
            self.waiting -= 1
        if waiting.cancelled_caught:
            if acquired:
                self.slots.release(owner)
            raise DeadlineExceeded(f"the request {stage} past its deadline")

    def _start_running(self) -> None:
        self.running += 1
        if self._idle.is_set():
            # Replaced only when set: a recycle may be waiting on the current one.
            self._idle = trio.Event()

    def _finish_running(self, owner: str) -> None:
        self.running -= 1
        if self._ready.is_set() and self._grew_too_big():
            self._close_gate()
        if self.running == 0:
            self._idle.set()
            if not self._ready.is_set():
                self._recycle.set()
        self.slots.release(owner)

    def _close_gate(self) -> None:
        """New generations wait for a fresh process; this one goes once the running end."""
        if self._ready.is_set():
            self._ready = trio.Event()
        if self.running == 0:
            self._recycle.set()

    def _took_enough(self) -> bool:
        """The guide's --max-requests against leaks: this process took its last request."""
        limit = self.settings.worker_max_requests
        if limit and self._served >= limit:
            LOGGER.info(
                "the worker of %s served %d requests (APPLIANCE_WORKER_MAX_REQUESTS)",
                self.name,
                self._served,
            )
            return True
        return False

    def _grew_too_big(self) -> bool:
        """The worker's RSS passed APPLIANCE_WORKER_MAX_RSS_MB."""
        rss_limit = self.settings.worker_max_rss_mb * 1024 * 1024
        if not rss_limit:
            return False
        rss = self.rss()
        if rss > rss_limit:
            LOGGER.info(
                "the worker of %s has an RSS of %d MB (APPLIANCE_WORKER_MAX_RSS_MB)",
                self.name,
                rss // 2**20,
            )
            return True
        return False

    def describe(self) -> dict[str, Any]:
        """For logs and errors: the worker's state in a few fields."""
        return {"model": self.name, "state": self.state, "pid": self.pid()}


async def _cancel(link: WorkerLink, request_id: int, pending: Pending) -> FromWorker | None:
    """The caller went away (client disconnect, deadline): stop the worker within a token
    and wait for it, so that the request's slot is free at once. Its last frame (None if
    none came in time)."""
    with trio.move_on_after(CANCEL_GRACE) as scope:
        scope.shield = True
        try:
            await link.send(Cancel(request_id))
            while True:
                frame = await link.receive(request_id, pending)
                if isinstance(frame, Done | Error):
                    return frame
        except InferenceError:
            pass
    return None


def _kill(process: trio.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGKILL)
