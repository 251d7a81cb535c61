"""The worker's end of its socket to the supervisor: frames in and out, and the client
connections' descriptors that come with Attach frames (SCM_RIGHTS)."""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from appliance.llm.protocol import (
    Attach,
    FrameBuffer,
    FromWorker,
    ToWorker,
    decode_to_worker,
    encode_frame,
)

# Descriptors one read of the supervisor's socket may carry (one an Attach frame).
MAX_DESCRIPTORS: Final = 64


@dataclass(frozen=True)
class AttachWith:
    """An Attach frame and the connection's descriptor that came with it."""

    message: Attach
    fd: int


class Connection:
    """Blocking frame I/O on the socket the supervisor handed us."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._frames = FrameBuffer()

    def send(self, *messages: FromWorker) -> None:
        """Frames in one write: the events of a decode step wake the supervisor once."""
        data = b"".join(encode_frame(message) for message in messages)
        with self._send_lock:
            self._sock.sendall(data)

    def receive(self) -> Iterator[ToWorker | AttachWith]:
        """Frames in order; each Attach with the next descriptor that came (in order too:
        each was sent with its own frame)."""
        descriptors: deque[int] = deque()
        while True:
            data, fds, _, _ = socket.recv_fds(self._sock, 65536, MAX_DESCRIPTORS)
            descriptors.extend(fds)
            if not data:
                for fd in descriptors:
                    os.close(fd)
                return
            for body in self._frames.feed(data):
                message = decode_to_worker(body)
                if not isinstance(message, Attach):
                    yield message
                elif descriptors:
                    yield AttachWith(message, descriptors.popleft())
