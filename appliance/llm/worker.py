"""`appliance worker`: the child process where llama.cpp runs, and only there.

A crash in llama.cpp (a bad model, a kernel bug, an OOM kill) ends this process only; the
supervisor answers the requests in flight with 503 and starts a new worker. The worker
reads frames on a reader thread, so a Cancel is seen while a generation runs, and checks
for it before every token it sends.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

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
    decode_to_worker,
    encode_frame,
)

LOGGER = logging.getLogger("appliance.worker")

# Format used when a model carries no chat template of its own.
FALLBACK_STOP: Final = ["\n### User:", "\n### System:"]


def fallback_prompt(messages: list[ChatMessage]) -> str:
    parts = [f"### {m.role.capitalize()}:\n{m.content}\n" for m in messages]
    return "".join(parts) + "### Assistant:\n"


class Connection:
    """Blocking frame I/O on the socket the supervisor handed us."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._frames = FrameBuffer()

    def send(self, message: FromWorker) -> None:
        data = encode_frame(message)
        with self._send_lock:
            self._sock.sendall(data)

    def receive(self) -> Iterator[ToWorker]:
        while True:
            data = self._sock.recv(65536)
            if not data:
                return
            for body in self._frames.feed(data):
                yield decode_to_worker(body)


class Worker:
    """Holds at most one loaded model and runs one generation at a time."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.inbox: queue.Queue[ToWorker | None] = queue.Queue()
        self.cancelled: set[int] = set()
        self._llm: Any = None
        self._formatter: Any = None
        self._model = ""

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
        while True:
            message = self.inbox.get()
            if message is None:
                return
            try:
                if isinstance(message, Load):
                    self.connection.send(self.load(message))
                elif isinstance(message, Generate):
                    self.generate(message)
            except BrokenPipeError:
                return
            except Exception as exc:
                # One bad request must not take the loaded model down with the process.
                LOGGER.exception("request %d failed in the worker", message.id)
                self.connection.send(
                    Error(message.id, "internal_error", f"the worker failed: {type(exc).__name__}")
                )

    def load(self, request: Load) -> Loaded | Error:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        started = time.monotonic()
        self._llm = None
        try:
            llm = Llama(
                model_path=request.path,
                n_ctx=request.n_ctx,
                n_threads=request.n_threads,
                n_threads_batch=request.n_threads,
                n_gpu_layers=request.n_gpu_layers,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            # The message goes to API clients: name the model, never its path.
            reason = str(exc).replace(request.path, request.model)
            return Error(request.id, "model_load_failed", f"llama.cpp could not load it: {reason}")
        template = llm.metadata.get("tokenizer.chat_template")
        self._formatter = None
        if template:
            eos = llm.token_eos()
            bos = llm.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
                add_generation_prompt=True,
            )
        self._llm = llm
        self._model = request.model
        return Loaded(
            id=request.id,
            model=request.model,
            n_ctx=llm.n_ctx(),
            chat_template=bool(template),
            load_seconds=round(time.monotonic() - started, 3),
        )

    def _prompt_tokens(self, request: Generate) -> tuple[list[int], list[str]]:
        llm = self._llm
        if request.messages is None:
            text = request.prompt or ""
            return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False), []
        if self._formatter is not None:
            rendered = self._formatter(
                messages=[{"role": m.role, "content": m.content} for m in request.messages]
            )
            tokens = llm.tokenize(
                rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
            )
            return tokens, list(rendered.stop or [])
        prompt = fallback_prompt(request.messages)
        return llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False), FALLBACK_STOP

    def generate(self, request: Generate) -> None:
        send = self.connection.send
        if self._llm is None:
            send(Error(request.id, "model_not_loaded", "no model is loaded"))
            return
        try:
            tokens, template_stop = self._prompt_tokens(request)
        except Exception as exc:
            # Jinja's sandbox raises SecurityError and other TemplateErrors; a model's
            # template is data from the file, so any failure is the template's.
            send(Error(request.id, "template_error", f"the model's chat template failed: {exc}"))
            return
        n_ctx = self._llm.n_ctx()
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
        max_tokens = min(request.max_tokens, n_ctx - len(tokens))
        completion = 0
        finish = "length"
        stream = self._llm.create_completion(
            prompt=tokens,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=[*request.stop, *template_stop] or None,
            seed=request.seed,
            stream=True,
        )
        try:
            for chunk in stream:
                if request.id in self.cancelled:
                    finish = "cancelled"
                    break
                choice = chunk["choices"][0]
                text = choice.get("text") or ""
                if text:
                    completion += 1
                    send(Token(request.id, text))
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        except (ValueError, RuntimeError) as exc:
            send(Error(request.id, "generation_failed", f"llama.cpp failed: {exc}"))
            return
        finally:
            stream.close()
            self.cancelled.discard(request.id)
        send(Done(request.id, finish, len(tokens), completion))


def run_worker(fd: int) -> int:
    """Entry point of the worker process; returns when the supervisor closes the socket."""
    logging.basicConfig(level=os.environ.get("APPLIANCE_LOG_LEVEL", "INFO"), stream=sys.stderr)
    sock = socket.socket(fileno=fd)
    worker = Worker(Connection(sock))
    threading.Thread(target=worker.read_forever, name="frames", daemon=True).start()
    worker.serve()
    return 0
