"""llama.cpp's threads in a worker each run on a core of their own (a request's first decode
then uses them all); several models spread over the cores; an operator's own OpenMP binding
is left alone."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from appliance.llm.thread_binding import binding_environment, choose_cores
from tests.harness import running_daemon
from tests.no_affinity import libseccomp

THREADS = min(2, len(os.sched_getaffinity(0)))


def test_each_new_worker_takes_the_cores_the_fewest_workers_use() -> None:
    usable = [0, 1, 2, 3, 4, 5]
    first = choose_cores(2, usable, [])
    second = choose_cores(2, usable, [first])
    third = choose_cores(2, usable, [first, second])
    assert (first, second, third) == ((0, 1), (2, 3), (4, 5))
    # Every core taken once: the next shares with the first, again in order.
    assert choose_cores(4, usable, [first, second, third]) == (0, 1, 2, 3)
    # The order is the usable cores' (a process may be allowed, say, 6 and 2 only).
    assert choose_cores(2, [6, 2], []) == (6, 2)
    # More threads than cores: nothing bound, the threads would share cores for good.
    assert choose_cores(3, [0, 1], []) == ()


def test_the_binding_names_one_place_a_core_unless_the_operator_binds_threads() -> None:
    usable = range(4)
    bound = binding_environment((2, 3), {}, usable)
    assert bound == {"OMP_PROC_BIND": "close", "OMP_PLACES": "{2},{3}"}
    assert binding_environment((), {}, usable) == {}
    for name in ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY"):
        assert binding_environment((0, 1), {name: "x"}, usable) == {}
    # A worker started again after the CPU set shrank: not bound to a core it may not use.
    assert binding_environment((2, 3), {}, [0, 1, 2]) == {}


def _thread_cores(pid: int) -> list[set[int]]:
    """The cores each thread of a process may run on."""
    found = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        status = (task / "status").read_text()
        allowed = status.split("Cpus_allowed_list:")[1].split()[0]
        cores: set[int] = set()
        for part in allowed.split(","):
            low, _, high = part.partition("-")
            cores.update(range(int(low), int(high or low) + 1))
        found.append(cores)
    return found


async def _worker_threads(
    env: dict[str, str], wrapper: Sequence[str] = ()
) -> tuple[list[set[int]], str]:
    """The cores each thread of the worker may run on, after a generation; the daemon's log."""
    async with running_daemon(env, wrapper=wrapper) as daemon, daemon.client() as client:
        # The OpenMP threads start with the first decode.
        answer = await client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 2}
        )
        assert answer.status_code == 200, answer.text
        pid = await daemon.service_pid("worker:tiny")
        return _thread_cores(pid), daemon.log_path.read_text()


async def test_a_workers_llama_threads_run_on_cores_of_their_own() -> None:
    with trio.fail_after(90):
        threads, _ = await _worker_threads({"APPLIANCE_THREADS": str(THREADS)})
    # The main thread (and the frame reader it started) on the first core, each other
    # llama.cpp thread on the next: every thread bound to one core, `THREADS` cores in all.
    assert all(len(cores) == 1 for cores in threads), threads
    assert len(set().union(*threads)) == THREADS, threads


async def test_an_operators_openmp_binding_is_left_alone() -> None:
    usable = set(os.sched_getaffinity(0))
    env = {"APPLIANCE_THREADS": str(THREADS), "OMP_PROC_BIND": "false"}
    with trio.fail_after(90):
        threads, _ = await _worker_threads(env)
    assert all(cores == usable for cores in threads), threads


@pytest.mark.skipif(libseccomp() is None, reason="libseccomp is not installed")
async def test_where_binding_is_refused_the_threads_run_unbound_and_the_log_says_so() -> None:
    # A system call filter that refuses sched_setaffinity(): told to bind, libgomp could
    # not start its threads and the worker would end at its first decode.
    usable = set(os.sched_getaffinity(0))
    wrapper = [sys.executable, str(Path(__file__).parent / "no_affinity.py")]
    with trio.fail_after(90):
        threads, log = await _worker_threads({"APPLIANCE_THREADS": str(THREADS)}, wrapper)
    assert all(cores == usable for cores in threads), threads
    assert "not bound to cores: sched_setaffinity() is refused" in log
