"""What a backup holds, and where each member lives on the box.

Archive layout: `redis/dump.rdb` (the store's snapshot), `state/...` (every other file in
the state dir: the operator's and the appliance's own files), `models/manifest.json` (which
models were installed, with their checksums) and, with `--with-models`, the model files
under `models/`. Never archived: the development key (a secret), redis-server's own files
(the snapshot stands for them), backups, the runtime dir and work dirs of backup/restore.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Final

import msgspec

from appliance.backup.archive import Source
from appliance.config import Settings, masked
from appliance.llm.manifest import MANIFEST_NAME
from appliance.privacy.keys import DEV_KEY_FILE

REDIS_MEMBER: Final = "redis/dump.rdb"
STATE_PREFIX: Final = "state/"
MODELS_PREFIX: Final = "models/"
MODELS_MANIFEST_MEMBER: Final = MODELS_PREFIX + MANIFEST_NAME
REDIS_DIR: Final = "redis"
# Work dirs inside the state dir; their names start with these.
BACKUP_STAGING: Final = ".backup-staging"
RESTORE_STAGING: Final = ".restore-staging"
RESTORE_PREVIOUS: Final = "restore-previous-"
LOCK_NAME: Final = ".backup.lock"
RESTORE_JOURNAL: Final = ".restore-journal"
_SKIPPED_NAMES: Final = {DEV_KEY_FILE, REDIS_DIR, LOCK_NAME}


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def _excluded_dirs(settings: Settings) -> list[Path]:
    """Configured dirs that may sit inside the state dir but are not state."""
    return [Path(settings.backup_dir), Path(settings.runtime_dir), Path(settings.models_dir)]


def _walk_files(root: Path, skip_dirs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for directory, dirnames, filenames in os.walk(root):
        here = Path(directory)
        dirnames[:] = sorted(
            name
            for name in dirnames
            if not any(_same(here / name, skip) for skip in skip_dirs)
            and not (here / name).is_symlink()
        )
        files.extend(here / name for name in sorted(filenames) if (here / name).is_file())
    return [path for path in files if not path.is_symlink()]


def _same(path: Path, other: Path) -> bool:
    try:
        return path.resolve() == other.resolve()
    except OSError:
        return False


def state_files(settings: Settings) -> list[Path]:
    """The state dir's files a backup carries, relative to the state dir."""
    state = Path(settings.state_dir)
    if not state.is_dir():
        return []
    skip = _excluded_dirs(settings)
    chosen: list[Path] = []
    for path in _walk_files(state, skip):
        relative = path.relative_to(state)
        top = relative.parts[0]
        if top in _SKIPPED_NAMES or top.startswith((BACKUP_STAGING, RESTORE_STAGING)):
            continue
        if top.startswith(RESTORE_PREVIOUS) or top.startswith("."):
            continue
        chosen.append(relative)
    return chosen


def model_files(settings: Settings) -> list[Path]:
    """The models dir's regular files (weights and manifest), relative to it; no lock files."""
    models = Path(settings.models_dir)
    if not models.is_dir():
        return []
    return [
        path.relative_to(models)
        for path in _walk_files(models, [])
        if not path.name.startswith(".")
    ]


def sources(settings: Settings, snapshot: Path, *, with_models: bool) -> list[Source]:
    """Every member of a new backup; `snapshot` is the pinned copy of dump.rdb."""
    state, models = Path(settings.state_dir), Path(settings.models_dir)
    chosen = [Source(REDIS_MEMBER, snapshot)]
    chosen += [Source(STATE_PREFIX + p.as_posix(), state / p) for p in state_files(settings)]
    if with_models:
        chosen += [Source(MODELS_PREFIX + p.as_posix(), models / p) for p in model_files(settings)]
    elif (models / MANIFEST_NAME).is_file():
        chosen.append(Source(MODELS_MANIFEST_MEMBER, models / MANIFEST_NAME))
    return chosen


def config_fingerprint(settings: Settings) -> str:
    """A hash of the settings with secrets masked: shows whether the config changed since."""
    shown = masked(settings)
    return hashlib.sha256(msgspec.json.encode(dict(sorted(shown.items())))).hexdigest()[:16]


def includes_models(members: list[str]) -> bool:
    return any(
        name.startswith(MODELS_PREFIX) and name != MODELS_MANIFEST_MEMBER for name in members
    )
