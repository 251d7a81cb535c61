"""`appliance update NEW`: back up, swap the installed program for NEW atomically (the
previous one is kept), restart, wait for ready; if the new one is not ready in time, put
the previous one back, restart it and exit non-zero saying so.

The program is the one-dir build (a directory with the `appliance` executable, installed
as /usr/lib/appliance with /usr/bin/appliance linking into it). The two directories are
swapped with one renameat2(RENAME_EXCHANGE), so at no moment is there no program.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Final

from appliance.config import Settings
from appliance.ops.control import ControlError, serving_version, systemctl, wait_until_ready
from appliance.ops.owner import handing_back

EXECUTABLE: Final = "appliance"
VERSION_TIMEOUT: Final = 60.0
DEFAULT_READY_TIMEOUT: Final = 300.0
_RENAME_EXCHANGE: Final = 2
_AT_FDCWD: Final = -100


class UpdateError(RuntimeError):
    """The update did not happen (nothing was changed) or was rolled back; says which."""


def _build_dir(path: Path) -> Path:
    directory = path if path.is_dir() else path.parent
    executable = directory / EXECUTABLE
    if not (executable.is_file() and os.access(executable, os.X_OK)):
        raise UpdateError(f"{path} is not an appliance build: no executable {executable}")
    return directory.resolve()


def _install_dir(given: Path | None) -> Path:
    if given is not None:
        return given.resolve()
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve().parent
    raise UpdateError(
        "running from source, so there is no installed build to replace: pass --install-dir"
    )


def build_version(directory: Path) -> str:
    """What `NEW/appliance --version` says; refuses a build that cannot even say that."""
    try:
        done = subprocess.run(
            [str(directory / EXECUTABLE), "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UpdateError(
            f"the new build does not run ({type(exc).__name__}); nothing changed"
        ) from None
    words = done.stdout.split()
    if done.returncode != 0 or len(words) != 2 or words[0] != "appliance":
        raise UpdateError(
            f"the new build's `--version` failed (exit {done.returncode}); nothing changed"
        )
    return words[1]


def exchange(first: Path, second: Path) -> None:
    """Swap two directories atomically (renameat2 RENAME_EXCHANGE where supported)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        result = renameat2(
            _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
        )
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code), str(first))
    # No atomic exchange here (old kernel or file system): three renames.
    spare = first.with_name(first.name + ".swap")
    os.rename(first, spare)
    os.rename(second, first)
    os.rename(spare, second)


def _stage(new: Path, install_dir: Path) -> Path:
    staged = install_dir.with_name(f".{install_dir.name}.new")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(new, staged, symlinks=True)
    return staged


def _restart_and_wait(settings: Settings, version: str | None, timeout: float) -> bool:
    try:
        # A unit that failed to start too often in a row (StartLimitBurst=) refuses every
        # start, the rollback's included, until its failed state is reset.
        systemctl("reset-failed")
        systemctl("restart")
    except ControlError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return False
    return wait_until_ready(settings, version, timeout)


def update(
    settings: Settings, new: Path, install_dir: Path | None, timeout: float, backup: bool
) -> int:
    build = _build_dir(new)
    target = _install_dir(install_dir)
    if build == target:
        raise UpdateError(f"{new} is the installed build itself; nothing to do")
    if not target.is_dir():
        raise UpdateError(f"{target} does not exist: install the appliance first")
    new_version = build_version(build)
    old_version = serving_version(settings)
    if backup:
        import trio

        from appliance.backup.archive import BackupError
        from appliance.backup.commands import backup_now

        try:
            with handing_back(settings):
                info = trio.run(lambda: backup_now(settings))
        except BackupError as exc:
            raise UpdateError(
                f"the backup before the update failed ({exc}); nothing changed"
            ) from None
        print(f"backed up to {info.path}")
    staged = _stage(build, target)
    exchange(staged, target)
    previous = target.with_name(f"{target.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    os.rename(staged, previous)
    print(f"installed {new_version} in {target}; the previous build is kept in {previous}")
    if _restart_and_wait(settings, new_version, timeout):
        print(f"appliance {new_version} is ready")
        return 0

    print(
        f"appliance: {new_version} did not become ready within {timeout:.0f} s; rolling back",
        file=sys.stderr,
    )
    exchange(previous, target)
    failed = target.with_name(f"{target.name}.failed")
    shutil.rmtree(failed, ignore_errors=True)
    os.rename(previous, failed)
    if _restart_and_wait(settings, old_version, timeout):
        raise UpdateError(
            f"update to {new_version} failed and was rolled back: "
            f"{old_version or 'the previous build'} is serving again (the failed build is kept "
            f"in {failed}; see: appliance logs)"
        )
    raise UpdateError(
        f"update to {new_version} failed, the previous build is back in {target}, but it is not "
        "ready either: check `appliance status` and `appliance logs`"
    )


def run_update(settings: Settings, args: argparse.Namespace) -> int:
    try:
        return update(settings, args.new, args.install_dir, args.timeout, not args.no_backup)
    except (UpdateError, ControlError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"appliance: {exc.strerror or type(exc).__name__}{where}", file=sys.stderr)
        return 1
