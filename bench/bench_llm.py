"""LLM serving costs: the appliance's three generation routes, one stream and four, against
llama-cpp-python in-process and against llama.cpp's own server, in the same run.

Runners, each asked for the same streamed answer (temperature 0, MAX_TOKENS tokens):
- in-process: llama-cpp-python in one Python process, no HTTP, timing each chunk itself
  (Gemma 3 270M continuing a plain prompt; SmolLM2-135M-Instruct answering a chat turn);
- the appliance: `/v1/completions` (Gemma), `/v1/chat/completions` and `/api/v1/chat/send`
  (SmolLM2), both models resident, with a user key that has token budgets;
- llama.cpp's server, built from the llama.cpp that llama-cpp-python vendors with the same
  flags (`make llama-server`, or LLAMA_SERVER=path; skipped with a note when missing),
  `-np 4`, one process per model: `/v1/completions` and `/v1/chat/completions`.

On a 2-core box only one runner may use the CPU at a time: they take turns, one request
each, in alternating order, and the others are stopped (SIGSTOP) meanwhile. Figures are
medians over the rounds, and a ratio is the median of the rounds' own ratios (each round
runs every runner once, back to back). CPU time that other jobs on the machine took is
measured too; a noisy measurement is taken again. Then four concurrent streams on
`/v1/completions`, the appliance's rounds alternating with llama.cpp's server's.

SmolLM2's runners all decode with the repeat penalty that the appliance's defaults for it
set (CHAT_REPEAT_PENALTY): the same samplers, so the same work per token. Each runner loads
its model as it does by default: llama-cpp-python and llama.cpp's server map the GGUF file
(4 KB pages), the appliance's worker reads it into huge pages (appliance.llm.huge_pages;
the kernel's mode is printed as transparent_hugepage).

Decode rate is (completion tokens - 1) / (last text chunk - first text chunk), the
completion tokens as the runner's usage counts them: text held back for a stop string
shows as fewer, fuller chunks, not as fewer tokens.

Run as a script with --direct, this file is the in-process baseline's child process.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import select
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil
from harness import (
    LOOPBACK,
    Daemon,
    install_gemma,
    install_smollm2,
    llama_server,
    llama_server_binary,
    note,
    result,
    short_tempdir,
    spawn_python,
    stop,
)

from appliance.llm import huge_pages
from appliance.llm.model_defaults import SMOLLM2_SHA256, known_defaults
from appliance.llm.sampling import PENALTY_LAST_N

NAME: Final = "llm"
MODEL: Final = "gemma"
CHAT_MODEL: Final = "smollm2"
# A plain completion prompt that Gemma 3 270M continues well past 128 tokens at temperature
# 0 (the API has no ignore-EOS switch), so every run decodes the full max_tokens.
PROMPT: Final = (
    "The history of the Roman Empire, from its founding to its fall, in great detail:\n\n"
)
# A chat turn that SmolLM2-135M-Instruct answers at length at temperature 0.
CHAT_MESSAGE: Final = (
    "Write a long essay on the history of the Roman Empire, from its founding to its fall."
)
MAX_TOKENS: Final = 128
CONCURRENT_MAX_TOKENS: Final = 64
STREAMS: Final = 4
SEED: Final = 1234
SAMPLING: Final[dict[str, Any]] = {"temperature": 0.0, "top_p": 1.0, "seed": SEED}
# The appliance decodes SmolLM2 with the repeat penalty of its defaults (greedy decoding
# loops without one); the other runners are asked for the same penalty over the same
# window (their default is none), so that all choose tokens with the same samplers.
CHAT_REPEAT_PENALTY: Final = known_defaults(SMOLLM2_SHA256).repeat_penalty or 1.0
# What the daemon's worker uses by default: APPLIANCE_CONTEXT_SIZE (the model allows more)
# and every usable core for both decode and batch threads. Set explicitly for all runners.
N_CTX: Final = 4096
THREADS: Final = len(os.sched_getaffinity(0)) or 1
PARALLEL: Final = 4
MAX_QUEUE: Final = 16
DAEMON_ENV: Final = {
    "APPLIANCE_CONTEXT_SIZE": str(N_CTX),
    "APPLIANCE_THREADS": str(THREADS),
    "APPLIANCE_MAX_QUEUE": str(MAX_QUEUE),
    "APPLIANCE_PARALLEL": str(PARALLEL),
    # All clients share one key here; its stream limit would turn some away, and its
    # default share of the slots (APPLIANCE_PARALLEL - 1) would leave one slot unused.
    "APPLIANCE_MAX_STREAMS_PER_KEY": "0",
    "APPLIANCE_PARALLEL_PER_KEY": "64",
}
# The bench key's budgets: checked and charged on every request, never reached.
KEY_BUDGETS: Final = ("--tokens-per-day", "1000000000", "--tokens-per-month", "1000000000")
# WARNING keeps the access log out of the token path; real warnings still show up.
DAEMON_LOG_LEVEL: Final = "WARNING"
RATIO_GOAL: Final = 1.0
ADDED_TTFT_GOAL_MS: Final = 10.0
READY_TIMEOUT: Final = 120.0
REQUEST_TIMEOUT: Final = 120.0
# Lets the previous runner's threads go back to sleep before the next one starts.
SETTLE: Final = 0.3
OTHER_CPU: Final = "other"
# Quiet rounds show 0-30 ms (10 ms CPU ticks); 2% of the machine already costs llama.cpp
# several percent, since a preempted thread stalls its partner at every barrier. A noisy
# measurement is taken again, at most this many times, then kept and counted.
NOISY_SHARE: Final = 0.02
NOISY_RETRIES: Final = 2
# Before each measurement, wait (in QUIET_PROBE steps) for the machine to be quiet, up to
# QUIET_WAIT each time and QUIET_BUDGET over the whole benchmark, so that it always ends.
QUIET_PROBE: Final = 0.5
QUIET_WAIT: Final = 20.0
QUIET_BUDGET: Final = 240.0
COMPLETIONS: Final = "/v1/completions"
CHAT: Final = "/v1/chat/completions"
CHAT_SEND: Final = "/api/v1/chat/send"
DIRECT: Final = "in-process"
DIRECT_CHAT: Final = "in-process chat"
OURS: Final = "appliance"
SERVER: Final = "llama-server"
SUPERVISOR: Final = "supervisor"


@dataclass(frozen=True)
class Route:
    """One of the appliance's routes and the runners it is held against."""

    path: str
    model: str
    direct: str
    server: str

    @property
    def ours(self) -> str:
        return f"{OURS} {self.path}"


ROUTES: Final = (
    Route(COMPLETIONS, MODEL, DIRECT, f"{SERVER} {COMPLETIONS}"),
    Route(CHAT, CHAT_MODEL, DIRECT_CHAT, f"{SERVER} {CHAT}"),
    Route(CHAT_SEND, CHAT_MODEL, DIRECT_CHAT, f"{SERVER} {CHAT}"),
)


@dataclass
class Stream:
    """One streamed completion as its client saw it."""

    status: int
    # Seconds after the request was sent, one per chunk that carried text.
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    done: bool = False
    error: str | None = None
    sent_at: float = 0.0  # perf_counter of the client's process, for aggregate figures
    elapsed: float = 0.0  # send to end of stream
    usage_tokens: int | None = None  # completion tokens, as the runner's usage counts them

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.token_times)

    @property
    def chunks(self) -> int:
        return len(self.token_times)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None and self.chunks >= 2

    @property
    def ttft_ms(self) -> float:
        return self.token_times[0] * 1000

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / (self.token_times[-1] - self.token_times[0])

    def describe(self) -> str:
        return (
            f"status {self.status}, {self.tokens} tokens in {self.chunks} chunks, "
            f"done={self.done}, error={self.error}"
        )


@dataclass
class Runner:
    """How to ask one runner for a completion, and its processes whose CPU time we count."""

    generate: Callable[..., Stream]  # (max_tokens, barrier=None)
    pids: dict[str, int]  # by role; the first is the root of its process tree

    def pause(self) -> None:
        """SIGSTOP its whole tree: idle is not quiet (our daemon probes itself every second)."""
        for process in _tree(next(iter(self.pids.values()))):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.suspend()

    def resume(self) -> None:
        for process in _tree(next(iter(self.pids.values()))):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()


def timed(runner: Runner, roots: list[int], max_tokens: int) -> tuple[Stream, dict[str, float]]:
    """The stream, the CPU milliseconds each of the runner's processes spent meanwhile, and
    OTHER_CPU: what the rest of the machine took (neither this process nor the `roots`
    trees: another job, interrupts, hypervisor steal). On 2 cores that is the noise."""
    own = {name: _cpu_seconds(pid) for name, pid in runner.pids.items()}
    ours, machine = _tree_seconds(roots), _machine_seconds()
    stream = runner.generate(max_tokens)
    machine, ours = _machine_seconds() - machine, _tree_seconds(roots) - ours
    spent = {name: (_cpu_seconds(pid) - own[name]) * 1000 for name, pid in runner.pids.items()}
    spent[OTHER_CPU] = max(0.0, machine - ours) * 1000
    return stream, spent


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _tree_seconds(roots: list[int]) -> float:
    processes = [psutil.Process()]
    for pid in roots:
        processes += _tree(pid)
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(process.cpu_times()[:2])
    return total


def _machine_seconds() -> float:
    times = psutil.cpu_times()
    return float(times.user + times.nice + times.system + times.irq + times.softirq + times.steal)


def run(quick: bool) -> Iterator[dict[str, Any]]:
    quiet = Quiet()
    with contextlib.ExitStack() as stack:
        state = stack.enter_context(short_tempdir())
        runners, skipped = _start_runners(stack, state)

        def resume_all() -> None:
            for runner in runners.values():
                runner.resume()

        # Runs first on the way out: a stopped process would not act on SIGTERM.
        stack.callback(resume_all)
        summary = _single_stream(runners, 3 if quick else 12, quiet)
        yield from _single_stream_results(summary, skipped)
        yield from _concurrent(runners, 1 if quick else 5, quiet, skipped)


def _start_runners(stack: contextlib.ExitStack, state: Path) -> tuple[dict[str, Runner], str]:
    """Every runner, warm, in turn order; and why llama.cpp's server is missing ("" if not)."""
    gemma = install_gemma(state / "models", MODEL)
    smollm2 = install_smollm2(state / "models", CHAT_MODEL)
    runners = _start_daemon(stack, state)
    runners[DIRECT] = stack.enter_context(DirectBaseline(gemma, state / "direct.log")).runner()
    chat = DirectBaseline(smollm2, state / "direct-chat.log", chat=True)
    runners[DIRECT_CHAT] = stack.enter_context(chat).runner()
    skipped = ""
    binary = llama_server_binary()
    if binary is None:
        skipped = "not built (make llama-server)"
    else:
        args = ["-c", str(N_CTX), "-t", str(THREADS), "-tb", str(THREADS), "-np", str(PARALLEL)]
        server_sampling = {
            MODEL: {},
            CHAT_MODEL: {"repeat_penalty": CHAT_REPEAT_PENALTY, "repeat_last_n": PENALTY_LAST_N},
        }
        for path, model, alias in ((COMPLETIONS, gemma, MODEL), (CHAT, smollm2, CHAT_MODEL)):
            log = state / f"llama-server-{alias}.log"
            # --jinja: the chat template of the GGUF, as the appliance uses it.
            opened = llama_server(binary, model, log, *args, "--jinja", timeout=READY_TIMEOUT)
            port, process = stack.enter_context(opened)
            runners[f"{SERVER} {path}"] = Runner(
                lambda n, port=port, path=path, alias=alias, **kw: http_stream(
                    port, n, route=path, extra={"model": alias, **server_sampling[alias]}, **kw
                ),
                {"server": process.pid},
            )
    for name, runner in runners.items():
        # The first request after a load is slower (cold caches, no prompt prefix yet).
        warm = runner.generate(MAX_TOKENS)
        if not warm.ok:
            raise RuntimeError(f"{name}: warm-up request failed: {warm.describe()}")
        time.sleep(SETTLE)
    # Only the runner whose turn it is may run at all (2 cores; see Runner.pause).
    for runner in runners.values():
        runner.pause()
    return runners, skipped


def _start_daemon(stack: contextlib.ExitStack, state: Path) -> dict[str, Runner]:
    """The appliance with both models resident: one runner per route, one daemon."""
    env = {**DAEMON_ENV, "APPLIANCE_PRELOAD": f"{MODEL},{CHAT_MODEL}"}
    daemon = stack.enter_context(Daemon(state, DAEMON_LOG_LEVEL, env=env))
    daemon.start()
    daemon.wait_ready(READY_TIMEOUT)  # the preloaded models are loaded before READY=1
    assert daemon.process is not None
    port, key = daemon.port, daemon.user_key("bench-user", *KEY_BUDGETS)
    services = _get_json(port, "/api/v1/health/services", daemon.api_key())["services"]
    workers = {s["name"]: s["pid"] for s in services if s["name"].startswith("worker:")}
    runners = {}
    for route in ROUTES:
        pids = {SUPERVISOR: daemon.process.pid, "worker": workers[f"worker:{route.model}"]}
        runners[route.ours] = Runner(
            lambda n, route=route, **kw: http_stream(
                port, n, key=key, route=route.path, extra={"model": route.model}, **kw
            ),
            pids,
        )
    return runners


# -- one stream --------------------------------------------------------------------------------


def _single_stream(
    runners: dict[str, Runner], rounds: int, quiet: Quiet
) -> dict[str, dict[str, Any]]:
    """Each runner's figures: medians over `rounds` turns."""
    samples: dict[str, list[Stream]] = {}
    cpu: dict[str, dict[str, list[float]]] = {name: {} for name in runners}
    retried: dict[str, int] = {}
    roots = sorted({next(iter(runner.pids.values())) for runner in runners.values()})
    order = list(runners)
    for round_ in range(rounds):
        # Alternate the order too, so no runner always follows the same one.
        for name in order if round_ % 2 == 0 else order[::-1]:
            runners[name].resume()
            time.sleep(SETTLE)  # its timers that fired while it was stopped run now
            for attempt in range(1 + NOISY_RETRIES):
                quiet.wait(roots)
                stream, cpu_ms = timed(runners[name], roots, MAX_TOKENS)
                if not stream.ok:
                    raise RuntimeError(f"{name}: request failed: {stream.describe()}")
                if not _noisy(cpu_ms[OTHER_CPU], stream.elapsed) or attempt == NOISY_RETRIES:
                    break
                note(f"{name}: another job took {cpu_ms[OTHER_CPU]:.0f} ms CPU; again")
                retried[name] = retried.get(name, 0) + 1
                time.sleep(SETTLE)
            samples.setdefault(name, []).append(stream)
            for process, spent in cpu_ms.items():
                cpu[name].setdefault(process, []).append(spent)
            note(
                f"round {round_ + 1}/{rounds}: {name} {stream.decode_tps:.1f} tok/s, "
                f"TTFT {stream.ttft_ms:.1f} ms, {stream.tokens} tokens in {stream.chunks} "
                f"chunks, other CPU on the machine {cpu_ms[OTHER_CPU]:.0f} ms"
            )
            runners[name].pause()
    summary = {}
    for name, streams in samples.items():
        figures = _summary(streams)
        other = cpu[name].pop(OTHER_CPU)
        figures["cpu"] = {p: round(statistics.median(ms), 1) for p, ms in cpu[name].items()}
        figures["other"] = [round(ms) for ms in other]
        kept = zip(other, streams, strict=True)
        figures["noisy"] = sum(_noisy(ms, stream.elapsed) for ms, stream in kept)
        figures["retried"] = retried.get(name, 0)
        summary[name] = figures
    return summary


def _single_stream_results(
    summary: dict[str, dict[str, Any]], skipped: str
) -> Iterator[dict[str, Any]]:
    common = {
        "max_tokens": MAX_TOKENS,
        "n_ctx": N_CTX,
        "threads": THREADS,
        "transparent_hugepage": huge_pages.kernel_mode(),
    }
    for name, figures in summary.items():
        extra = {}
        if SUPERVISOR in figures["cpu"]:
            # What the supervisor (HTTP, auth, budgets, SSE) spends per token generated.
            per_token = figures["cpu"][SUPERVISOR] / max(1, statistics.median(figures["tokens"]))
            extra["supervisor_cpu_ms_per_token"] = round(per_token, 3)
        yield result(
            NAME,
            "stream_decode_tps",
            figures["tps"],
            "tok/s",
            runner=name,
            best=figures["tps_best"],
            samples=figures["tps_samples"],
            completion_tokens=sorted(set(figures["tokens"])),
            chunks=sorted(set(figures["chunks"])),
            same_text_every_round=figures["same_text"],
            # Per request, median: where a server's time goes besides llama.cpp's own.
            cpu_ms_per_request=figures["cpu"],
            # Largest gap between two chunks, median over the rounds: stalls of the server.
            max_chunk_gap_ms=figures["max_gap"],
            # Should be near 0 (CPU ticks are 10 ms); more means another job shared the cores.
            other_cpu_ms=figures["other"],
            noisy_samples_kept=figures["noisy"],
            noisy_samples_retried=figures["retried"],
            **extra,
            **common,
        )
        yield result(
            NAME,
            "stream_ttft",
            figures["ttft"],
            "ms",
            runner=name,
            best=figures["ttft_best"],
            samples=figures["ttft_samples"],
            **common,
        )
    for route in ROUTES:
        ours, direct = summary[route.ours], summary[route.direct]
        ratio = _paired_ratio(ours, direct)
        added = statistics.median(
            a - b for a, b in zip(ours["ttft_samples"], direct["ttft_samples"], strict=True)
        )
        against_direct = (
            ("stream_decode_tps_ratio_vs_in_process", round(ratio, 3), "ratio", "tps",
             f">= {RATIO_GOAL}", ratio >= RATIO_GOAL),
            ("stream_added_ttft_vs_in_process", round(added, 2), "ms", "ttft",
             f"<= {ADDED_TTFT_GOAL_MS:g}", added <= ADDED_TTFT_GOAL_MS),
        )  # fmt: skip
        for metric, value, unit, figure, goal, met in against_direct:
            yield result(
                NAME,
                metric,
                value,
                unit,
                route=route.path,
                appliance=ours[figure],
                in_process=direct[figure],
                of_medians=_of_medians(ours, direct, figure),
                goal=goal,
                meets_goal=met,
                **common,
            )
        if route.server not in summary:
            skip = {"metric": "stream_vs_llama_server", "route": route.path, "skipped": skipped}
            yield {"bench": NAME, **skip}
            continue
        server = summary[route.server]
        ratio = _paired_ratio(ours, server)
        yield result(
            NAME,
            "stream_vs_llama_server",
            round(ratio, 3),
            "ratio",
            route=route.path,
            server_route=route.server,
            appliance_tps=ours["tps"],
            server_tps=server["tps"],
            of_medians=_of_medians(ours, server, "tps"),
            appliance_ttft_ms=ours["ttft"],
            server_ttft_ms=server["ttft"],
            goal=f">= {RATIO_GOAL}",
            meets_goal=ratio >= RATIO_GOAL,
            **common,
        )


def _paired_ratio(ours: dict[str, Any], other: dict[str, Any]) -> float:
    """The median over the rounds of ours / theirs within each round: the two requests of
    a round ran seconds apart, so a drift of the machine's speed (another guest on the
    host, which no CPU count in here shows) weighs on both."""
    pairs = zip(ours["tps_samples"], other["tps_samples"], strict=True)
    return statistics.median(a / b for a, b in pairs)


def _of_medians(ours: dict[str, Any], other: dict[str, Any], figure: str) -> float:
    """The same comparison between the two medians, for reference."""
    if figure == "tps":
        return round(ours["tps"] / other["tps"], 3)
    return round(ours[figure] - other[figure], 2)


def _summary(streams: list[Stream]) -> dict[str, Any]:
    tps = [s.decode_tps for s in streams]
    ttft = [s.ttft_ms for s in streams]
    return {
        "tps": round(statistics.median(tps), 2),
        "tps_best": round(max(tps), 2),
        "tps_samples": [round(x, 2) for x in tps],
        "ttft": round(statistics.median(ttft), 2),
        "ttft_best": round(min(ttft), 2),
        "ttft_samples": [round(x, 2) for x in ttft],
        "tokens": [s.tokens for s in streams],
        "chunks": [s.chunks for s in streams],
        "max_gap": round(statistics.median(_max_gap_ms(s) for s in streams), 1),
        # Temperature 0 with the same parameters: every round writes the same text.
        "same_text": len({s.text for s in streams}) == 1,
    }


# -- four streams ------------------------------------------------------------------------------


@dataclass
class _Rounds:
    """One runner's rounds of concurrent streams."""

    streams: list[Stream] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    other: list[int] = field(default_factory=list)  # CPU ms other jobs took, per round
    noisy: int = 0


def _concurrent(
    runners: dict[str, Runner], rounds: int, quiet: Quiet, skipped: str
) -> Iterator[dict[str, Any]]:
    """STREAMS streams at once on /v1/completions: the appliance's rounds alternating with
    llama.cpp's server's; aggregate rate and TTFT pooled over the rounds, the ratio the
    median of the rounds' own."""
    names = [ROUTES[0].ours, ROUTES[0].server]
    present = [name for name in names if name in runners]
    figures = {name: _Rounds() for name in present}
    roots = sorted({next(iter(runner.pids.values())) for runner in runners.values()})
    for round_ in range(rounds):
        for name in present if round_ % 2 == 0 else present[::-1]:
            runner = runners[name]
            runner.resume()
            time.sleep(SETTLE)
            for attempt in range(1 + NOISY_RETRIES):
                quiet.wait(roots)
                ours, machine = _tree_seconds(roots), _machine_seconds()
                batch = concurrent_streams(runner.generate, STREAMS, MAX_TOKENS)
                machine, ours = _machine_seconds() - machine, _tree_seconds(roots) - ours
                starts = [s.sent_at for s in batch if s.sent_at]
                ends = [s.sent_at + s.elapsed for s in batch if s.sent_at]
                wall = max(ends) - min(starts) if starts else 0.0
                other_ms = max(0.0, machine - ours) * 1000
                note(
                    f"{STREAMS} streams, round {round_ + 1}/{rounds}: {name} "
                    f"{sum(s.ok for s in batch)}/{STREAMS} ok in {wall:.2f} s, "
                    f"other CPU on the machine {other_ms:.0f} ms"
                )
                if not _noisy(other_ms, wall) or attempt == NOISY_RETRIES:
                    break
            runner.pause()
            failed = [s for s in batch if not s.ok]
            if failed:
                raise RuntimeError(f"{name}: {STREAMS} streams: {failed[0].describe()}")
            mine = figures[name]
            mine.streams += batch
            mine.walls.append(wall)
            mine.other.append(round(other_ms))
            mine.noisy += _noisy(other_ms, wall)
    aggregates = {}
    for name, mine in figures.items():
        streams = mine.streams
        aggregates[name] = sum(s.tokens for s in streams) / sum(mine.walls)
        ttft = sorted(s.ttft_ms for s in streams)
        yield result(
            NAME,
            "concurrent_aggregate_tps",
            round(aggregates[name], 2),
            "tok/s",
            runner=name,
            streams=STREAMS,
            rounds=rounds,
            max_tokens=MAX_TOKENS,
            wall_s=[round(w, 3) for w in mine.walls],
            ttft_p50_ms=round(statistics.median(ttft), 1),
            ttft_max_ms=round(ttft[-1], 1),
            per_stream_decode_tps_median=round(statistics.median(s.decode_tps for s in streams), 2),
            max_chunk_gap_ms=round(max(_max_gap_ms(s) for s in streams), 1),
            other_cpu_ms=mine.other,
            noisy_rounds_kept=mine.noisy,
        )
    if len(aggregates) < 2:
        yield {"bench": NAME, "metric": "concurrent_vs_llama_server", "skipped": skipped}
        return
    # Per round, as the single streams' ratios: the median of the rounds' own ratios.
    ours, theirs = (figures[name] for name in names)
    per_round = [
        (sum(s.tokens for s in ours.streams[i * STREAMS : (i + 1) * STREAMS]) / ours.walls[i])
        / (sum(s.tokens for s in theirs.streams[i * STREAMS : (i + 1) * STREAMS]) / theirs.walls[i])
        for i in range(rounds)
    ]
    ratio = statistics.median(per_round)
    yield result(
        NAME,
        "concurrent_vs_llama_server",
        round(ratio, 3),
        "ratio",
        streams=STREAMS,
        appliance_tps=round(aggregates[names[0]], 2),
        server_tps=round(aggregates[names[1]], 2),
        of_aggregates=round(aggregates[names[0]] / aggregates[names[1]], 3),
        goal=f">= {RATIO_GOAL}",
        meets_goal=ratio >= RATIO_GOAL,
    )


def concurrent_streams(
    generate: Callable[..., Stream], count: int, max_tokens: int
) -> list[Stream]:
    """`count` streams of `max_tokens` started together (one thread each, sent at a barrier);
    a client that did not finish in time is a failed Stream."""
    barrier = threading.Barrier(count)
    results: list[Stream | None] = [None] * count

    def client(index: int) -> None:
        results[index] = generate(max_tokens, barrier=barrier)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + REQUEST_TIMEOUT * 2
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [s if s is not None else Stream(0, error="client did not finish") for s in results]


class Quiet:
    """Waits for other jobs on the machine to pause, within a budget for the whole run."""

    def __init__(self, budget: float = QUIET_BUDGET) -> None:
        self.left = budget
        self.waited = 0.0

    def wait(self, roots: list[int]) -> None:
        deadline = time.monotonic() + min(QUIET_WAIT, self.left)
        started = time.monotonic()
        while time.monotonic() < deadline:
            ours, machine = _tree_seconds(roots), _machine_seconds()
            time.sleep(QUIET_PROBE)
            machine, ours = _machine_seconds() - machine, _tree_seconds(roots) - ours
            if not _noisy((machine - ours) * 1000, QUIET_PROBE):
                break
        spent = time.monotonic() - started
        self.left = max(0.0, self.left - spent)
        self.waited += spent
        if spent > 2 * QUIET_PROBE:
            note(f"waited {spent:.1f} s for other jobs on the machine ({self.left:.0f} s left)")


def _noisy(other_ms: float, seconds: float) -> bool:
    """Whether another job took enough of the machine to skew a measurement."""
    return other_ms > NOISY_SHARE * seconds * 1000 * (psutil.cpu_count() or 1)


def _max_gap_ms(stream: Stream) -> float:
    times = stream.token_times
    return max(b - a for a, b in itertools.pairwise(times)) * 1000


# -- the client -----------------------------------------------------------------------------


def http_stream(
    port: int,
    max_tokens: int,
    extra: dict[str, Any] | None = None,
    barrier: threading.Barrier | None = None,
    key: str = "",
    route: str = COMPLETIONS,
) -> Stream:
    """POST a streamed request to `route` (/v1/completions, /v1/chat/completions or
    /api/v1/chat/send); each SSE chunk that carries text is timestamped on arrival.

    http.client rather than httpx: it costs less CPU per chunk, and on 2 cores the client
    competes with the server it measures. The connection is open before the clock starts.
    """
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": True, **SAMPLING}
    if route == COMPLETIONS:
        body["prompt"] = PROMPT
    elif route == CHAT:
        body["messages"] = [{"role": "user", "content": CHAT_MESSAGE}]
    else:
        body["message"] = CHAT_MESSAGE
    if route != CHAT_SEND:
        body["stream_options"] = {"include_usage": True}
    body.update(extra or {})
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=REQUEST_TIMEOUT)
    try:
        connection.connect()
        if barrier is not None:
            barrier.wait(REQUEST_TIMEOUT)
        sent = time.perf_counter()
        connection.request("POST", route, body=payload, headers=headers)
        response = connection.getresponse()
        stream = Stream(response.status, sent_at=sent)
        if response.status != 200:
            stream.error = response.read(2000).decode("utf-8", "replace")
        else:
            _read_events(response, stream, max_lines=max_tokens * 4 + 100)
        stream.elapsed = time.perf_counter() - sent
        return stream
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return Stream(0, error=f"{type(exc).__name__}: {exc}")
    finally:
        connection.close()


def _read_events(response: http.client.HTTPResponse, stream: Stream, max_lines: int) -> None:
    parts: list[str] = []
    event = ""
    for _ in range(max_lines):  # bounded: a server that never ends is an error, not a hang
        line = response.readline()
        now = time.perf_counter()
        if not line:
            break
        line = line.strip()
        if line.startswith(b"event:"):
            event = line[6:].strip().decode()
            continue
        if not line.startswith(b"data:"):
            continue  # blank separators, ": ping" comments
        data = line[5:].strip()
        if data == b"[DONE]":
            stream.done = True
            break
        chunk = json.loads(data)
        if event == "error" or "error" in chunk:
            stream.error = json.dumps(chunk)[:500]
            break
        if chunk.get("usage"):
            stream.usage_tokens = chunk["usage"]["completion_tokens"]
        if event == "done":  # /api/v1/chat/send's last event
            stream.done = True
            break
        text = _text_of(chunk)
        if text:
            stream.token_times.append(now - stream.sent_at)
            parts.append(text)
    stream.text = "".join(parts)


def _text_of(chunk: dict[str, Any]) -> str:
    """The text of one chunk of any of the three routes' streams."""
    if "text" in chunk and "choices" not in chunk:
        return str(chunk["text"])  # /api/v1/chat/send's token event
    choices = chunk.get("choices") or [{}]
    choice = choices[0]
    if "delta" in choice:
        return str(choice["delta"].get("content") or "")
    return str(choice.get("text") or "")


# -- the in-process baseline ----------------------------------------------------------------


class DirectBaseline:
    """A child process holding one Llama(); one JSON line in, one JSON line out per request."""

    def __init__(self, model: Path, log_path: Path, *, chat: bool = False) -> None:
        self.model = model
        self.log_path = log_path
        self.chat = chat  # a chat turn through the model's template, else the plain prompt
        self.process: subprocess.Popen[bytes] | None = None
        self._buffer = bytearray()

    def __enter__(self) -> DirectBaseline:
        argv = [__file__, "--direct", "--model", str(self.model)]
        argv += ["--n-ctx", str(N_CTX), "--threads", str(THREADS)]
        with self.log_path.open("wb") as log:
            self.process = spawn_python(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
            )
        try:
            if json.loads(self._read_line(READY_TIMEOUT)) != {"ready": True}:
                raise RuntimeError("the direct baseline did not say it was ready")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            with contextlib.suppress(OSError):
                self.process.stdin.close()  # EOF: it returns on its own
            stop(self.process)
            if self.process.stdout is not None:
                self.process.stdout.close()

    def runner(self) -> Runner:
        assert self.process is not None
        return Runner(self.generate, {"direct": self.process.pid})

    def generate(self, max_tokens: int, **_: Any) -> Stream:
        assert self.process is not None and self.process.stdin is not None
        request: dict[str, Any] = {"max_tokens": max_tokens, **SAMPLING}
        if self.chat:
            request["messages"] = [{"role": "user", "content": CHAT_MESSAGE}]
            request["repeat_penalty"] = CHAT_REPEAT_PENALTY
        else:
            request["prompt"] = PROMPT
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        reply = json.loads(self._read_line(REQUEST_TIMEOUT))
        times = reply["token_times"]
        elapsed = times[-1] if times else 0.0
        return Stream(
            200, times, reply["text"], True, elapsed=elapsed, usage_tokens=reply["tokens"]
        )

    def _read_line(self, timeout: float) -> bytes:
        """One line of the child's stdout, or an error once it exits or `timeout` passes."""
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the direct baseline said nothing for {timeout} s")
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                data = os.read(fd, 65536)
                if not data:
                    log = self.log_path.read_text("utf-8", "replace")[-600:]
                    raise RuntimeError(f"the direct baseline exited: {log}")
                self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line


def direct_main(argv: list[str]) -> int:
    """The child: what appliance/llm/worker.py does with llama-cpp-python, minus the rest."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--direct", action="store_true")
    parser.add_argument("--model", required=True)
    parser.add_argument("--n-ctx", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    from llama_cpp import Llama

    llm: Any = Llama(  # untyped library
        model_path=args.model,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sent = time.perf_counter()
        if "messages" in request:
            # The model's chat template, as llama-cpp-python applies it in create_chat_completion.
            stream = llm.create_chat_completion(
                messages=request["messages"],
                max_tokens=request["max_tokens"],
                temperature=request["temperature"],
                top_p=request["top_p"],
                seed=request["seed"],
                # Over llama-cpp-python's default window (last_n_tokens_size): PENALTY_LAST_N.
                repeat_penalty=request["repeat_penalty"],
                stream=True,
            )
        else:
            # As the worker does: tokenize per request, BOS added, no special tokens parsed.
            tokens = llm.tokenize(request["prompt"].encode("utf-8"), add_bos=True, special=False)
            stream = llm.create_completion(
                prompt=tokens,
                max_tokens=min(request["max_tokens"], llm.n_ctx() - len(tokens)),
                temperature=request["temperature"],
                top_p=request["top_p"],
                stop=None,
                seed=request["seed"],
                stream=True,
            )
        times: list[float] = []
        parts: list[str] = []
        chunks = 0
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                delta = choice.get("delta")
                text = (delta.get("content") if delta is not None else choice.get("text")) or ""
                if text:
                    times.append(time.perf_counter() - sent)
                    parts.append(text)
                    chunks += 1
        finally:
            stream.close()
        # Both stream one chunk per token generated (the end token, if any, not shown).
        reply = {"token_times": times, "text": "".join(parts), "tokens": chunks}
        print(json.dumps(reply), flush=True)
    return 0


def _get_json(port: int, path: str, key: str) -> dict[str, Any]:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        body: dict[str, Any] = json.loads(connection.getresponse().read())
        return body
    finally:
        connection.close()


if __name__ == "__main__":
    sys.exit(direct_main(sys.argv[1:]))
