"""The inference service: supervises the worker process and schedules generations on it.

Up to APPLIANCE_PARALLEL generations run at once in the worker (continuous batching),
shared fairly between API keys (appliance.llm.slots); more callers wait in a bounded queue
(beyond it they get `QueueFull`, which the API turns into 429 with Retry-After). A change
of model waits until the running generations end; so does recycling the worker. If the
worker dies, every request in flight gets `WorkerCrashed` (503), the worker is started
again with back-off, and the model it had loaded is loaded again. A model that crashes the
worker while loading (a crash signal, or any death twice in a row: a SIGKILL alone may be
the operator or the OOM killer) is marked failed in the registry and is not loaded again
until it is verified.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Final

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
    QueueFull,
    WorkerCrashed,
)
from appliance.llm.protocol import (
    Cancel,
    ChatMessage,
    Done,
    Embed,
    Embedded,
    Error,
    FromWorker,
    Generate,
    Load,
    Loaded,
    SamplingOptions,
    Token,
)
from appliance.llm.registry import ModelRegistry, RegistryError
from appliance.llm.slots import FairSlots, share_per_key
from appliance.llm.worker_link import Pending, WorkerLink
from appliance.supervisor import Service

LOGGER = logging.getLogger("appliance.llm")

STOP_GRACE: Final = 5.0
CANCEL_GRACE: Final = 5.0
RETRY_AFTER_SECONDS: Final = 2
PRELOAD_TRIES: Final = 3
# Deaths of any kind in a row while loading one model that mark it failed.
LOAD_DEATHS_TO_FAIL: Final = 2


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


def worker_command() -> list[str]:
    """The same program, re-executed (inside a PyInstaller binary there is no -m)."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "worker"]
    return [sys.executable, "-m", "appliance", "worker"]


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) or 1


@dataclass
class GenerationStats:
    """Figures for the metrics endpoint, kept by the service."""

    completed: int = 0
    failed: int = 0
    rejected: int = 0
    crashes: int = 0
    tokens: int = 0
    last_tokens_per_second: float = 0.0
    last_time_to_first_token: float = 0.0
    last_queue_wait: float = 0.0
    recent_ttft: list[float] = field(default_factory=list)


class InferenceService(Service):
    """Owns the worker process; `generate` is what the HTTP handlers call."""

    name = "worker"
    critical = False
    give_up = False

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.stats = GenerationStats()
        self.loaded_model: str | None = None
        self.wanted_model: str | None = None
        self.waiting = 0
        # Generations running in the worker now (at most APPLIANCE_PARALLEL).
        self.running = 0
        self.slots = FairSlots(
            settings.parallel, share_per_key(settings.parallel, settings.parallel_per_key)
        )
        # Held while the loaded model changes; a change waits for `_idle`.
        self._switch = trio.Lock()
        self._idle = trio.Event()
        self._idle.set()
        self._link: WorkerLink | None = None
        self._process: trio.Process | None = None
        self._next_id = 1
        self._served = 0
        self._recycle = trio.Event()
        self._worker_ready = trio.Event()
        self._loading: str | None = None
        # Deaths in a row while loading, per model (cleared when it loads).
        self._load_deaths: dict[str, int] = {}

    # -- service ---------------------------------------------------------------------

    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def healthy(self) -> bool:
        return self.pid() is not None

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        reported = False
        while True:
            # Returns only when the worker is recycled; a crash raises to the supervisor.
            await self._run_once(task_status if not reported else trio.TASK_STATUS_IGNORED)
            reported = True

    async def _run_once(self, task_status: trio.TaskStatus[Any]) -> None:
        self._recycle = trio.Event()
        parent, child = socket.socketpair()
        try:
            process = await spawn(
                [*worker_command(), "--fd", str(child.fileno())],
                pass_fds=[child.fileno()],
                env={"APPLIANCE_LOG_LEVEL": self.settings.log_level},
            )
        finally:
            child.close()
        self._process = process
        self._served = 0
        link = WorkerLink(parent, lambda: _kill(process))
        self._link = link
        exit_: list[tuple[int, str | None]] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_exit, process, link, nursery.cancel_scope, exit_)
                nursery.start_soon(forward_output, process, logging.getLogger("appliance.worker"))
                # A crash fails the pending requests (so a load in progress raises
                # WorkerCrashed here) and cancels this nursery; it is reported below.
                with contextlib.suppress(WorkerCrashed):
                    await self._load_at_start()
                    task_status.started(process.pid)
                    self._worker_ready.set()
                    await self._recycle.wait()
                    LOGGER.info("recycling the worker after %d requests", self._served)
                nursery.cancel_scope.cancel()
        finally:
            self._link = None
            self.loaded_model = None
            self._loading = None
            await link.aclose()
            await terminate(process, STOP_GRACE)
            link.fail(WorkerCrashed("the worker stopped"))
        if exit_:
            code, loading = exit_[0]
            self.stats.crashes += 1
            if loading is not None:
                await self._died_loading(loading, code)
            raise WorkerCrashed(describe_exit(code))

    async def _watch_exit(
        self,
        process: trio.Process,
        link: WorkerLink,
        scope: trio.CancelScope,
        exit_: list[tuple[int, str | None]],
    ) -> None:
        code = await process.wait()
        exit_.append((code, self._loading))
        LOGGER.error("the inference worker %s", describe_exit(code))
        link.fail(WorkerCrashed(describe_exit(code)))
        scope.cancel()

    async def _load_at_start(self) -> None:
        """Reload what was loaded before a restart, else preload the default model.

        A model that fails is marked failed by `_load`, so the next choice differs; the
        number of tries is bounded all the same.
        """
        for _ in range(PRELOAD_TRIES):
            model = self.wanted_model or await self._startup_model()
            if model is None:
                return
            try:
                await self._load(model)
                return
            except ModelFailed as exc:
                LOGGER.error("not preloading %s: %s", model, exc)

    async def _startup_model(self) -> str | None:
        if not self.settings.preload:
            return None
        try:
            return await trio.to_thread.run_sync(
                self.registry.default_name, self.settings.default_model or None
            )
        except RegistryError as exc:
            LOGGER.warning("no model preloaded: %s", exc)
            return None

    async def _died_loading(self, model: str, code: int) -> None:
        deaths = self._load_deaths[model] = self._load_deaths.get(model, 0) + 1
        if not crashed_by_itself(code) and deaths < LOAD_DEATHS_TO_FAIL:
            LOGGER.warning(
                "the worker died while loading %s (%s); loading it again",
                model,
                describe_exit(code),
            )
            return
        del self._load_deaths[model]
        times = "" if deaths == 1 else f", {deaths} times in a row"
        await self._mark_failed(
            model, f"the worker died while loading it ({describe_exit(code)}{times})"
        )

    async def _mark_failed(self, model: str, reason: str) -> None:
        LOGGER.error("model %s marked failed: %s", model, reason)
        try:
            await trio.to_thread.run_sync(self.registry.mark_failed, model, reason)
        except RegistryError as exc:
            LOGGER.warning("could not mark model %s failed: %s", model, exc)
        if self.wanted_model == model:
            self.wanted_model = None

    # -- requests --------------------------------------------------------------------

    def _open(self) -> tuple[WorkerLink, int, Pending]:
        """A new request id on the current worker, waiting for its frames."""
        link = self._link
        if link is None:
            raise WorkerCrashed("the worker is restarting")
        request_id = self._next_id
        self._next_id += 1
        return link, request_id, link.open(request_id)

    async def _load(self, model: str) -> None:
        record = await trio.to_thread.run_sync(self.registry.usable, model)
        path = self.registry.path_of(record)
        context = self.settings.context_size
        if record.context_length:
            context = min(context, record.context_length)
        link, request_id, pending = self._open()
        self._loading = model
        # The worker frees the old model before loading the new one (two may not fit).
        self.loaded_model = None
        try:
            await link.send(
                Load(
                    id=request_id,
                    model=model,
                    path=str(path),
                    n_ctx=context,
                    n_threads=self.settings.threads or usable_cores(),
                    n_gpu_layers=self.settings.gpu_layers,
                    parallel=self.settings.parallel,
                )
            )
            reply = await link.receive(request_id, pending)
        finally:
            link.forget(request_id)
            self._loading = None
        if isinstance(reply, Error):
            await self._mark_failed(model, reply.message)
            raise ModelFailed(
                503, "model_unavailable", f"model {model} failed to load: {reply.message}"
            )
        assert isinstance(reply, Loaded)
        self._load_deaths.pop(model, None)
        self.loaded_model = model
        self.wanted_model = model
        LOGGER.info(
            "model %s loaded in %.2f s (context %d)", model, reply.load_seconds, reply.n_ctx
        )

    async def generate(
        self,
        model: str,
        *,
        deadline: float,
        messages: list[ChatMessage] | None = None,
        prompt: str | None = None,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str] | None = None,
        seed: int | None = None,
        owner: str = "",
        options: SamplingOptions | None = None,
    ) -> AsyncGenerator[Token | Done, None]:
        """Queue, then stream Token events and one final Done; raises InferenceError.

        `deadline` is absolute (trio time); `owner` (the API key's id) is whose share of the
        slots the generation takes. No cancel scope stays open across a yield, so the
        caller may consume this generator from anywhere in its task.
        """
        if self.waiting >= self.settings.max_queue:
            self.stats.rejected += 1
            raise QueueFull(
                f"{self.waiting} requests are already waiting (APPLIANCE_MAX_QUEUE="
                f"{self.settings.max_queue}); retry in a few seconds"
            )
        queued_at = time.monotonic()
        await self._admit(model, deadline, owner)
        link: WorkerLink | None = None
        request_id = 0
        sent = finished = False
        self.running += 1
        if self._idle.is_set():
            # Replaced only when set: a model switch may be waiting on the current one.
            self._idle = trio.Event()
        try:
            self.stats.last_queue_wait = time.monotonic() - queued_at
            link, request_id, pending = self._open()
            await link.send(
                Generate(
                    id=request_id,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    stop=stop or [],
                    seed=seed,
                    prompt=prompt,
                    messages=messages,
                    options=options,
                )
            )
            sent = True
            first_token: float | None = None
            while True:
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
                        self._record_first_token(first_token - queued_at)
                    yield event
                elif isinstance(event, Done):
                    finished = True
                    self._record_done(event, first_token)
                    yield event
                    return
        finally:
            if link is not None:
                # A Generate never written needs no Cancel (and no Done will come).
                if sent and not finished:
                    await _cancel(link, request_id, pending)
                link.forget(request_id)
            self._finish_running(owner)

    async def embed(
        self,
        model: str,
        *,
        deadline: float,
        texts: list[str] | None = None,
        tokens: list[list[int]] | None = None,
        owner: str = "",
    ) -> list[Embedded]:
        """The vectors of the inputs (in parts, in order), reached like `generate`: a slot
        of the owner's share, then the model's worker. Raises InferenceError."""
        if self.waiting >= self.settings.max_queue:
            self.stats.rejected += 1
            raise QueueFull(
                f"{self.waiting} requests are already waiting (APPLIANCE_MAX_QUEUE="
                f"{self.settings.max_queue}); retry in a few seconds"
            )
        await self._admit(model, deadline, owner)
        link: WorkerLink | None = None
        request_id = 0
        sent = finished = False
        self.running += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        parts: list[Embedded] = []
        try:
            link, request_id, pending = self._open()
            await link.send(Embed(id=request_id, texts=texts or [], tokens=tokens or []))
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

    async def _admit(self, model: str, deadline: float, owner: str) -> None:
        """Wait for a slot (the owner's share of APPLIANCE_PARALLEL), the worker and `model`,
        within `deadline`."""
        self.waiting += 1
        stage = "waited in the queue"
        acquired = False
        try:
            with trio.move_on_at(deadline) as waiting:
                await self.slots.acquire(owner)
                acquired = True
                # A recycle in progress (or due: this worker took all the requests it may):
                # start on the fresh worker.
                await self._worker_ready.wait()
                while self._took_enough():
                    self._close_gate()
                    await self._worker_ready.wait()
                self._served += 1
                if self.loaded_model != model:
                    stage = "waited for its model to load"
                    await self._switch_to(model)
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

    async def _switch_to(self, model: str) -> None:
        """Load `model` once the generations on the current one have ended."""
        async with self._switch:
            if self.loaded_model == model:
                return
            # Requests for the old model stop starting (they queue behind this switch), so
            # the running ones can end and no Generate reaches the worker during the load.
            self.loaded_model = None
            await self._idle.wait()
            await self._load(model)

    def _finish_running(self, owner: str) -> None:
        self.running -= 1
        if self._worker_ready.is_set() and self._grew_too_big():
            self._close_gate()
        if self.running == 0:
            self._idle.set()
            if not self._worker_ready.is_set():
                self._recycle.set()
        self.slots.release(owner)

    def _close_gate(self) -> None:
        """New generations wait for a fresh worker; this one goes once the running end."""
        if self._worker_ready.is_set():
            self._worker_ready = trio.Event()
        if self.running == 0:
            self._recycle.set()

    @property
    def busy(self) -> bool:
        return self.running > 0

    def _record_first_token(self, seconds: float) -> None:
        self.stats.last_time_to_first_token = seconds
        self.stats.recent_ttft = [*self.stats.recent_ttft[-99:], seconds]

    def _record_done(self, done: Done, first_token: float | None) -> None:
        self.stats.completed += 1
        if first_token is not None and done.completion_tokens > 1:
            seconds = time.monotonic() - first_token
            if seconds > 0:
                self.stats.last_tokens_per_second = (done.completion_tokens - 1) / seconds

    def _took_enough(self) -> bool:
        """The guide's --max-requests against leaks: this worker took its last request."""
        limit = self.settings.worker_max_requests
        if limit and self._served >= limit:
            LOGGER.info("worker served %d requests (APPLIANCE_WORKER_MAX_REQUESTS)", self._served)
            return True
        return False

    def _grew_too_big(self) -> bool:
        """The worker's RSS passed APPLIANCE_WORKER_MAX_RSS_MB."""
        pid = self.pid()
        rss_limit = self.settings.worker_max_rss_mb * 1024 * 1024
        if pid is None or not rss_limit:
            return False
        try:
            rss = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return False
        if rss > rss_limit:
            LOGGER.info("worker RSS is %d MB (APPLIANCE_WORKER_MAX_RSS_MB)", rss // 2**20)
            return True
        return False


async def _cancel(link: WorkerLink, request_id: int, pending: Pending) -> None:
    """The caller went away (client disconnect, deadline): stop the worker within a token
    and wait for it, so that the request's slot is free at once."""
    with trio.move_on_after(CANCEL_GRACE) as scope:
        scope.shield = True
        try:
            await link.send(Cancel(request_id))
            while not isinstance(await link.receive(request_id, pending), Done | Error):
                pass
        except InferenceError:
            pass


def _kill(process: trio.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGKILL)
