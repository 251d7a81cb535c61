"""Streamed answers whose token events the worker writes to the client's connection itself
(appliance.llm.handoff, appliance.llm.direct_writes), on the real daemon with the default
model (answering at length: see tests.test_worker_faults) and plain HTTP clients.

What a client sees must not change: the same events, one per token, in order, the same
end; what the daemon keeps (a stored conversation, the tokens charged) must not either.
HTTP/1.0 connections are never handed over (their bodies are not chunked): the same
request over HTTP/1.0 is the reference.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import psutil
import pytest
import trio

from tests.harness import Daemon
from tests.test_worker_faults import LONG_PROMPT, MODEL, WORKER, looping_daemon

# A plain prompt that the model goes on with until max_tokens.
COUNTING: Final = "1, 2, 3, 4, 5, 6, 7, 8,"

ROUTES: Final = ("/v1/chat/completions", "/v1/completions", "/api/v1/chat/send")


def _body(route: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if route == "/v1/completions":
        body["prompt"] = COUNTING
    elif route == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": LONG_PROMPT}]
    else:
        body["message"] = LONG_PROMPT
    return body


@dataclass
class Streamed:
    """What a client read: each SSE event's name and data, and what was seen meanwhile."""

    events: list[tuple[str, str]] = field(default_factory=list)
    worker_held_connection: bool = False
    complete: bool = False  # the body ended as its framing says (no truncation)

    def texts(self, route: str) -> list[str]:
        """The text of each token event, in order."""
        texts = []
        for name, data in self.events:
            if data == "[DONE]" or name == "error":
                continue
            body = json.loads(data)
            if route == "/api/v1/chat/send":
                if name == "token":
                    texts.append(body["text"])
            elif route == "/v1/completions":
                if body["choices"] and body["choices"][0]["finish_reason"] is None:
                    texts.append(body["choices"][0]["text"])
            elif body["choices"] and body["choices"][0]["delta"].get("content"):
                texts.append(body["choices"][0]["delta"]["content"])
        return texts


def _stream(
    daemon: Daemon,
    key: str,
    route: str,
    max_tokens: int,
    *,
    http10: bool = False,
    worker_pid: int = 0,
    receive_buffer: int = 0,
    on_event: Callable[[int], None] | None = None,
) -> Streamed:
    """Stream `route` with http.client (in a thread), noting whether the worker held this
    connection (its local address) while the events came."""
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    if http10:
        connection._http_vsn = 10  # type: ignore[attr-defined]
        connection._http_vsn_str = "HTTP/1.0"  # type: ignore[attr-defined]
    connection.connect()
    assert connection.sock is not None
    if receive_buffer:
        connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    local_port = connection.sock.getsockname()[1]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connection.request("POST", route, json.dumps(_body(route, max_tokens)), headers)
    response = connection.getresponse()
    assert response.status == 200, response.read()
    streamed = Streamed()
    name, data = "", ""
    try:
        while line := response.readline():
            text = line.decode().rstrip("\r\n")
            if text.startswith("event: "):
                name = text.removeprefix("event: ")
            elif text.startswith("data: "):
                data = text.removeprefix("data: ")
            elif not text and data:
                streamed.events.append((name, data))
                count = len(streamed.events)
                if worker_pid and not streamed.worker_held_connection and count > 2:
                    streamed.worker_held_connection = _holds(worker_pid, local_port)
                if on_event is not None:
                    on_event(count)
                name, data = "", ""
        streamed.complete = True
    except http.client.IncompleteRead:
        pass
    finally:
        connection.close()
    return streamed


def _holds(pid: int, client_port: int) -> bool:
    """Whether process `pid` has the server's end of the connection from `client_port`."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.raddr and c.raddr[1] == client_port for c in connections)


async def test_the_worker_writes_the_events_and_the_client_reads_what_it_read_before() -> None:
    with trio.fail_after(240):
        async with looping_daemon() as daemon:
            key = await daemon.create_key("reader", tokens_per_day=1_000_000)
            worker = await daemon.service_pid(WORKER)
            for route in ROUTES:
                direct = await trio.to_thread.run_sync(
                    lambda route=route: _stream(daemon, key, route, 120, worker_pid=worker)
                )
                plain = await trio.to_thread.run_sync(
                    lambda route=route: _stream(daemon, key, route, 120, http10=True)
                )
                assert direct.complete and plain.complete, route
                # The worker held the connection of the HTTP/1.1 stream while it ran...
                assert direct.worker_held_connection, route
                # ...and its client read the same token events, one per event, as the one
                # the supervisor wrote whole, then the same kind of end.
                assert len(direct.texts(route)) > 10, (route, direct.events[:3])
                assert direct.texts(route) == plain.texts(route), route
                assert [n for n, _ in direct.events[-2:]] == [n for n, _ in plain.events[-2:]]
                if route == "/api/v1/chat/send":
                    # The conversation keeps the answer the worker wrote.
                    done = json.loads(direct.events[-1][1])
                    async with daemon.client(key=key) as client:
                        path = f"/api/v1/conversations/{done['conversation_id']}"
                        stored = (await client.get(path)).json()["messages"]
                    assert stored[-1]["content"] == "".join(direct.texts(route))
                    # Every token event was counted for the key.
                    assert done["usage"]["completion_tokens"] >= len(direct.texts(route))
            # The worker let go of every connection it was given.
            assert not psutil.Process(worker).net_connections(kind="tcp")


async def test_a_client_that_falls_behind_gets_the_whole_answer() -> None:
    """The worker never waits for a client: a stream whose client stops reading is given
    back, and the supervisor writes what the worker could not."""
    route = "/v1/chat/completions"
    with trio.fail_after(240):
        async with looping_daemon() as daemon:
            key = await daemon.create_key("reader", tokens_per_day=1_000_000)
            worker = await daemon.service_pid(WORKER)
            reference = await trio.to_thread.run_sync(
                lambda: _stream(daemon, key, route, 600, http10=True)
            )

            def gave_back() -> bool:
                return any(
                    "gave the stream back" in str(line.get("message", ""))
                    for line in daemon.log_lines()
                )

            def stop_reading_until_given_back(count: int) -> None:
                # Not a fixed pause: how much the socket buffers take before a write would
                # block, and how fast the model fills them, vary with the machine's load.
                if count == 10:
                    deadline = time.monotonic() + 60
                    while not gave_back() and time.monotonic() < deadline:
                        time.sleep(0.05)

            slow = await trio.to_thread.run_sync(
                lambda: _stream(
                    daemon,
                    key,
                    route,
                    600,
                    worker_pid=worker,
                    receive_buffer=2048,
                    on_event=stop_reading_until_given_back,
                )
            )
            assert gave_back(), "the worker never gave the stream back: the test proves nothing"
            assert slow.complete
            assert slow.worker_held_connection
            assert slow.texts(route) == reference.texts(route)
            assert len(reference.texts(route)) > 100
            assert slow.events[-1] == ("", "[DONE]")


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/api/v1/chat/send"])
async def test_a_worker_killed_while_writing_ends_the_stream_with_an_error_event(
    route: str,
) -> None:
    with trio.fail_after(240):
        async with looping_daemon() as daemon:
            key = await daemon.create_key("reader", tokens_per_day=1_000_000)
            worker = await daemon.service_pid(WORKER)
            killed: list[int] = []

            def kill_when_held(count: int) -> None:
                if not killed and count > 8:
                    killed.append(count)
                    os.kill(worker, signal.SIGKILL)

            streamed = await trio.to_thread.run_sync(
                lambda: _stream(
                    daemon, key, route, 2000, worker_pid=worker, on_event=kill_when_held
                )
            )
            assert killed and streamed.worker_held_connection
            # The body ends whole (chunked framing intact) with the error event.
            assert streamed.complete
            name, data = streamed.events[-1]
            assert name == "error", streamed.events[-3:]
            assert json.loads(data)["error"]["code"] == "worker_crashed"
            # The next request is served by the new worker.
            async with daemon.client(key=key, timeout=60) as client:
                answer = await client.post(
                    "/api/v1/chat/send", json={"message": "again", "max_tokens": 4}
                )
            assert answer.status_code == 200, answer.text
