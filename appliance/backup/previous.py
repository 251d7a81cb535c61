"""The data a restore moved aside: `<state>/restore-previous-<UTC time>/`.

Each successful restore leaves one such directory (the store, state files and replaced
model files from before it), so that an operator can go back by hand. They are kept until
the operator removes them (`appliance backups prune-previous`) or they are older than
APPLIANCE_RESTORE_PREVIOUS_MAX_DAYS; a backup never removes them. At most
APPLIANCE_RESTORE_PREVIOUS_KEEP are kept: a restore refuses to start when that many exist,
rather than deleting any itself. Listed by `appliance backups` and the admin API, counted in
metrics. Blocking file work: the daemon calls it through `trio.to_thread`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from appliance.backup.contents import RESTORE_PREVIOUS
from appliance.backup.manifest import BackupError
from appliance.config import Settings

LOGGER = logging.getLogger("appliance.backup")

STAMP_FORMAT: Final = "%Y%m%d-%H%M%S-%f"
PRUNE_COMMAND: Final = "appliance backups prune-previous"


class PreviousDataFull(BackupError):
    """A restore would keep more moved-aside data than APPLIANCE_RESTORE_PREVIOUS_KEEP."""


@dataclass(frozen=True)
class PreviousData:
    """One directory of data that a restore moved aside."""

    name: str
    path: Path
    size: int  # bytes of the regular files in it
    created: datetime


def new_name(when: datetime) -> str:
    return RESTORE_PREVIOUS + when.astimezone(UTC).strftime(STAMP_FORMAT)


def _size(path: Path) -> int:
    total = 0
    for directory, _, files in os.walk(path):  # never follows symlinks into other places
        for name in files:
            try:
                status = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            total += status.st_size
    return total


def _created(entry: os.DirEntry[str]) -> datetime | None:
    try:
        return datetime.strptime(entry.name.removeprefix(RESTORE_PREVIOUS), STAMP_FORMAT).replace(
            tzinfo=UTC
        )
    except ValueError:
        try:
            return datetime.fromtimestamp(entry.stat(follow_symlinks=False).st_mtime, UTC)
        except OSError:
            return None


def list_previous(settings: Settings) -> list[PreviousData]:
    """The moved-aside data dirs, newest first."""
    state = Path(settings.state_dir)
    try:
        entries = list(os.scandir(state))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise BackupError(f"cannot list the state directory: {exc.strerror}") from None
    found = []
    for entry in entries:
        if not entry.name.startswith(RESTORE_PREVIOUS) or not entry.is_dir(follow_symlinks=False):
            continue
        created = _created(entry)
        if created is not None:
            path = Path(entry.path)
            found.append(PreviousData(entry.name, path, _size(path), created))
    found.sort(key=lambda item: (item.created, item.name), reverse=True)
    return found


def check_room(settings: Settings) -> None:
    """Refuse a restore that would keep more than APPLIANCE_RESTORE_PREVIOUS_KEEP dirs."""
    kept = list_previous(settings)
    if len(kept) >= settings.restore_previous_keep:
        raise PreviousDataFull(
            f"{len(kept)} dirs of data moved aside by earlier restores are kept (the oldest is "
            f"{kept[-1].name}), as many as APPLIANCE_RESTORE_PREVIOUS_KEEP="
            f"{settings.restore_previous_keep} allows; nothing was changed. Copy off what you "
            f"still need and remove them with: {PRUNE_COMMAND}"
        )


def _remove(item: PreviousData) -> None:
    try:
        shutil.rmtree(item.path)
    except OSError as exc:
        raise BackupError(
            f"cannot remove {item.name}: {exc.strerror}; check the state directory's permissions"
        ) from None


def prune_previous(settings: Settings, keep: int = 0) -> list[PreviousData]:
    """Remove all but the newest `keep` dirs (the explicit command); those removed."""
    removed = list_previous(settings)[keep:]
    for item in removed:
        _remove(item)
        LOGGER.info("removed %s (%d bytes of data from before a restore)", item.name, item.size)
    return removed


def expired(
    settings: Settings, found: list[PreviousData], now: datetime | None = None
) -> list[PreviousData]:
    """Those of `found` older than APPLIANCE_RESTORE_PREVIOUS_MAX_DAYS (0: none ever)."""
    days = settings.restore_previous_max_days
    if days == 0:
        return []
    limit = (now or datetime.now(UTC)) - timedelta(days=days)
    return [item for item in found if item.created < limit]


def expire_previous(settings: Settings, now: datetime | None = None) -> list[PreviousData]:
    """Remove the dirs older than APPLIANCE_RESTORE_PREVIOUS_MAX_DAYS; the caller holds the
    backup lock."""
    days = settings.restore_previous_max_days
    gone = expired(settings, list_previous(settings), now)
    for item in gone:
        _remove(item)
        LOGGER.warning(
            "removed %s: data from before a restore, older than "
            "APPLIANCE_RESTORE_PREVIOUS_MAX_DAYS=%d",
            item.name,
            days,
        )
    return gone
