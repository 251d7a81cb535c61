"""LLM serving costs: one streamed completion through our API against llama-cpp-python
called directly and against llama-cpp-python's own server, then 8 concurrent streams.

Every figure comes from the same model (Gemma 3 270M Q4_K_M), prompt and sampling
parameters, measured in the same run on the same machine. On a 2-core box only one runner
may use the CPU at a time: they take turns, one request each, in alternating order, and the
others are stopped (SIGSTOP) meanwhile. Figures are medians over the rounds. CPU time that
other jobs on the machine took is measured too; a noisy measurement is taken again.

Run as a script with --direct, this file is that baseline's child process: llama-cpp-python
in one Python process, no HTTP, timing each streamed chunk itself.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil
from harness import (
    LOOPBACK,
    PYTHON,
    Daemon,
    free_port,
    install_gemma,
    note,
    result,
    short_tempdir,
    spawn_python,
    stop,
    wait_for_port,
)

NAME: Final = "llm"
MODEL: Final = "gemma"
# A plain completion prompt that Gemma 3 270M continues well past 128 tokens at temperature
# 0 (the API has no ignore-EOS switch), so every run decodes the full max_tokens.
PROMPT: Final = (
    "The history of the Roman Empire, from its founding to its fall, in great detail:\n\n"
)
MAX_TOKENS: Final = 128
CONCURRENT_MAX_TOKENS: Final = 64
CLIENTS: Final = 8
SEED: Final = 1234
SAMPLING: Final[dict[str, Any]] = {"temperature": 0.0, "top_p": 1.0, "seed": SEED}
# What the daemon's worker uses by default: APPLIANCE_CONTEXT_SIZE (the model allows more)
# and every usable core for both decode and batch threads. Set explicitly for all runners.
N_CTX: Final = 4096
THREADS: Final = len(os.sched_getaffinity(0)) or 1
MAX_QUEUE: Final = 16
DAEMON_ENV: Final = {
    "APPLIANCE_CONTEXT_SIZE": str(N_CTX),
    "APPLIANCE_THREADS": str(THREADS),
    "APPLIANCE_MAX_QUEUE": str(MAX_QUEUE),
    # All clients share one key here; its stream limit would turn some away, and its
    # default share of the slots (APPLIANCE_PARALLEL - 1) would leave one slot unused.
    "APPLIANCE_MAX_STREAMS_PER_KEY": "0",
    "APPLIANCE_PARALLEL_PER_KEY": "64",
}
# WARNING keeps the access log out of the token path; real warnings still show up.
DAEMON_LOG_LEVEL: Final = "WARNING"
RATIO_GOAL: Final = 0.97
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
DIRECT: Final = "direct"
OURS: Final = "appliance"
SERVER: Final = "llama-cpp-server"
# llama-cpp-python[server]'s extras; llama-cpp-python itself is never reinstalled (it was
# built with flags of our own), so these are resolved by pip but installed with --no-deps.
SERVER_EXTRAS: Final = (
    "fastapi",
    "uvicorn",
    "sse-starlette",
    "starlette-context>=0.3.6,<0.4",
    "pydantic-settings",
    "PyYAML",
)
SERVER_IMPORTS: Final = (
    "import fastapi, uvicorn, sse_starlette, starlette_context, pydantic_settings, yaml\n"
    "import llama_cpp.server.app, llama_cpp.server.__main__"
)
# Its server samples with repeat_penalty 1.1 by default; create_completion (our worker,
# the direct baseline) with 1.0. Same for every other sampling default (top_k 40, min_p 0.05).
SERVER_REQUEST_EXTRA: Final[dict[str, Any]] = {"repeat_penalty": 1.0}
PIP_TIMEOUT: Final = 600.0


@dataclass
class Stream:
    """One streamed completion as its client saw it."""

    status: int
    # Seconds after the request was sent, one per chunk that carried text (one token each).
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    done: bool = False
    error: str | None = None
    sent_at: float = 0.0  # perf_counter of the client's process, for aggregate figures
    elapsed: float = 0.0  # send to end of stream

    @property
    def tokens(self) -> int:
        return len(self.token_times)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None and self.tokens >= 2

    @property
    def ttft_ms(self) -> float:
        return self.token_times[0] * 1000

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / (self.token_times[-1] - self.token_times[0])

    def describe(self) -> str:
        return f"status {self.status}, {self.tokens} tokens, done={self.done}, error={self.error}"


@dataclass
class Runner:
    """How to ask one runner for a completion, and its processes whose CPU time we count."""

    generate: Callable[[int], Stream]
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
    single = yield from single_stream(3 if quick else 8, quiet)
    yield from concurrent(1 if quick else 3, single, quiet)


# -- one stream: ours, direct, llama-cpp-python's server ------------------------------------


def single_stream(rounds: int, quiet: Quiet) -> Generator[dict[str, Any], None, float]:
    """Median per runner over `rounds` turns; returns our median decode tokens/s."""
    skipped = ensure_server_extras()
    samples: dict[str, list[Stream]] = {}
    with contextlib.ExitStack() as stack:
        state = stack.enter_context(short_tempdir())
        model = install_gemma(state / "models", MODEL)
        runners: dict[str, Runner] = {
            OURS: _start_daemon(stack, state),
            DIRECT: stack.enter_context(DirectBaseline(model, state / "direct.log")).runner(),
        }
        if skipped is None:
            try:
                runners[SERVER] = _start_llama_server(stack, model, state / "llama-server.log")
            except (RuntimeError, TimeoutError) as exc:
                skipped = f"llama_cpp.server did not start: {exc}"

        def resume_all() -> None:
            for runner in runners.values():
                runner.resume()

        # Runs first on the way out: a stopped process would not act on SIGTERM.
        stack.callback(resume_all)
        for name in list(runners):
            # The first request after a load is slower (cold caches, no prompt prefix yet).
            warm = runners[name].generate(MAX_TOKENS)
            if not warm.ok:
                if name != SERVER:
                    raise RuntimeError(f"{name}: warm-up request failed: {warm.describe()}")
                skipped = f"its warm-up request failed: {warm.describe()}"
                del runners[name]
            time.sleep(SETTLE)
        # Only the runner whose turn it is may run at all (2 cores; see Runner.pause).
        for runner in runners.values():
            runner.pause()
        order = list(runners)
        reference: str | None = None
        cpu: dict[str, dict[str, list[float]]] = {name: {} for name in runners}
        roots = [next(iter(runner.pids.values())) for runner in runners.values()]
        retried: dict[str, int] = {}
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
                # Not the warm-up's: a cold prompt evaluated as one batch can pick another
                # greedy token than the cached prefix plus one token that later requests get.
                reference = stream.text if reference is None else reference
                note(
                    f"round {round_ + 1}/{rounds}: {name} {stream.decode_tps:.1f} tok/s, "
                    f"TTFT {stream.ttft_ms:.1f} ms, {stream.tokens} tokens, "
                    f"other CPU on the machine {cpu_ms[OTHER_CPU]:.0f} ms"
                )
                runners[name].pause()
    summary = {name: _summary(streams, reference) for name, streams in samples.items()}
    for name, figures in summary.items():
        other = cpu[name].pop(OTHER_CPU)
        figures["cpu"] = {p: round(statistics.median(ms), 1) for p, ms in cpu[name].items()}
        figures["other"] = [round(ms) for ms in other]
        kept = zip(other, samples[name], strict=True)
        figures["noisy"] = sum(_noisy(ms, stream.elapsed) for ms, stream in kept)
        figures["retried"] = retried.get(name, 0)
    common = {
        "method": "median",
        "rounds": rounds,
        "max_tokens": MAX_TOKENS,
        "n_ctx": N_CTX,
        "threads": THREADS,
    }
    for name, figures in summary.items():
        yield result(
            NAME,
            "stream_decode_tps",
            figures["tps"],
            "tok/s",
            server=name,
            best=figures["tps_best"],
            samples=figures["tps_samples"],
            completion_tokens=figures["tokens"],
            same_text_as_first_runner=figures["same_text"],
            # Per request, median: where a server's time goes besides llama.cpp's own.
            cpu_ms_per_request=figures["cpu"],
            # Largest gap between two tokens, median over the rounds: stalls of the server.
            max_token_gap_ms=figures["max_gap"],
            # Should be near 0 (CPU ticks are 10 ms); more means another job shared the cores.
            other_cpu_ms=figures["other"],
            noisy_samples_kept=figures["noisy"],
            noisy_samples_retried=figures["retried"],
            waited_for_quiet_s=round(quiet.waited, 1),
            **common,
        )
        yield result(
            NAME,
            "stream_ttft",
            figures["ttft"],
            "ms",
            server=name,
            best=figures["ttft_best"],
            samples=figures["ttft_samples"],
            **common,
        )
    ours, direct = summary[OURS], summary[DIRECT]
    ratio = ours["tps"] / direct["tps"]
    added = ours["ttft"] - direct["ttft"]
    yield result(
        NAME,
        "stream_decode_tps_ratio_vs_direct",
        round(ratio, 3),
        "ratio",
        appliance=ours["tps"],
        baseline=direct["tps"],
        goal=f">= {RATIO_GOAL}",
        meets_goal=ratio >= RATIO_GOAL,
        **common,
    )
    yield result(
        NAME,
        "stream_added_ttft_vs_direct",
        round(added, 2),
        "ms",
        appliance=ours["ttft"],
        baseline=direct["ttft"],
        goal=f"<= {ADDED_TTFT_GOAL_MS:g}",
        meets_goal=added <= ADDED_TTFT_GOAL_MS,
        **common,
    )
    if SERVER in summary:
        server = summary[SERVER]
        yield result(
            NAME,
            "stream_vs_llama_cpp_server",
            round(ours["tps"] / server["tps"], 3),
            "ratio",
            appliance_tps=ours["tps"],
            server_tps=server["tps"],
            appliance_ttft_ms=ours["ttft"],
            server_ttft_ms=server["ttft"],
            added_ttft_ms=round(ours["ttft"] - server["ttft"], 2),
            server_flags="--logits_all false --use_mlock false (the Llama() defaults we use)",
            **common,
        )
    else:
        yield {
            "bench": NAME,
            "metric": "stream_vs_llama_cpp_server",
            "skipped": skipped or "no figures",
        }
    return float(ours["tps"])


def _summary(streams: list[Stream], reference: str | None) -> dict[str, Any]:
    tps = [s.decode_tps for s in streams]
    ttft = [s.ttft_ms for s in streams]
    return {
        "tps": round(statistics.median(tps), 2),
        "tps_best": round(max(tps), 2),
        "tps_samples": [round(x, 2) for x in tps],
        "ttft": round(statistics.median(ttft), 2),
        "ttft_best": round(min(ttft), 2),
        "ttft_samples": [round(x, 2) for x in ttft],
        "tokens": sorted({s.tokens for s in streams}),
        "max_gap": round(statistics.median(_max_gap_ms(s) for s in streams), 1),
        # Temperature 0 with the same parameters: every runner should write the same text.
        "same_text": all(s.text == reference for s in streams),
    }


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


def _start_daemon(stack: contextlib.ExitStack, state: Path) -> Runner:
    daemon = stack.enter_context(Daemon(state, DAEMON_LOG_LEVEL, env=DAEMON_ENV))
    daemon.start()
    daemon.wait_ready(READY_TIMEOUT)  # the default model is loaded before READY=1
    assert daemon.process is not None
    port, key = daemon.port, daemon.api_key()
    services = _get_json(port, "/api/v1/health/services", key)["services"]
    worker = next(s["pid"] for s in services if s["name"].startswith("worker:"))
    return Runner(
        lambda max_tokens: http_stream(port, max_tokens, key=key),
        {"supervisor": daemon.process.pid, "worker": worker},
    )


def _start_llama_server(stack: contextlib.ExitStack, model: Path, log_path: Path) -> Runner:
    port = free_port()
    log = stack.enter_context(log_path.open("wb"))
    argv = ["-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL]
    argv += ["--n_ctx", str(N_CTX), "--n_threads", str(THREADS)]
    argv += ["--n_threads_batch", str(THREADS), "--host", LOOPBACK, "--port", str(port)]
    # Its defaults differ from Llama()'s here: logits for every token, mlock. Ours are used.
    argv += ["--logits_all", "false", "--use_mlock", "false", "--verbose", "false"]
    process = spawn_python(argv, stdout=log, stderr=subprocess.STDOUT)
    stack.callback(stop, process)
    try:
        # It loads the model before it listens.
        wait_for_port(port, process, timeout=READY_TIMEOUT)
    except (RuntimeError, TimeoutError) as exc:
        tail = log_path.read_text("utf-8", "replace")[-600:]
        raise RuntimeError(f"{exc}; its log ends: {tail}") from None
    return Runner(
        lambda max_tokens: http_stream(port, max_tokens, SERVER_REQUEST_EXTRA),
        {"server": process.pid},
    )


# -- the client -----------------------------------------------------------------------------


def http_stream(
    port: int,
    max_tokens: int,
    extra: dict[str, Any] | None = None,
    barrier: threading.Barrier | None = None,
    key: str = "",
) -> Stream:
    """POST /v1/completions with stream: true; each SSE chunk timestamped on arrival.

    http.client rather than httpx: it costs less CPU per chunk, and on 2 cores the client
    competes with the server it measures. The connection is open before the clock starts.
    """
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "stream": True,
        **SAMPLING,
        **(extra or {}),
    }
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
        connection.request("POST", "/v1/completions", body=payload, headers=headers)
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
        text = chunk["choices"][0].get("text") or ""
        if text:
            stream.token_times.append(now - stream.sent_at)
            parts.append(text)
    stream.text = "".join(parts)


# -- the direct baseline ----------------------------------------------------------------------


class DirectBaseline:
    """A child process holding one Llama(); one JSON line in, one JSON line out per request."""

    def __init__(self, model: Path, log_path: Path) -> None:
        self.model = model
        self.log_path = log_path
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

    def generate(self, max_tokens: int) -> Stream:
        assert self.process is not None and self.process.stdin is not None
        request = {"prompt": PROMPT, "max_tokens": max_tokens, **SAMPLING}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        reply = json.loads(self._read_line(REQUEST_TIMEOUT))
        times = reply["token_times"]
        return Stream(200, times, reply["text"], done=True, elapsed=times[-1] if times else 0.0)

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
        try:
            for chunk in stream:
                text = chunk["choices"][0].get("text") or ""
                if text:
                    times.append(time.perf_counter() - sent)
                    parts.append(text)
        finally:
            stream.close()
        print(json.dumps({"token_times": times, "text": "".join(parts)}), flush=True)
    return 0


# -- llama-cpp-python's server extras -----------------------------------------------------------


def ensure_server_extras() -> str | None:
    """None when llama_cpp.server imports (its extras installed first if missing), else why.

    pip resolves the extras in a dry run; only distributions not yet installed are then
    installed, pinned and with --no-deps, so nothing the daemon runs on is replaced.
    """
    error = _server_import_error()
    if error is None:
        return None
    note(f"llama_cpp.server does not import ({error}); installing its extras")
    with tempfile.TemporaryDirectory(prefix="ab") as temp:
        report_path = Path(temp) / "report.json"
        dry = _pip("install", "--dry-run", "--quiet", "--report", str(report_path), *SERVER_EXTRAS)
        if dry is not None:
            return f"pip could not resolve {', '.join(SERVER_EXTRAS)}: {dry}"
        plan = json.loads(report_path.read_text())["install"]
    installed = _installed_distributions()
    new: list[str] = []
    kept: list[str] = []
    for item in plan:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        (kept if _canonical(name) in installed else new).append(f"{name}=={version}")
    if kept:
        # pip would replace these; they stay as they are (llama-cpp-python among them, if so).
        note(f"left as installed, though pip would change them: {', '.join(kept)}")
    if new:
        note(f"pip install --no-deps {' '.join(new)}")
        failed = _pip("install", "--no-deps", "--quiet", *new)
        if failed is not None:
            return f"pip install --no-deps {' '.join(new)} failed: {failed}"
    error = _server_import_error()
    if error is not None:
        return f"llama_cpp.server still does not import after installing its extras: {error}"
    return None


def _server_import_error() -> str | None:
    checked = subprocess.run(
        [PYTHON, "-c", SERVER_IMPORTS],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if checked.returncode == 0:
        return None
    lines = checked.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit code {checked.returncode}"


def _pip(*args: str) -> str | None:
    """Run pip in the venv; None on success, else the end of what it said."""
    try:
        done = subprocess.run(
            [PYTHON, "-m", "pip", *args],
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"no answer within {PIP_TIMEOUT:.0f} s"
    if done.returncode == 0:
        return None
    return (done.stderr.strip() or done.stdout.strip())[-500:] or f"exit code {done.returncode}"


def _installed_distributions() -> set[str]:
    code = "import importlib.metadata as m, json; "
    code += "print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"
    listed = subprocess.run(
        [PYTHON, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {_canonical(name) for name in json.loads(listed.stdout) if name}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- concurrency ------------------------------------------------------------------------------


def concurrent(rounds: int, single_stream_tps: float, quiet: Quiet) -> Iterator[dict[str, Any]]:
    """CLIENTS streams at once against one daemon; TTFT pooled over every round."""
    streams: list[Stream] = []
    walls: list[float] = []
    other: list[float] = []  # CPU ms the rest of the machine took during each round
    noisy = retried = 0
    with short_tempdir() as state:
        install_gemma(state / "models", MODEL)
        with Daemon(state, DAEMON_LOG_LEVEL, env=DAEMON_ENV) as daemon:
            daemon.start()
            daemon.wait_ready(READY_TIMEOUT)
            # Two in a row: the second starts from the cached prompt prefix, as later ones do.
            for _ in range(2):
                reference = http_stream(daemon.port, CONCURRENT_MAX_TOKENS, key=daemon.api_key())
                if not reference.ok:
                    raise RuntimeError(f"warm-up request failed: {reference.describe()}")
            assert daemon.process is not None
            roots = [daemon.process.pid]
            for round_ in range(rounds):
                for attempt in range(1 + NOISY_RETRIES):
                    quiet.wait(roots)
                    ours, machine = _tree_seconds(roots), _machine_seconds()
                    batch = _concurrent_round(daemon.port, daemon.api_key())
                    machine, ours = _machine_seconds() - machine, _tree_seconds(roots) - ours
                    ends = [s.sent_at + s.elapsed for s in batch if s.sent_at]
                    starts = [s.sent_at for s in batch if s.sent_at]
                    wall = max(ends) - min(starts) if starts else 0.0
                    other_ms = max(0.0, machine - ours) * 1000
                    note(
                        f"concurrent round {round_ + 1}/{rounds}: {sum(s.ok for s in batch)}/"
                        f"{CLIENTS} ok in {wall:.2f} s, other CPU on the machine {other_ms:.0f} ms"
                    )
                    if not _noisy(other_ms, wall) or attempt == NOISY_RETRIES:
                        break
                    retried += 1
                streams += batch
                walls.append(wall)
                other.append(round(other_ms))
                noisy += _noisy(other_ms, wall)
            daemon_llm = _get_json(daemon.port, "/api/v1/health/metrics", daemon.api_key()).get(
                "llm", {}
            )
    ok = [s for s in streams if s.ok]
    rejected = [s for s in streams if s.status == 429]
    # With fewer waiting clients than APPLIANCE_MAX_QUEUE no 429 is by design.
    designed_429 = CLIENTS - 1 > MAX_QUEUE
    errors = [s for s in streams if not s.ok and not (designed_429 and s.status == 429)]
    for stream in errors[:5]:
        note(f"concurrent error: {stream.describe()}")
    tokens = sum(s.tokens for s in ok)
    aggregate = tokens / sum(walls) if sum(walls) > 0 else 0.0
    ttft = sorted(s.ttft_ms for s in ok)
    common = {
        "clients": CLIENTS,
        "rounds": rounds,
        "max_tokens": CONCURRENT_MAX_TOKENS,
        "max_queue": MAX_QUEUE,
    }
    yield result(
        NAME,
        "concurrent_aggregate_tps",
        round(aggregate, 2),
        "tok/s",
        completion_tokens=tokens,
        wall_s=[round(w, 3) for w in walls],
        # Up to APPLIANCE_PARALLEL generations decode together: each stream is slower than
        # alone while the aggregate grows (bench_batching measures that against direct).
        per_stream_decode_tps_median=round(statistics.median(s.decode_tps for s in ok), 2)
        if ok
        else None,
        per_stream_decode_tps_min=round(min(s.decode_tps for s in ok), 2) if ok else None,
        max_token_gap_ms=round(max(_max_gap_ms(s) for s in ok), 1) if ok else None,
        other_cpu_ms=other,
        noisy_rounds_kept=noisy,
        noisy_rounds_retried=retried,
        waited_for_quiet_s=round(quiet.waited, 1),
        single_stream_decode_tps=single_stream_tps,
        **common,
    )
    if len(ttft) >= 2:
        # Linear interpolation between the pooled samples (statistics.quantiles, inclusive).
        cuts = statistics.quantiles(ttft, n=100, method="inclusive")
        for label, value in (("p50", cuts[49]), ("p99", cuts[98])):
            yield result(
                NAME,
                f"concurrent_ttft_{label}",
                round(value, 1),
                "ms",
                samples=len(ttft),
                samples_ms=[round(x) for x in ttft],
                **common,
            )
    yield result(
        NAME,
        "concurrent_errors",
        len(errors),
        "count",
        rejected_429=len(rejected),
        statuses=sorted({s.status for s in streams}),
        different_text=sum(s.text != reference.text for s in ok),
        daemon_llm_metrics={
            k: daemon_llm.get(k)
            for k in ("completed", "failed", "rejected", "time_to_first_token_seconds")
        },
        goal="0",
        meets_goal=not errors,
        **common,
    )


def _concurrent_round(port: int, key: str) -> list[Stream]:
    return concurrent_streams(port, key, CLIENTS)


def concurrent_streams(port: int, key: str, count: int) -> list[Stream]:
    """`count` streams of CONCURRENT_MAX_TOKENS started together (one thread each); a
    client that did not finish in time is a failed Stream."""
    barrier = threading.Barrier(count)
    results: list[Stream | None] = [None] * count

    def client(index: int) -> None:
        results[index] = http_stream(port, CONCURRENT_MAX_TOKENS, barrier=barrier, key=key)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + REQUEST_TIMEOUT * 2
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [s if s is not None else Stream(0, error="client did not finish") for s in results]


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
