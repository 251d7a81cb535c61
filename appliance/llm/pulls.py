"""Pulls the daemon runs for `POST /api/v1/models/pull`, each in a thread, with progress.

A supervised service of its own: stopping the daemon stops its downloads (a partial file is
kept; the next pull of the same URL and name resumes it). The last `KEEP_JOBS` pulls stay
listed with how they ended.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from functools import partial
from typing import Any, Final, Literal

import msgspec
import trio

from appliance.config import Settings
from appliance.llm.pull import Puller, PullError, PullRefused, shown_url
from appliance.llm.registry import ModelRegistry, RegistryError
from appliance.supervisor import Service

LOGGER = logging.getLogger("appliance.llm")

KEEP_JOBS: Final = 20
PullState = Literal["downloading", "done", "failed"]


class PullJob(msgspec.Struct, kw_only=True):
    """One pull: where from, into which name, how far, and how it ended."""

    id: str
    name: str
    url: str
    state: PullState
    done_bytes: int = 0
    # Null until the server says how large the file is.
    total_bytes: int | None = None
    resumed_from_bytes: int = 0
    started: float
    finished: float | None = None
    sha256: str | None = None
    error: str | None = None


class PullBusy(PullRefused):
    """A pull into the same name is running."""


class Pulls(Service):
    """The daemon's pulls; `start` checks a request and starts it in the background."""

    name = "pulls"
    critical = False

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.jobs: OrderedDict[str, PullJob] = OrderedDict()
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._running: set[str] = set()

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def _puller(self, job: PullJob | None = None, cancel: threading.Event | None = None) -> Puller:
        def progress(done: int, total: int) -> None:
            if job is not None:
                job.done_bytes, job.total_bytes = done, total or None

        return Puller(
            self.registry,
            allowed_hosts=self.settings.pull_allowed_hosts,
            max_bytes=self.settings.pull_max_size,
            progress=progress,
            cancelled=cancel.is_set if cancel is not None else None,
        )

    async def start(self, url: str, name: str | None, sha256: str | None) -> PullJob:
        """Check the request (policy, name, checksum form) and start the download; raises
        RegistryError (PullRefused, ModelExists, InvalidModelName) when it cannot start."""
        if self._nursery is None:
            raise PullError("the daemon is stopping; pull again once it runs")
        model, expected = await trio.to_thread.run_sync(self._puller().prepare, url, name, sha256)
        if model in self._running:
            raise PullBusy(f"model {model!r} is being pulled already; wait for that pull")
        job = PullJob(
            id=f"pull-{next(self._ids)}",
            name=model,
            url=shown_url(url),
            state="downloading",
            started=time.time(),
        )
        self.jobs[job.id] = job
        while len(self.jobs) > KEEP_JOBS:
            oldest = next(iter(self.jobs.values()))
            if oldest.state == "downloading":
                break
            self.jobs.popitem(last=False)
        self._running.add(model)
        self._nursery.start_soon(self._pull, job, url, expected)
        return job

    async def _pull(self, job: PullJob, url: str, sha256: str | None) -> None:
        cancel = threading.Event()
        puller = self._puller(job, cancel)
        try:
            record = await trio.to_thread.run_sync(
                partial(puller.pull, url, name=job.name, sha256=sha256), abandon_on_cancel=True
            )
        except trio.Cancelled:
            cancel.set()
            job.state, job.error = "failed", "the daemon stopped; pull again to resume"
            raise
        except (RegistryError, OSError) as exc:
            job.state = "failed"
            job.error = str(exc) if isinstance(exc, RegistryError) else exc.strerror or str(exc)
            LOGGER.warning("pull of %s into %s failed: %s", job.url, job.name, job.error)
        else:
            job.state, job.sha256 = "done", record.sha256
            job.done_bytes = job.total_bytes = record.size
            LOGGER.info("model %s pulled from %s (sha256 %s)", job.name, job.url, record.sha256)
        finally:
            job.resumed_from_bytes = puller.resumed_from
            job.finished = time.time()
            self._running.discard(job.name)
