"""Workers of different models share the cores (appliance.llm.core_share): each takes the
configured threads divided by the workers decoding now, in real processes sharing the
table, and a killed worker's record stops counting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from appliance.llm.core_share import SLOTS, CoreShare
from tests.harness import short_tempdir

# A worker in a process of its own: it decodes (marks itself busy) until told to stop.
CHILD = """
import sys, time
from pathlib import Path
from appliance.llm.core_share import CoreShare
share = CoreShare(Path(sys.argv[1]), 4)
print(share.threads(), flush=True)
for line in sys.stdin:
    if line.strip() == "idle":
        share.idle()
    elif line.strip() == "close":
        share.close()
    print("ok", flush=True)
"""


def _child(path: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    child.stdout.readline()  # it is decoding now
    return child


def _tell(child: subprocess.Popen[str], what: str) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(what + "\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "ok"


def test_decoding_workers_split_the_threads_and_an_idle_one_gives_them_back() -> None:
    path = short_tempdir("cs") / "core-share"
    mine = CoreShare(path, 4)
    assert mine.threads() == 4  # alone
    other = _child(path)
    try:
        assert mine.threads() == 2
        third = _child(path)
        try:
            assert mine.threads() == 1  # 4 // 3
            _tell(third, "idle")
            assert mine.threads() == 2
        finally:
            third.kill()
            third.wait()
        _tell(other, "close")
        assert mine.threads() == 4
    finally:
        other.kill()
        other.wait()
    mine.close()


def test_a_killed_worker_stops_counting_and_its_record_is_taken_again() -> None:
    path = short_tempdir("cs") / "core-share"
    mine = CoreShare(path, 2)
    killed = _child(path)
    assert mine.threads() == 1
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    deadline = time.monotonic() + 10
    while mine.threads() != 2:
        assert time.monotonic() < deadline, "a dead worker still counts"
        time.sleep(0.01)
    # Its record is taken again: SLOTS - 1 more workers fit beside this one, each in the
    # table (one left out of it would take all of its threads).
    others = [CoreShare(path, 2) for _ in range(SLOTS - 1)]
    assert [share.threads() for share in others] == [1] * (SLOTS - 1)
    for share in others:
        share.close()
    mine.close()


def test_a_single_thread_is_never_split_below_one() -> None:
    path = short_tempdir("cs") / "core-share"
    mine = CoreShare(path, 1)
    other = CoreShare(path, 1)
    assert other.threads() == 1
    assert mine.threads() == 1
    other.close()
    mine.close()
