"""`appliance install`: the system user, directories, env file and systemd unit, idempotently.

Each step prints one line (`created`, `kept (exists)`, `fixed (...)`, `updated (...)`),
and a second run changes nothing and says so. With `--root ROOT` everything happens
inside ROOT (an image being built, a container's tree): owners come from ROOT's own
passwd and group files and the unit is enabled offline with `systemctl --root`.
The program itself is not copied: the unit runs `--binary` (default PREFIX/bin/appliance),
which the package (or the operator) puts in place.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from appliance.config import SYSTEM_STATE_DIR
from appliance.envfile import generate_env_file_text, write_new_env_file
from appliance.ops.accounts import (
    Account,
    InstallError,
    create_account,
    lookup_account,
    lookup_group,
)
from appliance.ops.control import UNIT
from appliance.ops.enabling import enable
from appliance.ops.files import (
    Owner,
    Report,
    ensure_attributes,
    ensure_directory,
    ensure_file,
)
from appliance.ops.unit import (
    DEFAULT_BINARY,
    ENV_FILE,
    SERVICE_USER,
    SYSUSERS_TEXT,
    render_unit,
)

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
DEFAULT_PREFIX: Final = "/usr"
CONFIG_DIR: Final = "/etc/appliance"
STATE_DIR: Final = SYSTEM_STATE_DIR
BACKUP_DIR: Final = "/var/lib/appliance/backups"
UNIT_DIR: Final = "/etc/systemd/system"
# Where a package (the .deb) puts its unit; /lib is /usr/lib on a merged-/usr system.
PACKAGE_UNIT_DIRS: Final = ("/usr/lib/systemd/system", "/lib/systemd/system")


@dataclass(frozen=True)
class Plan:
    root: Path
    offline: bool  # --root given: no running systemd is asked anything
    prefix: str
    binary: str

    def path(self, absolute: str) -> Path:
        """`absolute` (a path on the target system) inside the root."""
        return self.root / absolute.lstrip("/")


def run_install(args: argparse.Namespace) -> int:
    report = Report(sys.stdout)
    try:
        plan = _plan(args)
        _install(plan, report)
    except InstallError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if report.changes:
        print(f"appliance install: done, {report.changes} change(s)")
    else:
        print("appliance install: nothing to change; everything was already in place")
    return EXIT_OK


def _plan(args: argparse.Namespace) -> Plan:
    if getattr(args, "env_file", None) is not None:
        raise InstallError(
            f"install always writes {ENV_FILE} (the unit reads that file); drop --env-file"
        )
    if os.geteuid() != 0:
        raise InstallError(
            "install creates a system user and writes /etc; run it as root (sudo appliance install)"
        )
    root: Path | None = args.root
    if root is not None and not root.is_dir():
        raise InstallError(f"--root {root} is not a directory; create it first")
    prefix: str = args.prefix
    if not prefix.startswith("/"):
        raise InstallError(f"--prefix {prefix} is not an absolute path; give one like /usr")
    binary: str = args.binary or f"{prefix.rstrip('/')}/bin/appliance"
    if not binary.startswith("/"):
        raise InstallError(f"--binary {binary} is not an absolute path; systemd needs one")
    if any(character.isspace() or character in "\"'\\%$" for character in binary):
        raise InstallError(
            f"--binary {binary!r} contains spaces, quotes, '%' or '$'; use a plain path"
        )
    return Plan(
        root=(root or Path("/")).resolve(),
        offline=root is not None,
        prefix=prefix.rstrip("/") or "/",
        binary=binary,
    )


def _install(plan: Plan, report: Report) -> None:
    root_owner = Owner(0, 0, "root:root")
    sysusers_file = plan.path(f"{plan.prefix}/lib/sysusers.d/{SERVICE_USER}.conf")
    report.step(sysusers_file, ensure_file(sysusers_file, SYSUSERS_TEXT, 0o644, root_owner))
    account = _ensure_account(plan, sysusers_file, report)
    group_gid = lookup_group(plan.root, SERVICE_USER)
    if group_gid is None:
        raise InstallError(
            f"group {SERVICE_USER} is missing from {plan.path('/etc/group')}; "
            f"create it (groupadd --system {SERVICE_USER}) and re-run"
        )
    service = Owner(account.uid, group_gid, f"{SERVICE_USER}:{SERVICE_USER}")
    config_owner = Owner(0, group_gid, f"root:{SERVICE_USER}")
    for directory, mode, owner in (
        (CONFIG_DIR, 0o750, config_owner),
        (STATE_DIR, 0o700, service),
        (BACKUP_DIR, 0o700, service),
    ):
        path = plan.path(directory)
        report.step(path, ensure_directory(path, mode, owner))
    report.step(plan.path(ENV_FILE), _ensure_env_file(plan.path(ENV_FILE), service))
    unit_outcome = _install_unit(plan, report, root_owner)
    binary = plan.path(plan.binary)
    if not os.access(binary, os.X_OK):
        report.note(
            binary,
            "missing or not executable: the unit runs it; install the program there "
            "(or re-run with --binary PATH)",
        )
    enable(plan.root if plan.offline else None, report, unit_outcome)


def _install_unit(plan: Plan, report: Report, owner: Owner) -> str:
    """The unit in /etc/systemd/system, unless the .deb's own unit serves the default."""
    unit_path = plan.path(f"{UNIT_DIR}/{UNIT}")
    packaged = next(
        (plan.path(f"{d}/{UNIT}") for d in PACKAGE_UNIT_DIRS if plan.path(f"{d}/{UNIT}").exists()),
        None,
    )
    if packaged is not None and plan.binary == DEFAULT_BINARY:
        # A copy in /etc would shadow the package's unit and every later update of it.
        outcome = f"kept (the package's {packaged} is used)"
        if os.path.lexists(unit_path):
            outcome += f"; {unit_path} overrides it: remove that to follow package updates"
        report.step(f"systemd unit {UNIT}", outcome)
        return outcome
    outcome = ensure_file(unit_path, render_unit(plan.binary), 0o644, owner)
    report.step(unit_path, outcome)
    return outcome


def _ensure_account(plan: Plan, sysusers_file: Path, report: Report) -> Account:
    subject = f"user {SERVICE_USER}"
    account = lookup_account(plan.root, SERVICE_USER)
    if account is not None:
        report.step(subject, f"kept (exists, uid {account.uid})")
        return account
    tool = create_account(plan.root, SERVICE_USER, sysusers_file, home=STATE_DIR)
    account = lookup_account(plan.root, SERVICE_USER)
    if account is None:
        raise InstallError(
            f"{tool} ran but {SERVICE_USER} is not in {plan.path('/etc/passwd')}; "
            "is the user database elsewhere (LDAP)? create a local system user and re-run"
        )
    report.step(subject, f"created (uid {account.uid}, gid {account.gid}, with {tool})")
    return account


def _ensure_env_file(path: Path, owner: Owner) -> str:
    """Never overwrite an existing env file: it holds the keys of the stored data."""
    if os.path.lexists(path):
        return ensure_attributes(path, 0o600, owner, what="kept (exists; contents untouched)")
    try:
        write_new_env_file(path, generate_env_file_text(production=True))
    except OSError as exc:
        raise InstallError(f"cannot write {path}: {exc.strerror}") from None
    ensure_attributes(path, 0o600, owner)
    return f"created (0600 {owner.names}; new SECRET_KEY and PRIVACY_SALT)"
