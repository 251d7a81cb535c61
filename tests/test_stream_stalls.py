"""Clients that stop reading their streams, on the real daemon with the tiny model.

A stream's client that takes no bytes (a small receive buffer it never reads) must lose the
stream after APPLIANCE_STREAM_STALL_SECONDS: its generation cancelled, its slot and budget
reservation freed, the log saying why. Meanwhile another key is served: one key's share of
the slots leaves room for others.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any, Final

import httpx
import pytest
import trio

from tests.harness import Daemon, install_tiny_model, running_daemon, short_tempdir

STALL_SECONDS: Final = 3
# Each stream asks for this many tokens: far more bytes than the socket buffers hold.
STREAM_TOKENS: Final = 400
RECEIVE_BUFFER: Final = 2048


async def _non_reading_stream(
    daemon: Daemon, key: str, extra_headers: str = ""
) -> trio.socket.SocketType:
    """A streamed chat completion whose client never reads a byte of the answer."""
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    await sock.connect((host, int(port)))
    body = json.dumps(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "tell me a long story"}],
            "max_tokens": STREAM_TOKENS,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra_headers}\r\n"
    ).encode()
    await sock.send(head + body)
    return sock


async def _wait_for_llm(
    client: httpx.AsyncClient, predicate: Callable[[dict[str, Any]], bool]
) -> None:
    while not predicate((await client.get("/api/v1/health/metrics")).json()["llm"]):  # noqa: ASYNC110 - another process
        await trio.sleep(0.05)


async def _ended(sock: trio.socket.SocketType) -> bool:
    """Whether the server ended the connection: what it had sent, then EOF or a reset."""
    try:
        while await sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize(
    "share",
    [
        "0",  # the default: a key may run APPLIANCE_PARALLEL - 1 generations at once
        "4",  # one key may take every slot: the stall limit alone frees them
    ],
)
async def test_streams_that_are_not_read_lose_their_slots_and_others_are_served(
    share: str,
) -> None:
    env = {
        "APPLIANCE_STREAM_STALL_SECONDS": str(STALL_SECONDS),
        "APPLIANCE_PARALLEL_PER_KEY": share,
    }
    state = short_tempdir()
    # Room in the context for four whole answers: none is cut short for lack of it.
    install_tiny_model(state / "models", context_length=4096)
    with trio.fail_after(120):
        async with (
            running_daemon(env, state_dir=state) as daemon,
            daemon.client(timeout=30) as admin,
        ):
            greedy = await daemon.create_key("greedy", tokens_per_day=100_000)
            other = await daemon.create_key("other")
            sockets = [await _non_reading_stream(daemon, greedy) for _ in range(4)]
            # All four are in (with the default share of 3 of the 4 slots, one waits).
            await _wait_for_llm(admin, lambda llm: llm["running"] + llm["queue_depth"] == 4)
            async with daemon.client(key=greedy) as client:
                reserved = (await client.get("/api/v1/usage")).json()["local"]["day"]
            assert reserved >= 4 * STREAM_TOKENS

            # Another key is served: at once, or once the stall limit freed a slot.
            started = trio.current_time()
            async with daemon.client(key=other, timeout=None) as client:
                with trio.fail_after(STALL_SECONDS + 15):
                    answer = await client.post(
                        "/api/v1/chat/send", json={"message": "hello", "max_tokens": 4}
                    )
            assert answer.status_code == 200, answer.text
            assert trio.current_time() - started < STALL_SECONDS + 15

            # Each stream stalls in turn (the fourth once it got a slot): the generations
            # are cancelled, the slots free, the connections closed. (Reading a socket
            # before would take data from it: that client would not be stalled.)
            with trio.fail_after(4 * STALL_SECONDS + 30):
                await _wait_for_llm(admin, lambda llm: not llm["running"] + llm["queue_depth"])
            with trio.fail_after(30):
                for sock in sockets:
                    assert await _ended(sock)
                    sock.close()

            # The reservations were given back: what is charged is what was sent.
            async with daemon.client(key=greedy) as client:
                charged = (await client.get("/api/v1/usage")).json()["local"]["day"]
                assert charged < reserved / 2, (charged, reserved)
                # The key itself is served again (its slots are free).
                again = await client.post(
                    "/api/v1/chat/send", json={"message": "again", "max_tokens": 4}
                )
                assert again.status_code == 200, again.text

    stalls = [
        line
        for line in daemon.log_lines()
        if line.get("level") == "WARNING" and "stream stalled" in line.get("message", "")
    ]
    assert len(stalls) == 4, stalls
    assert all("APPLIANCE_STREAM_STALL_SECONDS" in line["message"] for line in stalls)
    # Each names the request it ended.
    assert len({line.get("request_id") for line in stalls}) == 4
    access = [
        line
        for line in daemon.log_lines()
        if line.get("logger") == "appliance.access"
        and line.get("endpoint") == "/v1/chat/completions"
    ]
    # A stalled stream's access line comes when it ends: after the stall time.
    assert len(access) == 4
    assert all(line["duration_ms"] >= STALL_SECONDS * 1000 for line in access), access


async def test_a_stalled_stream_behind_a_trusted_proxy_is_closed_too() -> None:
    # The client address the app sees is the one the proxy forwarded; the connection to
    # reset is the proxy's.
    env = {
        "APPLIANCE_STREAM_STALL_SECONDS": str(STALL_SECONDS),
        "APPLIANCE_TRUSTED_PROXIES": "127.0.0.1",
    }
    with trio.fail_after(60):
        async with running_daemon(env) as daemon, daemon.client() as admin:
            sock = await _non_reading_stream(
                daemon, daemon.api_key, "X-Forwarded-For: 203.0.113.7\r\n"
            )
            await _wait_for_llm(admin, lambda llm: llm["running"] == 1)
            await _wait_for_llm(admin, lambda llm: not llm["running"])
            with trio.fail_after(STALL_SECONDS + 15):
                assert await _ended(sock)
            sock.close()
    [stalled] = [line for line in daemon.log_lines() if "stream stalled" in line.get("message", "")]
    assert not any("already closed" in line.get("message", "") for line in daemon.log_lines())
    assert stalled["level"] == "WARNING"
