"""Generation slots shared fairly between API keys.

APPLIANCE_PARALLEL generations run at once. A key holds at most its share of them
(APPLIANCE_PARALLEL_PER_KEY; by default one less than all, so that one key's long or stalled
generations always leave a slot to the others). When a slot frees, it goes to the waiting
key that runs the fewest generations (first come first served between equals, and within
one key), not to whoever asked first: a key that queued many requests cannot starve one
that queued a single one.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import trio


def share_per_key(parallel: int, configured: int) -> int:
    """A key's share of the slots: the setting, or (0) all but one, and at least one."""
    if configured:
        return min(configured, parallel)
    return max(1, parallel - 1)


@dataclass
class _Waiter:
    owner: str
    order: int
    granted: bool = False
    event: trio.Event = field(default_factory=trio.Event)


class FairSlots:
    """`total` slots; `acquire(owner)` waits for one within the owner's share."""

    def __init__(self, total: int, per_owner: int) -> None:
        self.total = total
        self.per_owner = per_owner
        self.free = total
        self._running: dict[str, int] = {}
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._order = itertools.count()

    def running(self, owner: str) -> int:
        return self._running.get(owner, 0)

    def _may_take(self, owner: str) -> bool:
        return self.free > 0 and self.running(owner) < self.per_owner

    def _take(self, owner: str) -> None:
        self.free -= 1
        self._running[owner] = self.running(owner) + 1

    async def acquire(self, owner: str) -> None:
        # A free slot with waiters that could take it does not stay free (`_hand_out`), so
        # a caller that finds one is not going ahead of anyone entitled to it.
        if self._may_take(owner):
            self._take(owner)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter(owner, next(self._order))
        self._waiting.setdefault(owner, deque()).append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release(owner)
            else:
                self._forget(waiter)
            raise

    def release(self, owner: str) -> None:
        left = self.running(owner) - 1
        if left > 0:
            self._running[owner] = left
        else:
            self._running.pop(owner, None)
        self.free += 1
        self._hand_out()

    def _forget(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.owner)
        if queue is not None:
            queue.remove(waiter)
            if not queue:
                del self._waiting[waiter.owner]

    def _hand_out(self) -> None:
        while self.free > 0:
            eligible = [owner for owner in self._waiting if self.running(owner) < self.per_owner]
            if not eligible:
                return
            owner = min(eligible, key=lambda o: (self.running(o), self._waiting[o][0].order))
            queue = self._waiting[owner]
            waiter = queue.popleft()
            if not queue:
                del self._waiting[owner]
            self._take(owner)
            waiter.granted = True
            waiter.event.set()
