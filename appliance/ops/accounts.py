"""The appliance's system user: created with systemd-sysusers (or useradd), read from files.

Owners inside an alternate root come from that root's /etc/passwd and /etc/group, never
from the host's user database: the same name can have another uid on the host.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

NOLOGIN: Final = "/usr/sbin/nologin"
COMMAND_TIMEOUT: Final = 60.0


class InstallError(Exception):
    """One line for the operator: what went wrong and what to do."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def lookup_account(root: Path, name: str) -> Account | None:
    """`name` from ROOT/etc/passwd (uid, primary gid), or None when it is not there."""
    for fields in _records(root / "etc" / "passwd"):
        if len(fields) >= 4 and fields[0] == name:
            return Account(name=name, uid=_number(fields[2], root, "passwd"), gid=_gid(fields))
    return None


def lookup_group(root: Path, name: str) -> int | None:
    """The gid of group `name` from ROOT/etc/group, or None when it is not there."""
    for fields in _records(root / "etc" / "group"):
        if len(fields) >= 3 and fields[0] == name:
            return _number(fields[2], root, "group")
    return None


def _gid(fields: list[str]) -> int:
    return int(fields[3]) if fields[3].isdigit() else -1


def _number(text: str, root: Path, table: str) -> int:
    if not text.isdigit():
        raise InstallError(
            f"{root / 'etc' / table} has a malformed entry (id {text!r}); fix the file and re-run"
        )
    return int(text)


def _records(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise InstallError(f"cannot read {path}: {exc.strerror}") from None
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def create_account(root: Path, name: str, sysusers_file: Path, home: str) -> str:
    """Create the user (and its group) inside `root`; returns the tool that did it.

    systemd-sysusers applies the same file the package ships, so a later run of
    systemd-sysusers at boot agrees with it. Hosts without systemd-sysusers get useradd.
    """
    (root / "etc").mkdir(parents=True, exist_ok=True)
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is not None:
        argv = [sysusers]
        if root != Path("/"):
            argv.append(f"--root={root}")
        # An explicit file is opened as given (a host path), even with --root.
        argv.append(str(sysusers_file))
        run_tool(argv, "systemd-sysusers")
        return "systemd-sysusers"
    useradd = shutil.which("useradd")
    if useradd is None:
        raise InstallError(
            "neither systemd-sysusers nor useradd is installed; install systemd "
            "(or passwd for useradd) and re-run appliance install"
        )
    argv = [useradd, "--system", "--user-group", "--no-create-home"]
    argv += ["--home-dir", home, "--shell", NOLOGIN, "--comment", f"{name} daemon"]
    if root != Path("/"):
        argv += ["--root", str(root)]
    run_tool([*argv, name], "useradd")
    return "useradd"


def run_tool(argv: list[str], what: str) -> str:
    """Run a tool; a failure becomes one InstallError line with the tool's own last line."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise InstallError(
            f"{what} did not finish in {COMMAND_TIMEOUT:.0f} s; run it by hand: {' '.join(argv)}"
        ) from None
    except OSError as exc:
        raise InstallError(f"cannot run {what}: {exc.strerror}") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise InstallError(f"{what} failed: {reason} (command: {' '.join(argv)})")
    return done.stdout
