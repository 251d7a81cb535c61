"""What access control costs: API-key authentication plus budget accounting per request.

Two real daemons with the tiny test model, taking turns in rounds of the same run: "on" as
shipped (a key checked against its keyed hash, the failed-attempt and rate counters, a
token budget reserved before and settled after each generation) and "off"
(APPLIANCE_AUTH=off, BUDGET_ENFORCE=false: no key, no counters, no budget). Measured on
POST /v1/chat/completions with max_tokens 1 (authentication + budget) and on GET /v1/models
(authentication alone).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import httpx
from bench_privacy import percentile
from harness import REPO, Daemon, note, result, short_tempdir

# tests/ is not installed; the tiny model writer lives there.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.tiny_gguf import write_tiny_llama

NAME: Final = "auth"
MODES: Final = ("on", "off")
COMMON_ENV: Final = {
    "SECRET_KEY": "bench-secret-key-" + "k" * 40,
    "PRIVACY_SALT": "bench-privacy-salt",
    "APPLIANCE_THREADS": "1",
}
MODE_ENV: Final[dict[str, dict[str, str]]] = {
    # A budget every request reserves against, and a rate limit it counts against, both
    # too large to refuse anything here.
    "on": {
        "APPLIANCE_TOKENS_PER_DAY": "1000000000",
        "APPLIANCE_TOKENS_PER_MONTH": "1000000000",
        "APPLIANCE_RATE_LIMIT": "100000000",
    },
    "off": {"APPLIANCE_AUTH": "off", "BUDGET_ENFORCE": "false"},
}
ENDPOINTS: Final[dict[str, tuple[str, str, dict[str, Any] | None]]] = {
    "chat_completion": (
        "POST",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    ),
    "models": ("GET", "/v1/models", None),
}
WARMUP: Final = 20
REQUEST_TIMEOUT: Final = 30.0


def run(quick: bool) -> Iterator[dict[str, Any]]:
    requests, rounds = (200, 4) if quick else (1000, 10)
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(short_tempdir()) / "tiny.gguf"
        write_tiny_llama(model)
        clients = {mode: _client(stack, mode, model) for mode in MODES}
        for endpoint in ENDPOINTS:
            yield from _compare(clients, endpoint, requests, rounds)


def _client(stack: contextlib.ExitStack, mode: str, model: Path) -> httpx.Client:
    state = stack.enter_context(short_tempdir())
    (state / "models").mkdir()
    (state / "models" / "tiny.gguf").write_bytes(model.read_bytes())
    daemon = stack.enter_context(Daemon(state, env={**COMMON_ENV, **MODE_ENV[mode]}))
    daemon.start()
    daemon.wait_ready()
    headers = daemon.auth() if mode == "on" else {}
    return stack.enter_context(
        httpx.Client(base_url=daemon.base_url, timeout=REQUEST_TIMEOUT, headers=headers)
    )


def _compare(
    clients: dict[str, httpx.Client], endpoint: str, requests: int, rounds: int
) -> Iterator[dict[str, Any]]:
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    round_p50s: dict[str, list[float]] = {mode: [] for mode in MODES}
    for mode in MODES:
        for _ in range(WARMUP):
            _timed(clients[mode], endpoint)
    per_round = max(1, requests // rounds)
    for round_ in range(rounds):
        # Alternate the order, so neither mode always runs right after the other.
        for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
            batch = [_timed(clients[mode], endpoint) for _ in range(per_round)]
            samples[mode] += batch
            round_p50s[mode].append(round(percentile(batch, 50), 3))
        note(
            f"{endpoint} round {round_ + 1}/{rounds}: p50 on {round_p50s['on'][-1]:.2f} ms, "
            f"off {round_p50s['off'][-1]:.2f} ms"
        )
    method, path, _ = ENDPOINTS[endpoint]
    common = {"endpoint": f"{method} {path}", "requests": len(samples["on"]), "rounds": rounds}
    for q in (50, 99):
        on, off = percentile(samples["on"], q), percentile(samples["off"], q)
        yield result(
            NAME,
            f"{endpoint}_auth_added_p{q}",
            round(on - off, 3),
            "ms",
            on=round(on, 3),
            off=round(off, 3),
            ratio=round(on / off, 3),
            round_p50s=round_p50s,
            **common,
        )


def _timed(client: httpx.Client, endpoint: str) -> float:
    method, path, body = ENDPOINTS[endpoint]
    started = time.perf_counter()
    response = client.request(method, path, json=body)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"{method} {path} answered {response.status_code}: {response.text}")
    return elapsed
