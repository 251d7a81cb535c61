"""What a command run by root leaves in the appliance's data goes back to the data's owner.

On a box the daemon runs as the service account and its state directory belongs to it. An
operator runs the CLI as root: Redis's files (when the command started redis-server
itself), backups, the backup lock and imported models would then belong to root, and the
daemon, which runs with PrivateUsers= (where root's files belong to nobody), could not
write or even read them. So data commands end by handing what root made back to the
state directory's owner. Reading the operator's own files (an archive to restore, a model
to import) still happens as root.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from appliance.config import Settings


def data_owner(settings: Settings) -> tuple[int, int] | None:
    """(uid, gid) of the data, or None when there is nothing to hand back: not root, no
    state directory yet, or one that root owns (a developer's box)."""
    if os.geteuid() != 0:
        return None
    try:
        info = os.stat(settings.state_dir)
    except FileNotFoundError:
        return None
    if info.st_uid == 0:
        return None
    return info.st_uid, info.st_gid


def hand_back(settings: Settings) -> int:
    """Give everything root owns in the state, models and backup directories to the data's
    owner; how many entries changed hands."""
    owner = data_owner(settings)
    if owner is None:
        return 0
    changed = 0
    refused: list[Path] = []
    roots = {Path(settings.state_dir), Path(settings.models_dir), Path(settings.backup_dir)}
    for root in roots:
        for path in _walk(root):
            try:
                if path.lstat().st_uid == 0:
                    os.lchown(path, *owner)
                    changed += 1
            except FileNotFoundError:
                continue
            except OSError:
                # A read-only mount, say: the command's own outcome still stands.
                refused.append(path)
    if refused:
        print(
            f"appliance: could not give {len(refused)} file(s) back to uid {owner[0]} "
            f"(first: {refused[0]}); run: chown -R {owner[0]}:{owner[1]} {settings.state_dir}",
            file=sys.stderr,
        )
    return changed


@contextlib.contextmanager
def handing_back(settings: Settings) -> Iterator[None]:
    """Run a data command; whatever it leaves owned by root goes back to the data's owner."""
    try:
        yield
    finally:
        hand_back(settings)


def _walk(root: Path) -> Iterator[Path]:
    if not root.exists():
        return
    yield root
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            yield Path(folder, name)
