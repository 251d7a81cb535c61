"""The daemon's backups: the scheduled timer, and backup/restore on request (HTTP admin
endpoints; `appliance restore` while the daemon runs).

A restore inside the daemon stops its own store (a planned outage: readiness answers 503,
the watchdog keeps pinging), swaps the data, starts the store again and checks it; on
failure the previous data goes back and the store starts on it. The timer also removes the
data that restores moved aside once it is older than APPLIANCE_RESTORE_PREVIOUS_MAX_DAYS.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Final

import msgspec
import trio

from appliance.backup import restore as restoring
from appliance.backup.archive import BackupError, BackupInfo, list_backups
from appliance.backup.jobs import BUSY_MESSAGE, exclusive, make_backup, require_embedded_store
from appliance.backup.previous import PreviousData, expire_previous, expired, list_previous
from appliance.config import Settings
from appliance.privacy.keys import Keys
from appliance.store.client import Store
from appliance.store.sealing import KeyRing
from appliance.supervisor import Service, Supervisor

LOGGER = logging.getLogger("appliance.backup")

# The first scheduled backup waits this long after start when one is overdue, so a box
# that restarts in a loop does not spend its time archiving.
FIRST_DELAY: Final = 60.0
STORE_SERVICES: Final = ("store", "redis")
# How often the timer looks at the data restores moved aside (size for metrics, expiry).
PREVIOUS_CHECK_SECONDS: Final = 60.0


class BackupState(msgspec.Struct):
    """Last results, for metrics, STATUS= and the admin endpoint."""

    running: bool = False
    last_success: float | None = None
    last_success_name: str | None = None
    last_failure: float | None = None
    last_error: str | None = None
    succeeded: int = 0
    failed: int = 0
    # Data dirs that restores moved aside (restore-previous-*): how many, and their bytes.
    previous_data_count: int = 0
    previous_data_bytes: int = 0


class BackupMetrics(BackupState, kw_only=True):
    """The results and the schedule's settings, as metrics and the admin endpoint show them."""

    interval_seconds: int
    keep: int
    previous_data_keep: int


class Backups:
    """Backup and restore for one daemon; owns the results it reports."""

    def __init__(
        self, settings: Settings, supervisor: Supervisor, store: Store, keys: Keys
    ) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.store = store
        self.keys = keys
        self.state = BackupState()
        try:
            newest = self.newest()
        except BackupError as exc:
            # Serving does not depend on backups; the timer reports the problem again.
            LOGGER.warning("backups: %s", exc)
            newest = None
        if newest is not None:
            self.state.last_success = newest.created.timestamp()
            self.state.last_success_name = newest.name
        self.refresh_previous()

    @property
    def ring(self) -> KeyRing:
        if self.keys.ring is None:  # load_keys always makes one
            raise BackupError("no SECRET_KEY is configured; backups need one")
        return self.keys.ring

    def previous(self) -> list[PreviousData]:
        """The data dirs restores moved aside, newest first (blocking: use a thread)."""
        return list_previous(self.settings)

    def refresh_previous(self) -> list[PreviousData]:
        """Count the moved-aside data for metrics (blocking: use a thread)."""
        try:
            found = list_previous(self.settings)
        except BackupError as exc:
            LOGGER.warning("backups: %s", exc)
            return []
        self.state.previous_data_count = len(found)
        self.state.previous_data_bytes = sum(item.size for item in found)
        return found

    def expire_previous(self) -> None:
        """Remove moved-aside data past its age (blocking: use a thread)."""
        if not expired(self.settings, self.refresh_previous()):
            return  # the usual case: no need to take the backup lock
        try:
            with exclusive(self.settings):
                expire_previous(self.settings)
        except BackupError as exc:
            if str(exc) != BUSY_MESSAGE:  # busy: a backup or restore runs; tried again later
                LOGGER.warning("backups: %s", exc)
        self.refresh_previous()

    def newest(self) -> BackupInfo | None:
        found = list_backups(Path(self.settings.backup_dir))
        return found[0] if found else None

    def listing(self) -> list[BackupInfo]:
        return list_backups(Path(self.settings.backup_dir))

    async def backup(self, *, with_models: bool = False) -> BackupInfo:
        """Make a backup now; a failure is recorded, logged and raised as BackupError."""
        require_embedded_store(self.settings)  # a refusal, not a failed backup
        self.state.running = True
        try:
            info = await make_backup(
                self.settings,
                self.store.client,
                keys=self.ring,
                with_models=with_models,
            )
        except Exception as exc:
            message = restoring.describe_failure(exc)
            self.state.last_failure = time.time()
            self.state.last_error = message
            self.state.failed += 1
            LOGGER.error("backup failed: %s", message)
            if isinstance(exc, BackupError):
                raise
            raise BackupError(f"backup failed: {message}") from None
        finally:
            self.state.running = False
        self.state.last_success = info.created.timestamp()
        self.state.last_success_name = info.name
        self.state.last_error = None
        self.state.succeeded += 1
        return info

    async def restore(
        self, archive: Path, options: restoring.RestoreOptions
    ) -> restoring.RestoreReport:
        """Restore `archive` into the running daemon."""
        require_embedded_store(self.settings)
        with exclusive(self.settings):
            staged = await trio.to_thread.run_sync(
                restoring.stage, self.settings, archive, self.ring, options, None, None
            )
            try:
                return await self._swap_and_check(archive, staged)
            finally:
                await trio.to_thread.run_sync(
                    lambda: shutil.rmtree(staged.directory, ignore_errors=True)
                )
                await trio.to_thread.run_sync(self.refresh_previous)

    async def _swap_and_check(
        self, archive: Path, staged: restoring.Staged
    ) -> restoring.RestoreReport:
        missing = restoring.missing_models(staged, self.settings)
        with self.supervisor.planned_outage(f"restoring {archive.name}"):
            LOGGER.warning("restoring %s: stopping the store", archive.name)
            await self._stop_store()
            swap = await trio.to_thread.run_sync(restoring.swap_in, self.settings, staged)
            try:
                await self._start_store()
                counts = await restoring.check_restored(self.store.client, self.keys.codec)
                await trio.to_thread.run_sync(restoring.finish, swap)
            except Exception as exc:
                reason = restoring.describe_failure(exc)
                LOGGER.error(
                    "restore of %s failed (%s); putting the data back", archive.name, reason
                )
                await self._stop_store()
                await trio.to_thread.run_sync(restoring.roll_back, swap)
                await self._start_store()
                raise BackupError(
                    f"the restored data did not load: {reason}; the previous data is back in place"
                ) from None
        LOGGER.warning("restored %s; previous data kept in %s", archive.name, swap.aside.name)
        return restoring.report(archive, staged, swap, counts, missing)

    async def _stop_store(self) -> None:
        for name in STORE_SERVICES:
            await self.supervisor.stop(name, timeout=self.settings.graceful_timeout)

    async def _start_store(self) -> None:
        for name in reversed(STORE_SERVICES):
            await self.supervisor.restart(name)

    def report(self) -> BackupMetrics:
        return BackupMetrics(
            **msgspec.structs.asdict(self.state),
            interval_seconds=self.settings.backup_interval_seconds,
            keep=self.settings.backup_keep,
            previous_data_keep=self.settings.restore_previous_keep,
        )

    def metrics(self) -> dict[str, Any]:
        body: dict[str, Any] = msgspec.to_builtins(self.report())
        return body

    def status_phrase(self) -> str:
        state = self.state
        if state.last_failure is not None and (
            state.last_success is None or state.last_failure > state.last_success
        ):
            return (
                f"last backup FAILED {time.strftime('%H:%M', time.localtime(state.last_failure))}"
            )
        if state.last_success is None:
            return "no backup yet"
        return f"last backup {time.strftime('%Y-%m-%d %H:%M', time.localtime(state.last_success))}"


class BackupService(Service):
    """Makes a backup every APPLIANCE_BACKUP_INTERVAL, counting from the newest one."""

    name = "backups"
    critical = False

    def __init__(self, backups: Backups, first_delay: float = FIRST_DELAY) -> None:
        self.backups = backups
        self.first_delay = first_delay

    def _seconds_until_due(self) -> float:
        interval = self.backups.settings.backup_interval_seconds
        last = self.backups.state.last_success
        if last is None:
            return 0.0
        return max(0.0, last + interval - time.time())

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_previous)
            task_status.started()
            await self._schedule()

    async def _watch_previous(self) -> None:
        while True:
            await trio.to_thread.run_sync(self.backups.expire_previous)
            await trio.sleep(PREVIOUS_CHECK_SECONDS)

    async def _schedule(self) -> None:
        interval = self.backups.settings.backup_interval_seconds
        if interval == 0 or not self.backups.settings.embedded_redis:
            await trio.sleep_forever()
        await trio.sleep(max(self._seconds_until_due(), min(self.first_delay, interval)))
        while True:
            try:
                await self.backups.backup()
                await trio.sleep(max(self._seconds_until_due(), 1.0))
            except BackupError:
                # Logged and recorded (metrics, STATUS=); serving goes on. Next try later.
                await trio.sleep(interval)
