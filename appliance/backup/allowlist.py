"""Which members a restore takes, and where each one goes: the allow-list of each format.

A restore writes exactly the members that a backup of the archive's format writes, each to
its own fixed destination, and refuses the whole archive for any other member, before
anything is extracted or moved:

- `redis/dump.rdb` (required): `<state>/redis/dump.rdb`; nothing else ever goes into the
  store's directory (no AOF, no config).
- `state/<path>`: `<state>/<path>`, for the files a backup carries (`contents.state_problem`:
  never the development key, env files, hidden work files such as the rollback journal,
  data moved aside, nor anything in the backup, models or runtime dirs), and only through
  real directories of this box (never through a symlink).
- `models/manifest.json`: read for the report of missing models; never installed as it is.
- `models/<name>.gguf`: `<models>/<name>.gguf`, only when the backup was made with models.

Formats 1 and 2 were written with the same layout; each has its entry so that a future
format states its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final, Literal

from appliance.backup import contents
from appliance.backup.manifest import (
    FORMAT_VERSION,
    UNAUTHENTICATED_VERSION,
    BackupError,
    Manifest,
    show,
)
from appliance.config import Settings

Kind = Literal["store", "state", "model", "models_manifest"]


@dataclass(frozen=True)
class Placement:
    """One member and where it goes (`target` is None for a member that is only read)."""

    member: str
    kind: Kind
    target: Path | None


@dataclass(frozen=True)
class Plan:
    """Every member of an admitted archive, placed."""

    placements: list[Placement]
    with_models: bool

    def of_kind(self, kind: Kind) -> list[Placement]:
        return [p for p in self.placements if p.kind == kind]


def _place_v1_v2(settings: Settings, name: str, with_models: bool) -> Placement:
    """Where a member of format 1 or 2 goes; BackupError when it is not one of theirs."""
    state, models = Path(settings.state_dir), Path(settings.models_dir)
    if name == contents.REDIS_MEMBER:
        return Placement(name, "store", state / contents.REDIS_DIR / "dump.rdb")
    if name == contents.MODELS_MANIFEST_MEMBER:
        return Placement(name, "models_manifest", None)
    if name.startswith(contents.STATE_PREFIX):
        relative = PurePosixPath(name.removeprefix(contents.STATE_PREFIX))
        problem = contents.state_problem(settings, relative)
        if problem is None:
            problem = _through_symlink(state, relative)
        if problem is not None:
            raise _refused(name, problem)
        return Placement(name, "state", state / relative)
    if name.startswith(contents.MODELS_PREFIX):
        file = name.removeprefix(contents.MODELS_PREFIX)
        problem = contents.model_problem(file)
        if problem is None and not with_models:
            problem = (
                "is a model file, but the backup was made without models "
                "(its manifest says with_models is not true)"
            )
        if problem is not None:
            raise _refused(name, problem)
        return Placement(name, "model", models / file)
    raise _refused(name, "is not a member that a backup writes")


_LAYOUTS: Final[dict[int, Callable[[Settings, str, bool], Placement]]] = {
    UNAUTHENTICATED_VERSION: _place_v1_v2,
    FORMAT_VERSION: _place_v1_v2,
}


def plan_restore(settings: Settings, manifest: Manifest) -> Plan:
    """Place every member of the archive, or refuse it naming the first member refused."""
    place = _LAYOUTS.get(manifest.format_version)
    if place is None:  # decode_manifest reads no other format; a new one needs its entry
        raise BackupError(f"format {manifest.format_version} has no restore layout")
    with_models = contents.made_with_models(manifest.meta)
    placements = [place(settings, entry.name, with_models) for entry in manifest.members]
    if not any(p.kind == "store" for p in placements):
        raise BackupError(f"it holds no store snapshot ({contents.REDIS_MEMBER})")
    return Plan(placements, with_models)


def _through_symlink(state: Path, relative: PurePosixPath) -> str | None:
    """Why writing `relative` under the state dir would leave it, or replace a directory."""
    here = state
    for part in relative.parts[:-1]:
        here = here / part
        if here.is_symlink():
            return f"would be written through the symlink {show(str(here.relative_to(state)))}"
        if here.exists() and not here.is_dir():
            return f"needs {show(str(here.relative_to(state)))} to be a directory"
    target = state / relative
    if target.is_symlink() or (target.exists() and not target.is_file()):
        return "would replace something that is not a regular file"
    return None


def _refused(name: str, problem: str) -> BackupError:
    return BackupError(
        f"member {show(name)} {problem}; a backup never holds it, so the archive was altered "
        "or not made by this appliance (nothing was changed)"
    )
