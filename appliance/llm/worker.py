"""`appliance worker`: the child process where llama.cpp runs, and only there.

A crash in llama.cpp (a bad model, a kernel bug, an OOM kill) ends this process only; the
supervisor answers the requests in flight with 503 and starts a new worker. The worker
reads frames on a reader thread, so a Cancel is seen while generations run; between decode
steps it takes new requests and ends cancelled ones, so that they join or leave the batch
within one token. A streamed answer handed over by the supervisor has its token events
written to its client's connection from here (appliance.llm.direct_writes).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from appliance.llm.batching import (
    Batcher,
    BatchFull,
    Event,
    Failed,
    Finished,
    GrammarError,
    Sampling,
    TokenText,
    open_model,
)
from appliance.llm.chat_prompt import FALLBACK_STOP, fallback_prompt, template_markers
from appliance.llm.direct_writes import DirectWrites
from appliance.llm.embedding import Embedder, EmbedInputError
from appliance.llm.fitting import DoesNotFit, fit_conversation
from appliance.llm.llama_log import LlamaLog
from appliance.llm.memory import N_BATCH
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
    ProtocolError,
    SamplingOptions,
    Token,
    ToWorker,
)
from appliance.llm.worker_connection import AttachWith, Connection

LOGGER = logging.getLogger("appliance.worker")

LOG_FORMAT: Final = "%(levelname)s:%(name)s:%(message)s"


@dataclass
class _EmbedJob:
    request_id: int
    inputs: list[list[int]]
    parts: Iterator[Any]


class Worker:
    """Holds at most one loaded model and runs up to `parallel` generations on it at once,
    one llama.cpp decode per step for all of them (appliance.llm.batching)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.inbox: queue.Queue[ToWorker | AttachWith | None] = queue.Queue()
        self.cancelled: set[int] = set()
        self._model: Any = None
        self._context: Any = None
        self._batcher: Batcher | None = None
        self._embedder: Embedder | None = None
        self._embeds: deque[_EmbedJob] = deque()
        self._load_request: Load | None = None
        self._formatter: Any = None
        self._markers: list[str] = []
        self._name = ""
        # Request ids only grow: a cancel for an id up to this one needs no Generate.
        self._last_started = 0
        # Turns of a running conversation left out of its prompt, told in its Done.
        self._left_out: dict[int, int] = {}
        self._direct = DirectWrites()

    def read_forever(self) -> None:
        """Reader thread: cancels take effect at once, everything else is queued."""
        try:
            for message in self.connection.receive():
                if isinstance(message, Cancel):
                    self.cancelled.add(message.id)
                else:
                    self.inbox.put(message)
        except (OSError, ProtocolError):
            pass
        self.inbox.put(None)

    def serve(self) -> None:
        """Take requests between decode steps; wait for one only while nothing runs."""
        try:
            while True:
                batcher = self._batcher
                busy = bool(self._embeds) or (batcher is not None and batcher.running > 0)
                try:
                    message = self.inbox.get(block=not busy)
                except queue.Empty:
                    pass  # nothing new: decode the next step
                else:
                    if message is None:
                        return
                    self._handle(message)
                self._cancel_requested()
                self._step()
                self._embed_step()
        except BrokenPipeError:
            return

    def _handle(self, message: ToWorker | AttachWith) -> None:
        if isinstance(message, AttachWith):
            batcher = self._batcher
            running = batcher is not None and message.message.id in batcher.running_ids()
            frames = self._direct.attach(message.message, message.fd, running)
            if frames:
                self.connection.send(*frames)
            return
        try:
            if isinstance(message, Load):
                self.connection.send(self.load(message))
            elif isinstance(message, Generate):
                self.start(message)
            elif isinstance(message, Embed):
                self.embed(message)
        except BrokenPipeError:
            raise
        except Exception as exc:
            # One bad request must not take the loaded model down with the process.
            LOGGER.exception("request %d failed in the worker", message.id)
            self.connection.send(
                Error(message.id, "internal_error", f"the worker failed: {type(exc).__name__}")
            )

    def _cancel_requested(self) -> None:
        batcher = self._batcher
        for request_id in list(self.cancelled):
            for job in list(self._embeds):
                if job.request_id == request_id:
                    self._embeds.remove(job)
                    self.connection.send(Done(request_id, "cancelled", 0, 0))
            finished = batcher.cancel(request_id) if batcher is not None else None
            if finished is not None:
                self.cancelled.discard(request_id)
                self._send_event(finished)
            elif request_id <= self._last_started:
                self.cancelled.discard(request_id)  # it has ended already
            # Else its Generate is still on the way: `start` answers it as cancelled.

    def _step(self) -> None:
        batcher = self._batcher
        if batcher is None or batcher.running == 0:
            return
        try:
            events = batcher.step()
        except RuntimeError as exc:
            LOGGER.error("llama.cpp failed: %s; ending the running generations", exc)
            for request_id in batcher.running_ids():
                batcher.cancel(request_id)
                failed = Failed(request_id, "generation_failed", f"llama.cpp failed: {exc}")
                self._send_event(failed)
            return
        frames = [frame for event in events for frame in self._frames_of(event)]
        if frames:
            self.connection.send(*frames)

    def _send_event(self, event: Event) -> None:
        self.connection.send(*self._frames_of(event))

    def _frames_of(self, event: Event) -> list[FromWorker]:
        request_id = event.request_id
        if isinstance(event, TokenText):
            if not event.logprobs:
                written = self._direct.token(request_id, event.text)
                if written is not None:
                    return written
            return [Token(request_id, event.text, list(event.logprobs))]
        text, count = self._direct.end(request_id)
        if isinstance(event, Finished):
            done = Done(
                request_id,
                event.finish_reason,
                event.prompt_tokens,
                event.completion_tokens,
                event.cached_tokens,
                left_out=self._left_out.pop(request_id, 0),
                written_text=text,
                written_events=count,
            )
            return [done]
        self._left_out.pop(request_id, None)
        return [Error(request_id, event.code, event.message)]

    def load(self, request: Load) -> Loaded | Error:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        started = time.monotonic()
        if self._batcher is not None and self._batcher.running:
            return Error(request.id, "busy", "generations are running; load after they end")
        self._unload()
        try:
            model, context = open_model(
                request.path,
                n_ctx=request.n_ctx,
                n_threads=request.n_threads,
                n_gpu_layers=request.n_gpu_layers,
                parallel=max(1, request.parallel),
                n_batch=min(N_BATCH, request.n_ctx),
            )
        except (ValueError, RuntimeError, OSError) as exc:
            # The message goes to API clients: name the model, never its path.
            reason = str(exc).replace(request.path, request.model)
            return Error(request.id, "model_load_failed", f"llama.cpp could not load it: {reason}")
        template = model.metadata().get("tokenizer.chat_template")
        self._formatter = None
        markers = template_markers(model, template) if template else {}
        self._markers = list(markers)
        if template:
            eos = model.token_eos()
            bos = model.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
                add_generation_prompt=True,
            )
        self._model, self._context = model, context
        self._load_request = request
        self._batcher = Batcher(
            model,
            context,
            parallel=max(1, request.parallel),
            n_batch=min(N_BATCH, request.n_ctx),
            end_tokens=frozenset(markers.values()),
        )
        self._name = request.model
        return Loaded(
            id=request.id,
            model=request.model,
            n_ctx=self._batcher.n_ctx,
            chat_template=bool(template),
            load_seconds=round(time.monotonic() - started, 3),
        )

    def _unload(self) -> None:
        # The old model goes before the new one loads: two may not fit in memory.
        self._direct.close()
        for job in self._embeds:
            self.connection.send(Error(job.request_id, "model_unloaded", "the model was unloaded"))
        self._embeds.clear()
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self._batcher is not None:
            self._batcher.close()
        if self._context is not None:
            self._context.close()
        if self._model is not None:
            self._model.close()
        self._batcher = self._context = self._model = None

    def _tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def _render(self, messages: list[ChatMessage]) -> tuple[list[int], list[str]]:
        """A conversation's prompt tokens (its chat template, else the fallback format) and
        the stop strings that go with the format."""
        if self._formatter is not None:
            rendered = self._formatter(
                messages=[{"role": m.role, "content": m.content} for m in messages]
            )
            tokens = self._tokenize(
                rendered.prompt, add_bos=not rendered.added_special, special=True
            )
            stops = rendered.stop or []
            return tokens, [*([stops] if isinstance(stops, str) else stops), *self._markers]
        prompt = fallback_prompt(messages)
        return self._tokenize(prompt, add_bos=True, special=False), FALLBACK_STOP

    def _prompt_tokens(self, request: Generate, n_ctx: int) -> tuple[list[int], list[str], int]:
        """The prompt's tokens, its stop strings and the turns left out of it to fit the
        context (appliance.llm.fitting); DoesNotFit when nothing can."""
        if request.messages is None:
            return self._tokenize(request.prompt or "", add_bos=True, special=False), [], 0
        stops: list[str] = []

        def render(messages: list[ChatMessage]) -> list[int]:
            tokens, stops[:] = self._render(messages)
            return tokens

        tokens, left_out = fit_conversation(request.messages, render, n_ctx, request.max_tokens)
        return tokens, stops, left_out

    def start(self, request: Generate) -> None:
        send = self.connection.send
        batcher = self._batcher
        self._last_started = max(self._last_started, request.id)
        if batcher is None:
            send(Error(request.id, "model_not_loaded", "no model is loaded"))
            return
        if request.id in self.cancelled:
            self.cancelled.discard(request.id)
            send(Done(request.id, "cancelled", 0, 0))
            return
        n_ctx = batcher.n_ctx
        try:
            tokens, template_stop, left_out = self._prompt_tokens(request, n_ctx)
        except DoesNotFit as exc:
            send(
                Error(
                    request.id,
                    "context_length_exceeded",
                    f"the last message is {exc.tokens} tokens with the system prompt and the "
                    f"chat template; this model's context holds {n_ctx}. Shorten the message",
                )
            )
            return
        except Exception as exc:
            # Jinja's sandbox raises SecurityError and other TemplateErrors; a model's
            # template is data from the file, so any failure is the template's.
            send(Error(request.id, "template_error", f"the model's chat template failed: {exc}"))
            return
        if len(tokens) + 1 > n_ctx:
            send(
                Error(
                    request.id,
                    "context_length_exceeded",
                    f"the prompt is {len(tokens)} tokens; this model's context holds {n_ctx}. "
                    "Shorten the conversation or start a new one",
                )
            )
            return
        options = request.options or SamplingOptions()
        unknown = [t for t, _ in options.logit_bias if not 0 <= t < batcher.n_vocab]
        if unknown:
            send(
                Error(
                    request.id,
                    "invalid_logit_bias",
                    f"logit_bias names token {unknown[0]}, which this model does not have "
                    f"(its token ids are 0 to {batcher.n_vocab - 1})",
                )
            )
            return
        sampling = Sampling(
            max_tokens=min(request.max_tokens, n_ctx - len(tokens)),
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=(*request.stop, *template_stop),
            top_k=request.top_k,
            min_p=request.min_p,
            repeat_penalty=request.repeat_penalty,
            # The request's presence penalty, else its model's (the engine picked it).
            presence_penalty=request.presence_penalty,
            grammar=options.grammar,
            close_json=options.close_json,
            logit_bias=tuple(options.logit_bias),
            frequency_penalty=options.frequency_penalty,
            top_logprobs=options.top_logprobs,
        )
        try:
            batcher.start(request.id, tokens, sampling)
        except BatchFull as exc:
            send(Error(request.id, "busy", f"the worker is full ({exc}); retry"))
            return
        except GrammarError as exc:
            send(Error(request.id, "invalid_grammar", f"{exc}; check the grammar's syntax"))
            return
        if left_out:
            self._left_out[request.id] = left_out

    def embed(self, request: Embed) -> None:
        """Queue an embedding request; `_embed_step` runs it a batch at a time."""
        self._last_started = max(self._last_started, request.id)
        model, load = self._model, self._load_request
        if model is None or load is None:
            self.connection.send(Error(request.id, "model_not_loaded", "no model is loaded"))
            return
        if request.id in self.cancelled:
            self.cancelled.discard(request.id)
            self.connection.send(Done(request.id, "cancelled", 0, 0))
            return
        try:
            if self._embedder is None:
                self._embedder = Embedder(model, n_ctx=load.n_ctx, n_threads=load.n_threads)
            inputs = [self._tokenize(t, add_bos=True, special=False) for t in request.texts]
            inputs += [list(tokens) for tokens in request.tokens]
            self._embedder.check(inputs)
        except EmbedInputError as exc:
            self.connection.send(Error(request.id, "invalid_input", str(exc)))
            return
        except (ValueError, RuntimeError) as exc:
            self.connection.send(
                Error(request.id, "embeddings_failed", f"llama.cpp could not embed: {exc}")
            )
            return
        self._embeds.append(_EmbedJob(request.id, inputs, self._embedder.parts(inputs)))

    def _embed_step(self) -> None:
        """One batch of the oldest embedding request (one decode)."""
        if not self._embeds:
            return
        job = self._embeds[0]
        try:
            part = next(job.parts)
        except RuntimeError as exc:
            self._embeds.popleft()
            self.connection.send(
                Error(job.request_id, "embeddings_failed", f"llama.cpp failed: {exc}")
            )
            return
        last = part.first + part.count >= len(job.inputs)
        if last:
            self._embeds.popleft()
        self.connection.send(
            Embedded(
                job.request_id,
                part.first,
                part.count,
                part.dims,
                part.vectors,
                part.tokens,
                last,
            )
        )


def run_worker(fd: int) -> int:
    """Entry point of the worker process; returns when the supervisor closes the socket."""
    # `LEVEL:logger:message` lines: the supervisor logs each at the level it names.
    logging.basicConfig(
        level=os.environ.get("APPLIANCE_LOG_LEVEL", "INFO"), stream=sys.stderr, format=LOG_FORMAT
    )
    llama_log = LlamaLog()
    llama_log.install()
    sock = socket.socket(fileno=fd)
    worker = Worker(Connection(sock))
    threading.Thread(target=worker.read_forever, name="frames", daemon=True).start()
    worker.serve()
    return 0
