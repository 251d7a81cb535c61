"""What the daemon logs about requests and its model, on the real daemon.

A stream's access line comes at its end, with the stream's duration; a request's id stays
on the lines of that request (services it restarts do not carry it on); llama.cpp's load
chatter is at DEBUG, its warnings kept.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from typing import Any, Final

import pytest
import trio

from appliance.llm.batching import open_model
from appliance.llm.llama_log import LlamaLog
from tests.harness import Daemon, install_tiny_model, running_daemon, short_tempdir

# Lines of llama.cpp's own that a model load writes (context, tensors, buffers, graphs).
LLAMA_CHATTER: Final = ("llama_context", "llama_kv_cache", "graph_reserve", "sched_reserve")


async def _slowly_read_stream(daemon: Daemon, body: dict[str, Any]) -> tuple[str, float]:
    """POST a streamed completion and read it a little at a time (a client on a slow
    link): the answer's request id and how long the whole stream took."""
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    await sock.connect((host, int(port)))
    data = json.dumps(body).encode()
    started = trio.current_time()
    await sock.send(
        (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {daemon.api_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        + data
    )
    received = b""
    # To the end of the chunked body (the last chunk has size 0).
    while not received.endswith(b"\r\n0\r\n\r\n"):
        chunk = await sock.recv(1024)
        assert chunk, received[-200:]
        received += chunk
        await trio.sleep(0.02)
    sock.close()
    head = received.split(b"\r\n\r\n", 1)[0].decode().lower()
    request_id = head.split("x-request-id: ", 1)[1].split("\r\n", 1)[0]
    assert b"[DONE]" in received
    return request_id, trio.current_time() - started


async def test_a_streams_access_line_has_the_streams_duration() -> None:
    with trio.fail_after(120):
        async with running_daemon() as daemon:
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "a long answer please"}],
                "max_tokens": 450,
                "temperature": 0,
                "stream": True,
            }
            request_id, seconds = await _slowly_read_stream(daemon, body)
    [line] = [
        line
        for line in daemon.log_lines()
        if line.get("logger") == "appliance.access" and line.get("request_id") == request_id
    ]
    assert seconds > 1.0  # the stream took that long: the client read it slowly
    # Measured to the stream's end (the client saw the last bytes a little after).
    assert line["duration_ms"] >= 0.7 * seconds * 1000, (line, seconds)
    assert line["status"] == 200


async def test_a_requests_id_does_not_follow_the_services_it_restarted() -> None:
    restore_id = "req-restore-context-check"
    with trio.fail_after(120):
        async with running_daemon() as daemon, daemon.client(timeout=60) as client:
            made = await client.post("/api/v1/admin/backups")
            assert made.status_code == 201, made.text
            restored = await client.post(
                "/api/v1/admin/restore",
                json={"archive": made.json()["name"]},
                headers={"X-Request-ID": restore_id},
            )
            assert restored.status_code == 200, restored.text
            # Later work of the restarted store: a snapshot makes redis-server log lines.
            again = await client.post(
                "/api/v1/admin/backups", headers={"X-Request-ID": "req-after-restore"}
            )
            assert again.status_code == 201, again.text
            await trio.sleep(1)  # redis-server's lines about the background save
    lines = daemon.log_lines()
    [answered] = [
        n
        for n, line in enumerate(lines)
        if line.get("logger") == "appliance.access" and line.get("request_id") == restore_id
    ]
    later = [line for line in lines[answered + 1 :] if line.get("request_id") == restore_id]
    assert later == []
    redis_after = [
        line for line in lines[answered + 1 :] if line.get("logger") == "appliance.redis"
    ]
    assert redis_after, "no redis-server lines after the restore to check"
    assert all("request_id" not in line for line in redis_after), redis_after


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
async def test_llama_cpp_load_chatter_is_debug(level: str) -> None:
    with trio.fail_after(60):
        async with running_daemon({"APPLIANCE_LOG_LEVEL": level}) as daemon:
            pass
    chatter = [
        line
        for line in daemon.log_lines()
        if any(word in line.get("message", "") for word in LLAMA_CHATTER)
    ]
    if level == "INFO":
        assert chatter == []
    else:
        assert chatter and all(line["level"] == "DEBUG" for line in chatter)


def test_llama_cpp_warnings_stay_warnings(caplog: pytest.LogCaptureFixture) -> None:
    path = install_tiny_model(short_tempdir())
    log = LlamaLog(logging.getLogger("appliance.llama.test"))
    log.install()
    try:
        with caplog.at_level(logging.DEBUG, logger="appliance.llama.test"):
            # Larger than the tiny model was trained for (512): llama.cpp warns.
            model, context = open_model(
                str(path), n_ctx=2048, n_threads=1, n_gpu_layers=0, parallel=1, n_batch=64
            )
            context.close()
            model.close()
    finally:
        LlamaLog().install()
    by_level: dict[int, list[str]] = {}
    for record in caplog.records:
        by_level.setdefault(record.levelno, []).append(record.getMessage())
    assert any("n_ctx_train" in text for text in by_level[logging.WARNING])
    assert any("llama_context" in text for text in by_level[logging.DEBUG])
    assert logging.INFO not in by_level
    # Pieces of one message (llama.cpp continues a line in CONT pieces) make one line each.
    assert all("\n" not in text for texts in by_level.values() for text in texts)


def test_pieces_make_whole_lines(caplog: pytest.LogCaptureFixture) -> None:
    log = LlamaLog(logging.getLogger("appliance.llama.pieces"))
    with caplog.at_level(logging.DEBUG, logger="appliance.llama.pieces"):
        log.receive(2, "loading")
        log.receive(5, ".")
        log.receive(5, ".\n")
        log.receive(3, "careful: ")
        log.receive(5, "n_ctx too big\nsecond line\n")
        log.receive(4, "broken")
        log.flush()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "loading.."),
        (logging.WARNING, "careful: n_ctx too big"),
        (logging.WARNING, "second line"),
        (logging.ERROR, "broken"),
    ]


def test_an_installed_log_outlives_its_callers_reference() -> None:
    """llama.cpp keeps only the callback's C pointer: a log installed and then dropped by its
    caller must still be there at the next model load (a collected callback crashes it)."""
    path = install_tiny_model(short_tempdir())
    script = (
        "import gc, sys\n"
        "from appliance.llm.batching import open_model\n"
        "from appliance.llm.llama_log import LlamaLog\n"
        "LlamaLog().install()\n"
        "gc.collect()\n"
        "for _ in range(3):\n"
        "    model, context = open_model(sys.argv[1], n_ctx=256, n_threads=1,"
        " n_gpu_layers=0, parallel=1, n_batch=64)\n"
        "    context.close(); model.close()\n"
        "print('loaded')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "loaded"
