"""Token events a worker writes to a client's connection itself (the supervisor's side and
why: appliance.llm.handoff).

An attached generation's events are written right after the decode step that made
them, each whole, in HTTP/1.1 chunked framing, without waiting: a write that would block
(the client fell behind) or fails gives the stream back to the supervisor (Detached,
with the bytes not written), which writes the rest as before, its stall watch included.
The events the supervisor's Token frames carried before the worker took over are
written first, from the one the supervisor had not written yet (`Attach.written`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Final

import msgspec

from appliance.llm.protocol import Attach, Attached, Detached, FromWorker

_JSON: Final = msgspec.json.Encoder()
_SEND_FLAGS: Final = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


class _Writer:
    """One attached generation's connection and what was written to it."""

    def __init__(self, fd: int, head: bytes, tail: bytes) -> None:
        # Never made blocking or given a timeout here: the flag is the connection's own,
        # shared with the supervisor's descriptor.
        self._sock = socket.socket(fileno=fd)
        self._head = head
        self._tail = tail
        self.texts: list[str] = []

    def write(self, texts: list[str]) -> bytes:
        """Write the events of `texts` at once; the bytes that could not be written."""
        if not texts:
            return b""
        self.texts += texts
        chunks = []
        for text in texts:
            event = self._head + _JSON.encode(text) + self._tail
            chunks.append(b"%x\r\n%b\r\n" % (len(event), event))
        data = b"".join(chunks)
        try:
            sent = self._sock.send(data, _SEND_FLAGS)
        except OSError:  # would block, or the connection failed: the supervisor will see
            sent = 0
        return data[sent:]

    def close(self) -> None:
        self._sock.close()


class DirectWrites:
    """The worker's attached generations, and the texts of the Token frames it sent (an
    Attach may ask for some of them again)."""

    def __init__(self) -> None:
        self._sent: dict[int, list[str]] = {}
        self._writers: dict[int, _Writer] = {}

    def token(self, request_id: int, text: str) -> list[FromWorker] | None:
        """Write a token event of an attached generation: no frame when written, Detached
        when not (whole); None when the generation is not attached (send its Token)."""
        writer = self._writers.get(request_id)
        if writer is None:
            self._sent.setdefault(request_id, []).append(text)
            return None
        pending = writer.write([text])
        if not pending:
            return []
        return [self._detach(request_id, pending)]

    def attach(self, message: Attach, fd: int, running: bool) -> list[FromWorker]:
        """Take over a running generation's events (the descriptor is closed otherwise:
        its Done has gone, and the supervisor writes everything itself)."""
        if not running or message.id in self._writers:
            os.close(fd)
            return []
        writer = _Writer(fd, message.head, message.tail)
        self._writers[message.id] = writer
        sent = self._sent.get(message.id, [])
        pending = writer.write(sent[max(0, message.written) :])
        frames: list[FromWorker] = [Attached(message.id)]
        if pending:
            frames.append(self._detach(message.id, pending))
        return frames

    def end(self, request_id: int) -> tuple[str, int]:
        """A generation ended: the text and number of the events its connection got from
        here (the descriptor is closed)."""
        self._sent.pop(request_id, None)
        writer = self._writers.pop(request_id, None)
        if writer is None:
            return "", 0
        writer.close()
        return "".join(writer.texts), len(writer.texts)

    def close(self) -> None:
        for writer in self._writers.values():
            with contextlib.suppress(OSError):
                writer.close()
        self._writers.clear()
        self._sent.clear()

    def _detach(self, request_id: int, pending: bytes) -> Detached:
        writer = self._writers.pop(request_id)
        writer.close()
        texts = writer.texts
        return Detached(request_id, pending, written_text="".join(texts), written_events=len(texts))
