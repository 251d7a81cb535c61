"""Core daemon costs: HTTP throughput against bare Hypercorn, time to READY=1, idle memory."""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import time
from collections.abc import Iterator
from typing import Any, Final

import httpx
import psutil
from harness import (
    BENCH_DIR,
    Daemon,
    free_port,
    note,
    result,
    short_tempdir,
    spawn_python,
    stop,
    wait_for_port,
)

NAME: Final = "core"
LIVE: Final = "/api/v1/health/live"
RATIO_GOAL: Final = 0.8
RSS_GOAL_MB: Final = 100.0
IDLE_WAIT: Final = 2.0
STARTUPS: Final = 3
MB: Final = 1024 * 1024
# As shipped: INFO writes one access line per request, part of the real cost.
DAEMON_LOG_LEVEL: Final = "INFO"


def run(quick: bool) -> Iterator[dict[str, Any]]:
    yield from startup_time()
    yield from idle_memory()
    yield from throughput(requests=500 if quick else 3000, rounds=2 if quick else 3)


def startup_time() -> Iterator[dict[str, Any]]:
    samples = []
    for attempt in range(STARTUPS):
        with short_tempdir() as state, Daemon(state) as daemon:
            started = daemon.start()
            samples.append((daemon.wait_ready() - started) * 1000)
            note(f"startup {attempt + 1}/{STARTUPS}: READY=1 after {samples[-1]:.0f} ms")
    samples_ms = [round(s, 1) for s in samples]
    yield result(
        NAME,
        "start_to_ready_median",
        round(statistics.median(samples), 1),
        "ms",
        samples=samples_ms,
    )
    yield result(NAME, "start_to_ready_min", round(min(samples), 1), "ms", samples=samples_ms)


def idle_memory() -> Iterator[dict[str, Any]]:
    with short_tempdir() as state, Daemon(state) as daemon:
        daemon.start()
        daemon.wait_ready()
        time.sleep(IDLE_WAIT)  # let start-up garbage settle and the first probes run
        services = httpx.get(
            daemon.base_url + "/api/v1/health/services", headers=daemon.auth(), timeout=5
        ).json()
        redis_pid = next(s["pid"] for s in services["services"] if s["name"] == "redis")
        assert daemon.process is not None
        supervisor_mb = psutil.Process(daemon.process.pid).memory_info().rss / MB
        redis_mb = psutil.Process(redis_pid).memory_info().rss / MB
    total = supervisor_mb + redis_mb
    yield result(NAME, "idle_rss_supervisor", round(supervisor_mb, 1), "MB")
    yield result(NAME, "idle_rss_redis", round(redis_mb, 1), "MB")
    yield result(
        NAME,
        "idle_rss_total",
        round(total, 1),
        "MB",
        goal=f"< {RSS_GOAL_MB:g}",
        meets_goal=total < RSS_GOAL_MB,
    )


def throughput(requests: int, rounds: int) -> Iterator[dict[str, Any]]:
    """Best requests/s per server; servers take turns so drift on a noisy box hits all."""
    best: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        ports = {"appliance": _start_daemon(stack)}
        for kind in ("quart", "asgi"):
            ports[f"bare-{kind}"] = _start_bare(stack, kind)
        order = list(ports)
        for round_ in range(rounds):
            # Alternate the order too, so no server always runs right after the same one.
            for server in order if round_ % 2 == 0 else order[::-1]:
                rps, client_cpu = _load(ports[server], requests)
                note(
                    f"round {round_ + 1}/{rounds}: {server} {rps:.0f} req/s "
                    f"(client CPU {client_cpu:.0%})"
                )
                best[server] = max(best.get(server, 0.0), rps)
    common = {"path": LIVE, "requests": requests, "rounds": rounds, "connections": 8}
    for server, rps in best.items():
        extra = {"log_level": DAEMON_LOG_LEVEL} if server == "appliance" else {}
        yield result(NAME, "live_rps", round(rps), "req/s", server=server, **common, **extra)
    for baseline in ("bare-quart", "bare-asgi"):
        ratio = best["appliance"] / best[baseline]
        yield result(
            NAME,
            f"live_rps_ratio_vs_{baseline}",
            round(ratio, 3),
            "ratio",
            appliance=round(best["appliance"]),
            baseline=round(best[baseline]),
            baseline_server=baseline,
            goal=f">= {RATIO_GOAL}",
            meets_goal=ratio >= RATIO_GOAL,
        )


def _start_daemon(stack: contextlib.ExitStack) -> int:
    state = stack.enter_context(short_tempdir())
    daemon = stack.enter_context(Daemon(state, DAEMON_LOG_LEVEL))
    daemon.start()
    daemon.wait_ready()
    return daemon.port


def _start_bare(stack: contextlib.ExitStack, kind: str) -> int:
    port = free_port()
    process = spawn_python([str(BENCH_DIR / "bare_server.py"), "--port", str(port), "--kind", kind])
    stack.callback(stop, process)
    wait_for_port(port, process)
    return port


def _load(port: int, requests: int) -> tuple[float, float]:
    argv = [str(BENCH_DIR / "loadgen.py"), "--port", str(port), "--requests", str(requests)]
    argv += ["--warmup", str(max(100, requests // 10))]
    process = spawn_python(argv, stdout=subprocess.PIPE)
    try:
        out, _ = process.communicate(timeout=120)
    finally:
        stop(process)
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed with {process.returncode}")
    report = json.loads(out)
    if report["errors"] or '"alive"' not in report["body"]:
        raise RuntimeError(f"bad answers from port {port}: {report}")
    return float(report["rps"]), float(report["client_cpu_fraction"])
