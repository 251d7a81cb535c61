"""The supervisor's side of a streamed answer whose token events its worker writes to the
client's connection itself (the worker's side: appliance.llm.direct_writes).

Every token event that crosses the supervisor costs it a wakeup and about 0.3 ms of
Python (trio, the generator chain, hypercorn and h11); on a box whose cores all decode,
that time is taken from llama.cpp's threads: 5% of a SmolLM2 stream on 2 cores. So a
streamed answer whose events are all alike (a template around the token's text) is
offered to its worker once its response has begun: the route gives the template, the
response gives the connection (a duplicate of its socket, for plain HTTP/1.1 only), and
the model's generator sends both (`Attach`), after which it hears of the answer again
at its end, or when the worker gives the stream back (`Detached`) because the client
fell behind.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

from appliance.llm.protocol import Attach, Detached, Token
from appliance.llm.worker_link import WorkerLink


class Handoff:
    """One streamed local generation's offer; `ready` once both sides have given theirs."""

    __slots__ = ("connection", "head", "tail", "worker_events", "write_back")

    def __init__(self) -> None:
        # The SSE event of a token, split around its text as a JSON string (the route's).
        self.head: bytes | None = None
        self.tail = b""
        # A duplicate of the client's socket (the response's), and how the response
        # writes bytes the worker gave back, ahead of anything else.
        self.connection: socket.socket | None = None
        self.write_back: Callable[[bytes], Awaitable[None]] | None = None
        # Token events the worker wrote (or gave back unwritten) in the stream's place.
        self.worker_events = 0

    def offer(self, head: bytes, tail: bytes) -> None:
        """The route's part: every token event is `head` + JSON text + `tail`."""
        self.head, self.tail = head, tail

    @property
    def wanted(self) -> bool:
        """The route offered its events; the response may give the connection."""
        return self.head is not None

    @property
    def ready(self) -> bool:
        return self.head is not None and self.connection is not None


class Handing:
    """Where a generation (appliance.llm.model_worker) stands with its handoff: waiting
    for it to be ready, offered (Token frames are held until the worker answers: it may
    be writing them), attached, or given back."""

    __slots__ = ("_handoff", "_held", "_state", "_yielded")

    def __init__(self, handoff: Handoff | None) -> None:
        self._handoff = handoff
        self._state = "waiting" if handoff is not None else "none"
        self._held: list[Token] = []
        self._yielded = 0  # Token events given to the caller, so written

    @property
    def due(self) -> bool:
        return self._state == "waiting" and self._handoff is not None and self._handoff.ready

    async def attach(self, link: WorkerLink, request_id: int) -> None:
        handoff = self._handoff
        assert handoff is not None and handoff.head is not None and handoff.connection
        self._state = "offered"
        attach = Attach(request_id, self._yielded, handoff.head, handoff.tail)
        await link.send(attach, handoff.connection.fileno())

    def holds(self, token: Token) -> bool:
        """Whether `token` waits for the worker's answer (else it is given to the caller)."""
        if self._state == "offered":
            self._held.append(token)
            return True
        self._yielded += 1
        return False

    def attached(self) -> int:
        """The worker took over: the held Token frames are its to write; how many."""
        self._state = "attached"
        held = len(self._held)
        self._held.clear()
        return held

    def detached(self, event: Detached) -> int:
        self._state = "back"
        return self.counted(event.written_events)

    def never_attached(self) -> list[Token]:
        """The held Token frames, when the generation ended before the worker took it."""
        held, self._held = self._held, []
        return held

    def counted(self, events: int) -> int:
        if self._handoff is not None:
            self._handoff.worker_events += events
        return events
