"""The inference service: a pool of resident models, one worker process each.

A request names a model; if it is resident its worker serves it at once (requests for
different models run at the same time, each model in its own process), else it is loaded
first. What resident models need is estimated from each GGUF header (appliance.llm.memory)
and bounded by APPLIANCE_MODEL_MEMORY, counting a worker's real RSS when that is larger:
a load that does not fit unloads the least recently used idle model, waits for one to become
idle, or, for a model that alone needs more than the budget, is refused naming both figures.

An idle model stays resident for its keep-alive (APPLIANCE_KEEP_ALIVE, Ollama's semantics;
a request's `keep_alive` replaces its model's), then is unloaded. The models named by
APPLIANCE_PRELOAD are loaded before READY and kept until unloaded or needed room.

Generations queue in a bounded queue (APPLIANCE_MAX_QUEUE, then `QueueFull`: 429 with
Retry-After). A crash of one worker fails only its model's requests in flight (503), and
that worker alone is started again (appliance.llm.model_worker).
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, Final

import trio

from appliance.config import Settings, describe_keep_alive
from appliance.llm.errors import DeadlineExceeded, InferenceError, ModelFailed, QueueFull
from appliance.llm.gguf_header import GGUFHeaderError, check_gguf_header
from appliance.llm.handoff import Handoff
from appliance.llm.memory import N_BATCH, default_budget, estimate, mb
from appliance.llm.model_defaults import FALLBACK, ModelDefaults, pick, with_system
from appliance.llm.model_worker import GenerationStats, LoadPlan, ModelWorker, worker_threads
from appliance.llm.protocol import (
    ChatMessage,
    Detached,
    Done,
    Embed,
    Embedded,
    Generate,
    Sampling,
    SamplingOptions,
    Token,
)
from appliance.llm.registry import ModelRegistry, RegistryError
from appliance.llm.thread_binding import allowed_cores, binding_allowed, choose_cores
from appliance.supervisor import Service, ServiceState

LOGGER = logging.getLogger("appliance.llm")

RETRY_AFTER_SECONDS: Final = 2
# How old a model's defaults (its manifest record) may be when a request uses them.
DEFAULTS_MAX_AGE: Final = 1.0


class ModelTooLarge(ModelFailed):
    """A model needs more memory than the whole budget."""

    def __init__(self, message: str) -> None:
        super().__init__(507, "model_too_large", message)


class InferenceService(Service):
    """The pool of resident models; `generate` is what the HTTP handlers call."""

    name = "models"
    critical = False
    give_up = False

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.stats = GenerationStats()
        self.workers: dict[str, ModelWorker] = {}
        budget = settings.model_memory_bytes
        self.budget = budget if budget is not None else default_budget()
        self.keep_alive = settings.keep_alive_seconds
        # Requests waiting for a model to be chosen or loaded (the rest wait in a worker).
        self._choosing = 0
        self.loads = 0
        self.unloads = 0
        # Preloaded models that did not load, and why (readiness reports them).
        self.preload_failures: dict[str, str] = {}
        self.preloaded: tuple[str, ...] = ()
        self._nursery: trio.Nursery | None = None
        self._decide = trio.Lock()
        self._change = trio.Event()
        # Whether workers' threads can be bound to cores (appliance.llm.thread_binding).
        self._binding: bool | None = None
        # The context workers start in: the daemon's, not that of the request that asked
        # for the model (its id would be on every line the worker logs from then on).
        self._context = contextvars.copy_context()

    # -- service ---------------------------------------------------------------------

    def healthy(self) -> bool:
        return self._nursery is not None

    def parts(self) -> list[ServiceState]:
        """Each resident model's worker, as `/api/v1/health/services` lists services."""
        return [
            ServiceState(
                name=f"worker:{worker.name}",
                critical=False,
                state=worker.state,
                healthy=worker.ready,
                pid=worker.pid(),
                restarts=worker.restarts,
                last_error=worker.last_error,
                since=worker.since,
            )
            for worker in self.workers.values()
        ]

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._context = contextvars.copy_context()
                nursery.start_soon(self._expire_idle)
                await self._preload()
                task_status.started()
        finally:
            self._nursery = None
            self.workers.clear()

    async def _preload(self) -> None:
        names = self.settings.preload_models
        if names is None:
            try:
                default = await trio.to_thread.run_sync(
                    self.registry.default_name, self.settings.default_model or None
                )
            except RegistryError as exc:
                LOGGER.warning("no model preloaded: %s", exc)
                return
            names = (default,) if default is not None else ()
        self.preloaded = names
        for name in names:
            try:
                # Kept resident until unloaded (or needed room), whatever APPLIANCE_KEEP_ALIVE.
                await self.load(name, keep_alive=math.inf)
            except InferenceError as exc:
                self.preload_failures[name] = str(exc)
                LOGGER.error("not preloading %s: %s", name, exc)

    # -- what the API reads ------------------------------------------------------------

    @property
    def loaded_model(self) -> str | None:
        """The most recently used resident model."""
        ready = [worker for worker in self.workers.values() if worker.ready]
        return max(ready, key=lambda w: w.last_used).name if ready else None

    @property
    def running(self) -> int:
        return sum(worker.running for worker in self.workers.values())

    @property
    def waiting(self) -> int:
        return self._choosing + sum(worker.waiting for worker in self.workers.values())

    @property
    def busy(self) -> bool:
        return self.running > 0

    def used_memory(self) -> int:
        return sum(worker.needs() for worker in self.workers.values())

    def resident(self, name: str) -> ModelWorker | None:
        return self.workers.get(name)

    # -- residency -------------------------------------------------------------------

    def _notify(self) -> None:
        self._change.set()
        self._change = trio.Event()

    async def load(
        self, model: str, *, keep_alive: float | None = None, deadline: float = math.inf
    ) -> ModelWorker:
        """Make `model` resident (or keep it so) and wait until it is loaded; the admin API
        and preloading. `keep_alive` replaces the model's; raises InferenceError."""
        worker = await self._claim(model, deadline)
        try:
            await worker.wait_ready()
        finally:
            self._release(worker, keep_alive)
        return worker

    async def unload(self, model: str) -> bool:
        """Unload `model` now if idle (True); else it goes when its requests end (False).
        LookupError when it is not resident."""
        worker = self.workers.get(model)
        if worker is None:
            raise LookupError(model)
        if worker.users:
            worker.keep_alive = 0.0
            return False
        await self._unload(worker, "unloaded on request")
        return True

    async def _claim(self, model: str, deadline: float) -> ModelWorker:
        """The worker of `model`, loaded or loading, with this request counted as its user
        (`_release` when done): an idle worker is never unloaded under a user."""
        while True:
            worker = self.workers.get(model)
            if worker is not None and worker.failed is None and worker.state != "stopped":
                worker.users += 1
                return worker
            async with self._decide:
                if self._nursery is None:
                    raise ModelFailed(503, "model_unavailable", "the model pool is stopping")
                current = self.workers.get(model)
                if current is not None and current.failed is None:
                    continue
                plan = await self._plan(model)
                await self._make_room(plan, deadline)
                cores = choose_cores(
                    worker_threads(self.settings),
                    allowed_cores() if self._may_bind() else [],
                    (other.cores for other in self.workers.values()),
                )
                worker = ModelWorker(
                    self.settings,
                    self.registry,
                    plan,
                    self.stats,
                    keep_alive=self.keep_alive,
                    changed=self._notify,
                    cores=cores,
                )
                self.workers[model] = worker
                worker.users += 1
                self.loads += 1
                self._context.copy().run(self._nursery.start_soon, self._keep, worker)
                return worker

    def _may_bind(self) -> bool:
        if self._binding is None:
            self._binding = binding_allowed()
            if not self._binding:
                LOGGER.warning(
                    "llama.cpp threads are not bound to cores: sched_setaffinity() is refused "
                    "here (a system call filter); a request's first decode may be slower"
                )
        return self._binding

    def _release(self, worker: ModelWorker, keep_alive: float | None) -> None:
        worker.users -= 1
        if keep_alive is not None:
            worker.keep_alive = keep_alive
        worker.last_used = trio.current_time()
        self._notify()

    async def _keep(self, worker: ModelWorker) -> None:
        """Run one model's worker in the pool until it stops or gives up."""
        try:
            await worker.run()
        finally:
            if self.workers.get(worker.name) is worker:
                del self.workers[worker.name]
            if worker.failed is None:
                self.preload_failures.pop(worker.name, None)
            elif worker.name in self.preloaded:
                self.preload_failures[worker.name] = str(worker.failed)
            self._notify()

    async def _plan(self, model: str) -> LoadPlan:
        """The checked file, its context and its memory estimate (ModelFailed otherwise)."""
        try:
            return await trio.to_thread.run_sync(self._plan_sync, model)
        except (RegistryError, GGUFHeaderError) as exc:
            raise ModelFailed(503, "model_unavailable", str(exc)) from None

    def _plan_sync(self, model: str) -> LoadPlan:
        record = self.registry.usable(model)
        path = self.registry.path_of(record)
        header = check_gguf_header(path)
        context = record.defaults.context_size or self.settings.context_size
        if record.context_length:
            context = min(context, record.context_length)
        needs = estimate(
            header, n_ctx=context, parallel=self.settings.parallel, n_batch=min(N_BATCH, context)
        )
        return LoadPlan(model=model, path=Path(path), n_ctx=context, estimate=needs)

    async def _make_room(self, plan: LoadPlan, deadline: float) -> None:
        """Unload idle models, least recently used first, until `plan` fits the budget; wait
        for a busy one to become idle when none is."""
        needs = plan.estimate.total
        if needs > self.budget:
            raise ModelTooLarge(
                f"model {plan.model} needs about {plan.estimate.describe()} with a context of "
                f"{plan.n_ctx} tokens and {self.settings.parallel} slots; the memory budget is "
                f"{mb(self.budget)} MB (APPLIANCE_MODEL_MEMORY): raise it, or lower the "
                f"model's context_size (appliance models set {plan.model} context_size=N)"
            )
        while self.used_memory() + needs > self.budget:
            idle = [worker for worker in self.workers.values() if worker.idle]
            if idle:
                victim = min(idle, key=lambda w: w.last_used)
                await self._unload(
                    victim, f"to make room for {plan.model} (APPLIANCE_MODEL_MEMORY)"
                )
                continue
            with trio.move_on_at(deadline):
                await self._change.wait()
                continue
            raise DeadlineExceeded(
                f"the request waited past its deadline for memory to load {plan.model}: the "
                f"resident models are busy and {mb(self.used_memory())} MB of the "
                f"{mb(self.budget)} MB budget are in use (APPLIANCE_MODEL_MEMORY)"
            )

    async def _unload(self, worker: ModelWorker, reason: str) -> None:
        if self.workers.get(worker.name) is worker:
            del self.workers[worker.name]
        self.unloads += 1
        LOGGER.info("model %s unloaded: %s", worker.name, reason)
        await worker.stop()
        self._notify()

    async def _expire_idle(self) -> None:
        """Unload idle models whose keep-alive has run out."""
        while True:
            now = trio.current_time()
            for worker in list(self.workers.values()):
                if worker.idle and worker.expires_at <= now:
                    await self._unload(
                        worker,
                        f"idle for {describe_keep_alive(worker.keep_alive)} (keep_alive)",
                    )
            due = min(
                (worker.expires_at for worker in self.workers.values() if worker.idle),
                default=math.inf,
            )
            with trio.move_on_at(due):
                await self._change.wait()

    async def _defaults_of(self, model: str) -> ModelDefaults:
        """The model's defaults: as the registry's latest scan found them (a request checked
        its model a moment ago), else read from the manifest in a thread."""
        recent = self.registry.recent_defaults(model, DEFAULTS_MAX_AGE)
        if recent is not None:
            return recent
        return await trio.to_thread.run_sync(self.registry.defaults_of, model)

    # -- requests --------------------------------------------------------------------

    async def generate(
        self,
        model: str,
        *,
        deadline: float,
        sampling: Sampling,
        messages: list[ChatMessage] | None = None,
        prompt: str | None = None,
        owner: str = "",
        keep_alive: float | None = None,
        handoff: Handoff | None = None,
    ) -> AsyncGenerator[Token | Detached | Done, None]:
        """Queue, then stream Token events and one final Done; raises InferenceError.
        With `handoff`, the worker may write the token events itself (ModelWorker.generate).

        `deadline` is absolute (trio time); `owner` (the API key's id) is whose share of the
        model's slots the generation takes. Sampling fields left None take the model's
        defaults (its manifest), then the appliance's. No cancel scope stays open across a
        yield, so the caller may consume this generator from anywhere in its task.
        """
        if self.waiting >= self.settings.max_queue:
            self.stats.rejected += 1
            raise QueueFull(
                f"{self.waiting} requests are already waiting (APPLIANCE_MAX_QUEUE="
                f"{self.settings.max_queue}); retry in a few seconds"
            )
        queued_at = time.monotonic()
        self._choosing += 1
        try:
            defaults = await self._defaults_of(model)
            worker = await self._claim(model, deadline)
        finally:
            self._choosing -= 1
        try:
            request = Generate(
                id=0,
                max_tokens=sampling.max_tokens,
                temperature=pick(sampling.temperature, defaults.temperature, FALLBACK.temperature),
                top_p=pick(sampling.top_p, defaults.top_p, FALLBACK.top_p),
                stop=sampling.stop or defaults.stop or [],
                seed=sampling.seed,
                prompt=prompt,
                messages=with_system(messages, defaults.system),
                top_k=pick(None, defaults.top_k, FALLBACK.top_k),
                min_p=pick(None, defaults.min_p, FALLBACK.min_p),
                repeat_penalty=pick(None, defaults.repeat_penalty, FALLBACK.repeat_penalty),
                presence_penalty=pick(
                    _asked_presence(sampling.options),
                    defaults.presence_penalty,
                    FALLBACK.presence_penalty,
                ),
                options=sampling.options,
            )
            events = worker.generate(
                request, deadline=deadline, owner=owner, queued_at=queued_at, handoff=handoff
            )
            try:
                async for event in events:
                    yield event
            finally:
                await events.aclose()
        finally:
            self._release(worker, keep_alive)

    async def embed(
        self,
        model: str,
        *,
        deadline: float,
        texts: list[str] | None = None,
        tokens: list[list[int]] | None = None,
        owner: str = "",
        keep_alive: float | None = None,
    ) -> list[Embedded]:
        """The vectors of the inputs (in parts, in order), from `model`'s worker (loaded
        as for `generate`); raises InferenceError."""
        if self.waiting >= self.settings.max_queue:
            self.stats.rejected += 1
            raise QueueFull(
                f"{self.waiting} requests are already waiting (APPLIANCE_MAX_QUEUE="
                f"{self.settings.max_queue}); retry in a few seconds"
            )
        self._choosing += 1
        try:
            worker = await self._claim(model, deadline)
        finally:
            self._choosing -= 1
        try:
            request = Embed(id=0, texts=texts or [], tokens=tokens or [])
            return await worker.embed(request, deadline=deadline, owner=owner)
        finally:
            self._release(worker, keep_alive)

    # -- what the API shows ------------------------------------------------------------

    def describe(self, worker: ModelWorker) -> dict[str, Any]:
        """One resident model, as `GET /api/v1/models/resident` and the metrics show it."""
        now = trio.current_time()
        expires = worker.expires_at - now if worker.idle else None
        return {
            "name": worker.name,
            "state": worker.state,
            "pid": worker.pid(),
            "estimated_bytes": worker.plan.estimate.total,
            "rss_bytes": worker.rss(),
            "context": worker.n_ctx or worker.plan.n_ctx,
            "slots": self.settings.parallel,
            "running": worker.running,
            "waiting": worker.waiting,
            "idle_seconds": round(now - worker.last_used, 3) if worker.idle else 0.0,
            "keep_alive": describe_keep_alive(worker.keep_alive),
            "expires_in_seconds": (
                None if expires is None or math.isinf(expires) else round(max(expires, 0), 3)
            ),
            "loads": worker.loads,
            "restarts": worker.restarts,
        }


def _asked_presence(options: SamplingOptions | None) -> float | None:
    """The presence penalty the request asked for: OpenAI's field in `options` when set
    (0 is OpenAI's default, so it leaves the model's default)."""
    if options is not None and options.presence_penalty:
        return options.presence_penalty
    return None
