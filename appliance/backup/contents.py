"""What a backup holds, and where each member lives on the box.

Archive layout: `redis/dump.rdb` (the store's snapshot), `state/...` (every other file in
the state dir: the operator's and the appliance's own files), `models/manifest.json` (which
models were installed, with their checksums) and, with `--with-models`, the model files
`models/<name>.gguf`. Never archived: the development key and env files (secrets),
redis-server's own files (the snapshot stands for them), backups, the models and runtime
dirs, hidden work files (lock, rollback journal, staging) and data a restore moved aside.
`state_problem` is that rule; a restore applies the same rule to what it is given
(`appliance.backup.allowlist`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import Final

import msgspec

from appliance.backup.archive import Source
from appliance.config import Settings, masked
from appliance.envfile import DEFAULT_ENV_FILE
from appliance.llm.manifest import MANIFEST_NAME
from appliance.llm.model_files import SUFFIX, InvalidModelName, validate_model_name
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
ENV_SUFFIX: Final = ".env"


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def _excluded_dirs(settings: Settings) -> list[Path]:
    """Configured dirs that may sit inside the state dir but are not state."""
    return [Path(settings.backup_dir), Path(settings.runtime_dir), Path(settings.models_dir)]


def env_file() -> Path:
    """The env file this process was configured from (it holds SECRET_KEY)."""
    named = os.environ.get("APPLIANCE_ENV_FILE")
    return Path(named) if named else DEFAULT_ENV_FILE


def state_problem(settings: Settings, relative: PurePosixPath) -> str | None:
    """Why the state dir's file `relative` is never in a backup nor written by a restore;
    None for the files that are."""
    top = relative.parts[0]
    if top == DEV_KEY_FILE:
        return "is the development key, which a restore never replaces"
    if top == REDIS_DIR:
        return f"is in the store's directory, which a restore fills from {REDIS_MEMBER} only"
    if top.startswith("."):
        return "is a hidden work file of the appliance (lock, rollback journal, staging)"
    if top.startswith(RESTORE_PREVIOUS):
        return "is data that a restore moved aside"
    if relative.name.endswith(ENV_SUFFIX):
        return "is an env file (secrets are never backed up nor restored)"
    path = Path(settings.state_dir) / relative
    if _same(path, env_file()):
        return "is the env file (secrets are never backed up nor restored)"
    for name, directory in (
        ("backup", settings.backup_dir),
        ("models", settings.models_dir),
        ("runtime", settings.runtime_dir),
    ):
        if _inside(path, Path(directory)):
            return f"would be in the {name} directory, not in the state dir's own files"
    return None


def model_problem(name: str) -> str | None:
    """Why `name` (relative to the models dir) is not a model file that backups carry."""
    if "/" in name or not name.endswith(SUFFIX):
        return f"is not a model file (<name>{SUFFIX} directly in the models dir)"
    try:
        validate_model_name(name.removesuffix(SUFFIX))
    except InvalidModelName:
        return "is not a valid model file name"
    return None


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
        if state_problem(settings, PurePosixPath(relative.as_posix())) is None:
            chosen.append(relative)
    return chosen


def model_files(settings: Settings) -> list[Path]:
    """The models dir's model files (`<name>.gguf`, regular, not symlinks), relative to it."""
    models = Path(settings.models_dir)
    if not models.is_dir():
        return []
    return [
        Path(entry.name)
        for entry in sorted(os.scandir(models), key=lambda entry: entry.name)
        if entry.is_file(follow_symlinks=False) and model_problem(entry.name) is None
    ]


def sources(settings: Settings, snapshot: Path, *, with_models: bool) -> list[Source]:
    """Every member of a new backup; `snapshot` is the pinned copy of dump.rdb."""
    state, models = Path(settings.state_dir), Path(settings.models_dir)
    chosen = [Source(REDIS_MEMBER, snapshot)]
    chosen += [Source(STATE_PREFIX + p.as_posix(), state / p) for p in state_files(settings)]
    if with_models:
        chosen += [Source(MODELS_PREFIX + p.as_posix(), models / p) for p in model_files(settings)]
    if (models / MANIFEST_NAME).is_file():
        chosen.append(Source(MODELS_MANIFEST_MEMBER, models / MANIFEST_NAME))
    return chosen


def config_fingerprint(settings: Settings) -> str:
    """A hash of the settings with secrets masked: shows whether the config changed since."""
    shown = masked(settings)
    return hashlib.sha256(msgspec.json.encode(dict(sorted(shown.items())))).hexdigest()[:16]


def made_with_models(meta: dict[str, str]) -> bool:
    """Whether the backup was made with `--with-models` (its authenticated meta says so)."""
    return meta.get("with_models") == "true"
