"""Continuous batching: aggregate decode rate with 1, 2, 4 and 8 concurrent streams through
the HTTP API, each against llama-cpp-python called directly for one stream in the same run,
and time to first token of the 10th turn of a conversation against the 1st (prefix reuse).

Same model, prompt and sampling as bench_llm (Gemma 3 270M Q4_K_M, greedy, every usable
core). The daemon runs as shipped: APPLIANCE_PARALLEL=4, so with 8 streams four wait.

When llama.cpp's own server is built (`make llama-server`: the llama.cpp that
llama-cpp-python vendors, with the same build flags; or LLAMA_SERVER=/path/to/llama-server)
the same streams are measured against it too (`-np 4`, continuous batching), so the
appliance's ratios sit beside the peer's, measured in the same run.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import httpx
from bench_llm import (
    CONCURRENT_MAX_TOKENS,
    DAEMON_ENV,
    DAEMON_LOG_LEVEL,
    MODEL,
    N_CTX,
    READY_TIMEOUT,
    REQUEST_TIMEOUT,
    THREADS,
    DirectBaseline,
    Stream,
    concurrent_streams,
    http_stream,
)
from harness import (
    Daemon,
    install_gemma,
    llama_server,
    llama_server_binary,
    note,
    result,
    short_tempdir,
)

NAME: Final = "batching"
STREAMS: Final = (1, 2, 4, 8)
GOAL_AT_4: Final = 1.9
TURNS: Final = 10
TURN_GOAL: Final = 1.5
TURN_MESSAGE: Final = "Tell me one more fact about the Roman Empire, in two sentences."
PARALLEL: Final = 4


def run(quick: bool) -> Iterator[dict[str, Any]]:
    rounds = 2 if quick else 4
    with short_tempdir() as state:
        model = install_gemma(state / "models", MODEL)
        with DirectBaseline(model, state / "direct.log") as direct:
            direct.generate(16)  # warm
            direct_tps = statistics.median(
                direct.generate(CONCURRENT_MAX_TOKENS).decode_tps for _ in range(rounds)
            )
        note(f"direct single stream: {direct_tps:.1f} tok/s")
        with Daemon(state, DAEMON_LOG_LEVEL, env=DAEMON_ENV) as daemon:
            daemon.start()
            daemon.wait_ready(READY_TIMEOUT)
            key = daemon.api_key()
            http_stream(daemon.port, 16, key=key)  # warm, and the prompt is cached
            yield from _streams("", daemon.port, key, rounds, direct_tps)
            yield from _turns(daemon, key)
        yield from _peer(model, state / "llama-server.log", rounds, direct_tps)


def _peer(model: Path, log_path: Path, rounds: int, direct_tps: float) -> Iterator[dict[str, Any]]:
    """The same streams against llama.cpp's own server, when it is built."""
    binary = llama_server_binary()
    if binary is None:
        return
    args = ["-t", str(THREADS), "-tb", str(THREADS), "-np", str(PARALLEL), "-c", str(N_CTX)]
    with llama_server(binary, model, log_path, *args, timeout=READY_TIMEOUT) as (port, _):
        http_stream(port, 16)  # warm
        yield from _streams("llama_server_", port, "", rounds, direct_tps)


def _streams(
    prefix: str, port: int, key: str, rounds: int, direct_tps: float
) -> Iterator[dict[str, Any]]:
    """Aggregate rate of 1, 2, 4 and 8 concurrent streams against the server at `port`
    (the appliance with `key`, or llama.cpp's server), each against the direct rate."""
    who = "llama.cpp server, " if prefix else ""
    for count in STREAMS:
        rates = [_aggregate(port, key, count) for _ in range(rounds)]
        aggregate = statistics.median(rate for rate, _ in rates)
        ratio = aggregate / direct_tps
        note(f"{who}{count} streams: {aggregate:.1f} tok/s, {ratio:.2f}x direct")
        extra: dict[str, Any] = {}
        if count == 4 and not prefix:
            extra = {"goal": f">= {GOAL_AT_4}", "meets_goal": ratio >= GOAL_AT_4}
        yield result(
            NAME,
            f"{prefix}aggregate_tps_{count}_streams",
            round(aggregate, 2),
            "tok/s",
            ratio_vs_direct_single=round(ratio, 3),
            direct_single_tps=round(direct_tps, 2),
            rounds=[round(rate, 2) for rate, _ in rates],
            errors=sum(failed for _, failed in rates),
            max_tokens=CONCURRENT_MAX_TOKENS,
            parallel=PARALLEL,
            **extra,
        )


def _aggregate(port: int, key: str, count: int) -> tuple[float, int]:
    """Tokens of `count` streams started together over the time from the first request to
    the last token, and how many streams failed."""

    def generate(max_tokens: int, **kw: Any) -> Stream:
        return http_stream(port, max_tokens, key=key, **kw)

    streams = concurrent_streams(generate, count, CONCURRENT_MAX_TOKENS)
    done = [s for s in streams if s.ok]
    if not done:
        return 0.0, count
    start = min(s.sent_at for s in done)
    end = max(s.sent_at + s.token_times[-1] for s in done)
    return sum(s.tokens for s in done) / (end - start), count - len(done)


def _turns(daemon: Daemon, key: str) -> Iterator[dict[str, Any]]:
    """One conversation of TURNS turns through /api/v1/chat/send, streamed: the time to
    the first token of each turn."""
    ttft: list[float] = []
    conversation: str | None = None
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=daemon.base_url, headers=headers, timeout=REQUEST_TIMEOUT) as client:
        for _ in range(TURNS):
            body: dict[str, Any] = {
                "message": TURN_MESSAGE,
                "max_tokens": 48,
                "temperature": 0,
                "stream": True,
                "model": MODEL,
            }
            if conversation:
                body["conversation_id"] = conversation
            first: float | None = None
            started = time.perf_counter()
            with client.stream("POST", "/api/v1/chat/send", json=body) as answer:
                event = ""
                for line in answer.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "token" and first is None:
                        first = time.perf_counter() - started
                    elif line.startswith("data: ") and event == "done":
                        conversation = json.loads(line[6:])["conversation_id"]
            if first is None:
                raise RuntimeError(f"turn {len(ttft) + 1} produced no token")
            ttft.append(first * 1000)
    ratio = ttft[-1] / ttft[0]
    note(f"turn 1 TTFT {ttft[0]:.1f} ms, turn {TURNS} {ttft[-1]:.1f} ms ({ratio:.2f}x)")
    yield result(
        NAME,
        f"ttft_turn_{TURNS}_vs_turn_1",
        round(ratio, 3),
        "ratio",
        ttft_ms=[round(value, 1) for value in ttft],
        goal=f"<= {TURN_GOAL}",
        meets_goal=ratio <= TURN_GOAL,
    )
