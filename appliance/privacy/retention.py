"""The retention sweep: conversations idle longer than PRIVACY_RETENTION_DAYS are deleted.

It walks the time index from its oldest end, so a sweep costs in proportion to what
expires, not to what is stored. Only counts are logged, never content.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from appliance.store.conversations import Conversations
from appliance.supervisor import Service

LOGGER = logging.getLogger("appliance.privacy")

DAY_SECONDS = 86_400


class RetentionService(Service):
    """Sweeps at start and then every `interval` seconds; failures are logged and retried."""

    name = "retention"
    critical = False

    def __init__(
        self,
        conversations: Conversations,
        retention_days: int,
        interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.conversations = conversations
        self.retention_days = retention_days
        self.interval = interval
        self.clock = clock
        self.last_sweep: float | None = None
        self.last_removed = 0
        self.total_removed = 0
        self.last_error: str | None = None

    async def sweep(self) -> int:
        cutoff = self.clock() - self.retention_days * DAY_SECONDS
        removed = await self.conversations.expire_older_than(cutoff)
        self.last_sweep = self.clock()
        self.last_removed = removed
        self.total_removed += removed
        self.last_error = None
        if removed:
            LOGGER.info(
                "retention sweep deleted %d conversations idle for over %d days",
                removed,
                self.retention_days,
            )
        return removed

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.sweep()
            except Exception as exc:
                # The store may be restarting; the next sweep catches up.
                self.last_error = type(exc).__name__
                LOGGER.warning("retention sweep failed (%s); retrying later", type(exc).__name__)
            await trio.sleep(self.interval)
