"""A short run of the fault-injection driver behind `make chaos` (stress/chaos.py).

Clients write conversations while redis-server, the inference worker and the whole daemon
are killed with SIGKILL (the daemon is started again on its state dir, as systemd would);
then every acknowledged write must be stored intact and once, and the daemon ready.
"""

from __future__ import annotations

import json

import trio

from stress.chaos import KINDS, run_chaos

FAULT_SECONDS = 15.0


async def test_acknowledged_writes_survive_kills_of_redis_worker_and_daemon() -> None:
    with trio.fail_after(240):
        report = await run_chaos(FAULT_SECONDS, clients=3)
    print(*(json.dumps(line) for line in report.lines()), sep="\n")
    assert report.came_back, report.problems
    assert not report.problems, report.problems
    # Every kind of fault happened at least once (the driver finishes its round).
    assert all(report.kills[kind] >= 1 for kind in KINDS), report.kills
    assert len(report.recovery["daemon"]) == report.kills["daemon"]
    assert report.acknowledged > 0
    assert report.lost == []
    assert report.changed == []
    assert report.duplicated == []
    # Writes that failed while something was down were refused, never acknowledged.
    assert sum(report.failed.values()) > 0
    assert report.ok()
