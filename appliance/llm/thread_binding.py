"""Which cores a worker's llama.cpp threads run on: one core each, chosen by the pool.

llama-cpp-python's llama.cpp runs a decode on OpenMP threads (libgomp). Unbound, a worker
that has been idle wakes in a chain for a request (the socket wakes its reader thread,
which wakes the main thread, which wakes the OpenMP threads), and the kernel's wake-affine
placement often puts two of them on one core: the first decode of a request then ran at one
thread's speed (Gemma 3 270M on 2 cores: 22 ms instead of 12, in about half the requests),
which is time to first token. Bound through OMP_PROC_BIND and OMP_PLACES (read by libgomp
when the worker imports llama.cpp), each thread has a core of its own from the start; the
main thread takes the first, and threads it starts later (the frame reader) share it.

Several resident models each get the cores the fewest other workers use. An operator who
sets OMP_PROC_BIND, OMP_PLACES or GOMP_CPU_AFFINITY keeps theirs; and with more threads
than usable cores (APPLIANCE_THREADS above them) nothing is bound: the threads would share
cores for good. Nor where sched_setaffinity() is refused (a sandbox's system call filter):
libgomp told to bind would then fail to start its threads and end the worker.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Final

# Variables through which an operator binds OpenMP threads themselves.
OPERATOR_BINDING: Final = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")


def binding_allowed() -> bool:
    """Whether this process may bind threads to cores (setting its own mask again is the
    test); its workers run under the same sandbox."""
    try:
        os.sched_setaffinity(0, os.sched_getaffinity(0))
    except OSError:
        return False
    return True


def allowed_cores() -> list[int]:
    """The cores this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def choose_cores(
    threads: int, usable: Sequence[int], taken: Iterable[Sequence[int]]
) -> tuple[int, ...]:
    """`threads` distinct cores of `usable` for a new worker, those that the fewest other
    workers (`taken`: their cores) run on first, lower numbers first among equals; () when
    there are fewer usable cores than threads."""
    if not 0 < threads <= len(usable):
        return ()
    load = Counter(core for cores in taken for core in cores)
    order = {core: index for index, core in enumerate(usable)}
    ranked = sorted(usable, key=lambda core: (load[core], order[core]))
    return tuple(sorted(ranked[:threads], key=order.__getitem__))


def binding_environment(
    cores: Sequence[int], environ: Mapping[str, str], usable: Collection[int]
) -> dict[str, str]:
    """The variables that bind a worker's OpenMP threads to `cores`, one thread a core; none
    when there are no cores to bind to, the operator binds threads in `environ`, or one of
    the cores is no longer `usable` (the process's CPU set shrank since they were chosen:
    libgomp would fail to start a thread there and end the worker)."""
    if not cores or any(name in environ for name in OPERATOR_BINDING):
        return {}
    if not set(cores) <= set(usable):
        return {}
    places = ",".join(f"{{{core}}}" for core in cores)
    return {"OMP_PROC_BIND": "close", "OMP_PLACES": places}
