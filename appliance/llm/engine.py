"""The inference service: supervises the worker process and schedules generations on it.

Up to APPLIANCE_PARALLEL generations run at once in the worker (continuous batching);
more callers wait in a bounded FIFO queue (beyond it they get `QueueFull`, which the API
turns into 429 with Retry-After). A change of model waits until the running generations
end; so does recycling the worker. If the worker dies, every
request in flight gets `WorkerCrashed` (503), the worker is started again with back-off,
and the model it had loaded is loaded again. A model that kills the worker while loading
is marked failed in the registry and is not loaded again until it is verified.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Final

import psutil
import trio

from appliance.children import forward_output, spawn, terminate
from appliance.config import Settings
from appliance.llm.protocol import (
    Cancel,
    ChatMessage,
    Done,
    Error,
    FrameBuffer,
    FromWorker,
    Generate,
    Load,
    Loaded,
    ProtocolError,
    Token,
    ToWorker,
    decode_from_worker,
    encode_frame,
)
from appliance.llm.registry import ModelRegistry, RegistryError
from appliance.supervisor import Service

LOGGER = logging.getLogger("appliance.llm")

STOP_GRACE: Final = 5.0
CANCEL_GRACE: Final = 5.0
RETRY_AFTER_SECONDS: Final = 2
PRELOAD_TRIES: Final = 3
# After the worker's socket ends, how long a request waits for the exit watcher to say
# how the worker ended (it notices within milliseconds; this only bounds the wait).
EXIT_GRACE: Final = 2.0
RECEIVE_BYTES: Final = 65536


class InferenceError(Exception):
    """A generation could not be served; `status` and `code` shape the HTTP answer."""

    status = 500
    code = "inference_error"


class WorkerCrashed(InferenceError):
    status = 503
    code = "worker_crashed"

    def __init__(self, detail: str = "") -> None:
        super().__init__("model worker crashed; retry" + (f" ({detail})" if detail else ""))


class QueueFull(InferenceError):
    status = 429
    code = "queue_full"


class DeadlineExceeded(InferenceError):
    status = 504
    code = "deadline_exceeded"


class ModelFailed(InferenceError):
    """The worker refused the request (bad prompt, model that does not load...)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# Worker error codes that are the client's to fix.
_CLIENT_ERRORS: Final = {"context_length_exceeded": 400, "template_error": 422}


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


class _Pending:
    """One request's frames that another task read off the socket, or why none will come."""

    __slots__ = ("error", "frames", "wakeup")

    def __init__(self) -> None:
        self.frames: deque[FromWorker] = deque()
        self.error: BaseException | None = None
        # Set while the request waits for a frame that another task is reading.
        self.wakeup: trio.Event | None = None

    def wake(self) -> None:
        if self.wakeup is not None:
            self.wakeup.set()


class _Connection:
    """The supervisor's end of one worker's socket.

    Frames out go through trio's stream. Frames in have no reader task of their own: the
    request that waits for one reads the socket itself, so a token costs one task wakeup
    and one recv, not a reader task's wakeup plus a channel hop to the request's task.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self.frames = FrameBuffer()
        # Several generations run at once: one frame out at a time.
        self.send_lock = trio.Lock()
        self.reading = False  # a request waits on the socket; any other waits for it
        self.ended = False  # closed, EOF or an invalid frame: no more frames will come

    async def read_body(self) -> bytes | None:
        """The next frame's body; None once the socket has ended. Raises ProtocolError."""
        body = self.frames.pop()
        while body is None and not self.ended:
            # Readiness first, then one recv: one system call per token, where trio's
            # receive_some would try a recv first and fail while the worker decodes.
            try:
                await trio.lowlevel.wait_readable(self.sock)
                data = self.sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                continue
            except (OSError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.ended = True
                return None
            self.frames.push(data)
            body = self.frames.pop()
        return body


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
        self._slots = trio.Semaphore(settings.parallel)
        # Held while the loaded model changes; a change waits for `_idle`.
        self._switch = trio.Lock()
        self._idle = trio.Event()
        self._idle.set()
        self._connection: _Connection | None = None
        self._process: trio.Process | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._served = 0
        self._recycle = trio.Event()
        self._worker_ready = trio.Event()
        self._loading: str | None = None

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
        connection = _Connection(parent)
        self._connection = connection
        exit_: list[tuple[int, str | None]] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_exit, process, nursery.cancel_scope, exit_)
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
            self._connection = None
            connection.ended = True
            self.loaded_model = None
            self._loading = None
            with trio.CancelScope(shield=True):
                await connection.stream.aclose()
            await terminate(process, STOP_GRACE)
            self._fail_pending(WorkerCrashed("the worker stopped"))
        if exit_:
            code, loading = exit_[0]
            self.stats.crashes += 1
            if loading is not None:
                await self._mark_failed(
                    loading, f"the worker died while loading it ({_describe_exit(code)})"
                )
            raise WorkerCrashed(_describe_exit(code))

    async def _watch_exit(
        self,
        process: trio.Process,
        scope: trio.CancelScope,
        exit_: list[tuple[int, str | None]],
    ) -> None:
        code = await process.wait()
        exit_.append((code, self._loading))
        LOGGER.error("the inference worker %s", _describe_exit(code))
        self._fail_pending(WorkerCrashed(_describe_exit(code)))
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

    async def _mark_failed(self, model: str, reason: str) -> None:
        LOGGER.error("model %s marked failed: %s", model, reason)
        try:
            await trio.to_thread.run_sync(self.registry.mark_failed, model, reason)
        except RegistryError as exc:
            LOGGER.warning("could not mark model %s failed: %s", model, exc)
        if self.wanted_model == model:
            self.wanted_model = None

    def _fail_pending(self, error: BaseException) -> None:
        for pending in self._pending.values():
            if pending.error is None:
                pending.error = error
            pending.wake()
        self._pending.clear()

    # -- requests --------------------------------------------------------------------

    async def _send(self, message: ToWorker) -> None:
        connection = self._connection
        if connection is None:
            raise WorkerCrashed("the worker is restarting")
        try:
            async with connection.send_lock:
                await connection.stream.send_all(encode_frame(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise WorkerCrashed("the worker is gone") from None

    def _open(self) -> tuple[int, _Pending]:
        request_id = self._next_id
        self._next_id += 1
        pending = _Pending()
        self._pending[request_id] = pending
        return request_id, pending

    async def _receive(self, request_id: int, pending: _Pending) -> FromWorker:
        """The request's next frame. A waiting request reads the socket itself while no
        other does; frames it reads for other requests are queued for them (frames of
        requests no longer waiting, such as one that gave up on a cancel, are dropped)."""
        while True:
            if pending.frames:
                return pending.frames.popleft()
            if pending.error is not None:
                raise pending.error
            connection = self._connection
            if connection is None:
                raise WorkerCrashed("the worker is restarting")
            if connection.reading:
                await self._wait(pending)
                continue
            message = await self._read_frame(connection)
            if message is None:
                # The worker is gone: its exit watcher says how in a moment.
                with trio.move_on_after(EXIT_GRACE):
                    while pending.error is None:
                        await self._wait(pending)
                raise pending.error or WorkerCrashed("the worker closed its connection")
            if message.id == request_id:
                return message
            other = self._pending.get(message.id)
            if other is not None:
                other.frames.append(message)
                other.wake()

    async def _read_frame(self, connection: _Connection) -> FromWorker | None:
        """The next frame off the socket, whoever it is for; None once it has ended."""
        connection.reading = True
        try:
            body = await connection.read_body()
            return None if body is None else decode_from_worker(body)
        except ProtocolError as exc:
            self._protocol_error(connection, exc)
            return None
        finally:
            connection.reading = False
            # Hand the socket on to any other request waiting for a frame.
            for pending in self._pending.values():
                pending.wake()

    async def _wait(self, pending: _Pending) -> None:
        pending.wakeup = wakeup = trio.Event()
        try:
            await wakeup.wait()
        finally:
            pending.wakeup = None

    def _protocol_error(self, connection: _Connection, exc: ProtocolError) -> None:
        connection.ended = True
        LOGGER.error("worker sent an invalid frame (%s); restarting it", exc)
        process = self._process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGKILL)

    async def _load(self, model: str) -> None:
        record = await trio.to_thread.run_sync(self.registry.usable, model)
        path = self.registry.path_of(record)
        context = self.settings.context_size
        if record.context_length:
            context = min(context, record.context_length)
        request_id, pending = self._open()
        self._loading = model
        # The worker frees the old model before loading the new one (two may not fit).
        self.loaded_model = None
        try:
            await self._send(
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
            reply = await self._receive(request_id, pending)
        finally:
            self._pending.pop(request_id, None)
            self._loading = None
        if isinstance(reply, Error):
            await self._mark_failed(model, reply.message)
            raise ModelFailed(
                503, "model_unavailable", f"model {model} failed to load: {reply.message}"
            )
        assert isinstance(reply, Loaded)
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
    ) -> AsyncGenerator[Token | Done, None]:
        """Queue, then stream Token events and one final Done; raises InferenceError.

        `deadline` is absolute (trio time). No cancel scope stays open across a yield, so
        the caller may consume this generator from anywhere in its task.
        """
        if self.waiting >= self.settings.max_queue:
            self.stats.rejected += 1
            raise QueueFull(
                f"{self.waiting} requests are already waiting (APPLIANCE_MAX_QUEUE="
                f"{self.settings.max_queue}); retry in a few seconds"
            )
        queued_at = time.monotonic()
        await self._admit(model, deadline)
        request_id: int | None = None
        sent = finished = False
        self.running += 1
        if self._idle.is_set():
            # Replaced only when set: a model switch may be waiting on the current one.
            self._idle = trio.Event()
        try:
            self.stats.last_queue_wait = time.monotonic() - queued_at
            request_id, pending = self._open()
            await self._send(
                Generate(
                    id=request_id,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    stop=stop or [],
                    seed=seed,
                    prompt=prompt,
                    messages=messages,
                )
            )
            sent = True
            first_token: float | None = None
            while True:
                event: FromWorker | None = None
                with trio.move_on_at(deadline):
                    event = await self._receive(request_id, pending)
                if event is None:
                    raise DeadlineExceeded("the generation ran past the request's deadline")
                if isinstance(event, Error):
                    finished = True
                    self.stats.failed += 1
                    raise ModelFailed(
                        _CLIENT_ERRORS.get(event.code, 500), event.code, event.message
                    )
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
            if request_id is not None:
                # A Generate never written needs no Cancel (and no Done will come).
                if sent and not finished:
                    await self._cancel(request_id)
                self._pending.pop(request_id, None)
            self._finish_running()

    async def _admit(self, model: str, deadline: float) -> None:
        """Wait for a slot (APPLIANCE_PARALLEL), the worker and `model`, within `deadline`."""
        self.waiting += 1
        stage = "waited in the queue"
        acquired = False
        try:
            with trio.move_on_at(deadline) as waiting:
                await self._slots.acquire()
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
                self._slots.release()
            raise
        finally:
            self.waiting -= 1
        if waiting.cancelled_caught:
            if acquired:
                self._slots.release()
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

    def _finish_running(self) -> None:
        self.running -= 1
        if self._worker_ready.is_set() and self._grew_too_big():
            self._close_gate()
        if self.running == 0:
            self._idle.set()
            if not self._worker_ready.is_set():
                self._recycle.set()
        self._slots.release()

    def _close_gate(self) -> None:
        """New generations wait for a fresh worker; this one goes once the running end."""
        if self._worker_ready.is_set():
            self._worker_ready = trio.Event()
        if self.running == 0:
            self._recycle.set()

    @property
    def busy(self) -> bool:
        return self.running > 0

    async def _cancel(self, request_id: int) -> None:
        """The caller went away (client disconnect, deadline): stop the worker within a
        token and wait for it, so the next request starts at once."""
        pending = self._pending.get(request_id)
        if pending is None:
            return
        with trio.move_on_after(CANCEL_GRACE) as scope:
            scope.shield = True
            try:
                await self._send(Cancel(request_id))
                while not isinstance(await self._receive(request_id, pending), Done | Error):
                    pass
            except InferenceError:
                pass

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


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
