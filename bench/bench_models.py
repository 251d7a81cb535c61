"""Resident models and pulls, each figure against a baseline measured in the same run:

1. Switching between two resident models: time to first token of requests that alternate
   between SmolLM2-135M-Instruct and Gemma 3 270M, against the same kind of requests made
   to each model in a row (goal <= 1.1x: no load between them, each model in its worker).
2. Aggregate decode tokens/s of 2 streams to 2 different models (two copies of Gemma 3
   270M under two names: two workers) against 2 streams to one model (one worker, batched).
3. Pull throughput: `Puller.pull` (what `appliance models pull` and the daemon run: Range
   download, SHA-256 as it comes, the bounded header check, fsync, the atomic rename) from
   a loopback HTTP server, against `curl -o` of the same file from the same server (goal
   >= 0.8x), into a dir on the disk and into tmpfs. The server runs in a process of its own
   (tests/file_server.py).

Every request is greedy with a fresh prompt (no answer comes from a slot's prompt cache
that the other measurement would not have). Figures are medians over the rounds.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from bench_llm import (
    DAEMON_ENV,
    DAEMON_LOG_LEVEL,
    READY_TIMEOUT,
    REQUEST_TIMEOUT,
    Stream,
    http_stream,
)
from harness import (
    PYTHON,
    REPO,
    Daemon,
    install_gemma,
    install_smollm2,
    note,
    result,
    short_tempdir,
)

NAME: Final = "models"
SWITCH_GOAL: Final = 1.1
PULL_GOAL: Final = 0.8
STREAM_TOKENS: Final = 64
# Copies of one model under two names (two workers), and a model of another kind.
PAIR: Final = ("gemma-a", "gemma-b")
OTHER: Final = "smollm2"
_numbers = itertools.count(1)


def _prompt() -> str:
    return f"Item {next(_numbers)} of the list of famous rivers of the world is the"


def _stream(port: int, key: str, model: str, max_tokens: int, **kwargs: Any) -> Stream:
    extra = {"model": model, "prompt": _prompt(), "temperature": 0}
    stream = http_stream(port, max_tokens, extra=extra, key=key, **kwargs)
    if stream.status != 200 or stream.error:
        raise RuntimeError(f"{model}: {stream.describe()}")
    return stream


def run(quick: bool) -> Iterator[dict[str, Any]]:
    rounds = 3 if quick else 8
    with short_tempdir() as state:
        models = state / "models"
        install_smollm2(models, OTHER)
        for name in PAIR:
            install_gemma(models, name)
        env = {**DAEMON_ENV, "APPLIANCE_PRELOAD": ",".join((OTHER, *PAIR))}
        with Daemon(state, DAEMON_LOG_LEVEL, env=env) as daemon:
            daemon.start()
            daemon.wait_ready(READY_TIMEOUT)
            key = daemon.api_key()
            for name in (OTHER, *PAIR):
                _stream(daemon.port, key, name, 4)  # warm
            yield from _switching(daemon.port, key, rounds)
            yield from _two_models(daemon.port, key, rounds)
    yield from _pull(2 if quick else 4)


def _switching(port: int, key: str, rounds: int) -> Iterator[dict[str, Any]]:
    pair = (OTHER, PAIR[0])
    alone: dict[str, list[float]] = {name: [] for name in pair}
    alternating: dict[str, list[float]] = {name: [] for name in pair}
    for _ in range(rounds):
        for name in pair:  # the same model twice in a row
            for _ in range(2):
                alone[name].append(_stream(port, key, name, 2).ttft_ms)
        for _ in range(2):  # then one, the other, one, the other
            for name in pair:
                alternating[name].append(_stream(port, key, name, 2).ttft_ms)
    ratios = []
    for name in pair:
        ratio = statistics.median(alternating[name]) / statistics.median(alone[name])
        ratios.append(ratio)
        note(
            f"{name}: TTFT alternating {statistics.median(alternating[name]):.1f} ms, "
            f"in a row {statistics.median(alone[name]):.1f} ms"
        )
        yield result(
            NAME,
            f"ttft_alternating_{name}_ms",
            round(statistics.median(alternating[name]), 2),
            "ms",
            baseline_ms=round(statistics.median(alone[name]), 2),
            ratio=round(ratio, 3),
        )
    worst = max(ratios)
    yield result(
        NAME,
        "ttft_switching_ratio",
        round(worst, 3),
        "x",
        goal=f"<= {SWITCH_GOAL}",
        met=worst <= SWITCH_GOAL,
        models=list(pair),
        rounds=rounds,
    )


def _together(port: int, key: str, models: tuple[str, str]) -> float:
    """Aggregate decode tokens/s of two streams started together."""
    barrier = threading.Barrier(2)
    streams: list[Stream] = []

    def client(model: str) -> None:
        streams.append(_stream(port, key, model, STREAM_TOKENS, barrier=barrier))

    threads = [threading.Thread(target=client, args=(m,), daemon=True) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT * 2)
    if len(streams) != 2:
        raise RuntimeError("a stream did not finish")
    tokens = sum(s.tokens - 1 for s in streams)
    start = min(s.sent_at + s.token_times[0] for s in streams)
    end = max(s.sent_at + s.token_times[-1] for s in streams)
    return tokens / (end - start)


def _two_models(port: int, key: str, rounds: int) -> Iterator[dict[str, Any]]:
    two: list[float] = []
    one: list[float] = []
    for index in range(rounds):
        # Alternating order, so that neither always runs on a warmer machine.
        if index % 2:
            one.append(_together(port, key, (PAIR[0], PAIR[0])))
            two.append(_together(port, key, PAIR))
        else:
            two.append(_together(port, key, PAIR))
            one.append(_together(port, key, (PAIR[0], PAIR[0])))
    ratio = statistics.median(two) / statistics.median(one)
    note(
        f"2 streams to 2 models {statistics.median(two):.1f} tok/s, to one model "
        f"{statistics.median(one):.1f} tok/s"
    )
    yield result(
        NAME,
        "two_models_two_streams_tps",
        round(statistics.median(two), 2),
        "tok/s",
        baseline_tps=round(statistics.median(one), 2),
        baseline="2 streams to one model (one worker, batched)",
        ratio=round(ratio, 3),
        cores=len(os.sched_getaffinity(0)),
        rounds=rounds,
    )


def _pull(rounds: int) -> Iterator[dict[str, Any]]:
    from appliance.llm.pull import Puller
    from appliance.llm.registry import ModelRegistry

    with short_tempdir() as where:
        source = install_gemma(where / "source", "pulled")
        size = source.stat().st_size
        server = subprocess.Popen(
            [PYTHON, str(REPO / "tests" / "file_server.py"), str(source)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            url = server.stdout.readline().strip()
            # On the disk the pull makes its file durable (fsync) before it lists it, and
            # curl -o does not; on tmpfs that costs nothing, and what is left to compare is
            # the transfer, the hashing and the checks.
            for label, base in (("disk", where), ("tmpfs", Path("/dev/shm"))):
                if not base.is_dir():
                    continue
                ours, curl = _pull_rounds(url, size, base, rounds, Puller, ModelRegistry)
                yield _pull_result(label, ours, curl, size, rounds)
        finally:
            server.terminate()
            server.wait()


def _pull_rounds(
    url: str, size: int, base: Path, rounds: int, puller: Any, registry: Any
) -> tuple[list[float], list[float]]:
    ours: list[float] = []
    curl: list[float] = []
    for index in range(rounds):
        for runner in ("curl", "ours") if index % 2 else ("ours", "curl"):
            target = Path(tempfile.mkdtemp(prefix="pull-", dir=base))
            os.sync()  # each run starts with nothing left to write back
            started = time.perf_counter()
            if runner == "curl":
                command = ["curl", "-sS", "-f", "-o", str(target / "pulled.gguf"), url]
                subprocess.run(command, check=True)
                curl.append(size / (time.perf_counter() - started))
            else:
                puller(registry(target), allowed_hosts=(), max_bytes=size * 2).pull(url)
                ours.append(size / (time.perf_counter() - started))
            shutil.rmtree(target)
    return ours, curl


def _pull_result(
    label: str, ours: list[float], curl: list[float], size: int, rounds: int
) -> dict[str, Any]:
    mb = 1024 * 1024
    ours_mb, curl_mb = statistics.median(ours) / mb, statistics.median(curl) / mb
    ratio = ours_mb / curl_mb
    note(f"pull to {label}: {ours_mb:.0f} MB/s, curl -o {curl_mb:.0f} MB/s")
    return result(
        NAME,
        "pull_throughput" if label == "disk" else f"pull_throughput_{label}",
        round(ours_mb, 1),
        "MB/s",
        baseline_mb_s=round(curl_mb, 1),
        baseline="curl -o of the same file from the same loopback server",
        ratio=round(ratio, 3),
        goal=f">= {PULL_GOAL}",
        met=ratio >= PULL_GOAL,
        file_mb=round(size / mb, 1),
        rounds=rounds,
        target=label,
    )
