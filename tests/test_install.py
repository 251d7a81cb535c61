"""`appliance install --root SCRATCH`: the tree it builds, and that a second run keeps it.

Everything runs for real: systemd-sysusers (or useradd) creates the user inside the
scratch root, `systemctl --root` enables the unit offline. Owners are checked against
the scratch root's own passwd and group files, as install itself reads them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from appliance.config import load_settings, production_problems
from appliance.envfile import parse_env_file
from appliance.ops.unit import SYSUSERS_TEXT, render_unit

REPOSITORY: Final = Path(__file__).resolve().parents[1]
TIMEOUT: Final = 60.0
# `appliance install` through the functions the CLI calls (the same parser and handler).
INSTALL: Final = (
    "import argparse, sys\n"
    "from appliance.commands import install\n"
    "parser = argparse.ArgumentParser(prog='appliance')\n"
    "install.add_parser(parser.add_subparsers(dest='command', required=True))\n"
    "sys.exit(install.run(parser.parse_args(sys.argv[1:])))\n"
)

NOBODY: Final = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="install creates users and chowns: needs root"),
    pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl is not installed"),
]

Snapshot = dict[str, tuple[int, int, int, str]]


def _install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", INSTALL, "install", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=REPOSITORY,
        env=env,
    )


def _ids(root: Path, table: str, name: str) -> list[str]:
    for line in (root / "etc" / table).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    raise AssertionError(f"{name} is not in {root}/etc/{table}")


def _attributes(path: Path) -> tuple[int, int, int]:
    info = os.lstat(path)
    return stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid


def _snapshot(root: Path) -> Snapshot:
    """Every path under `root`: mode, owner, group and content hash (or link target)."""
    found: Snapshot = {}
    for path in sorted(root.rglob("*")):
        mode, uid, gid = _attributes(path)
        if path.is_symlink():
            content = "-> " + os.readlink(path)
        elif path.is_file():
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = "dir"
        found[str(path.relative_to(root))] = (mode, uid, gid, content)
    return found


def _check_tree(root: Path) -> None:
    user = _ids(root, "passwd", "appliance")
    uid, gid = int(user[2]), int(_ids(root, "group", "appliance")[2])
    assert user[5] == "/var/lib/appliance"
    assert _attributes(root / "etc/appliance") == (0o750, 0, gid)
    assert _attributes(root / "var/lib/appliance") == (0o700, uid, gid)
    assert _attributes(root / "var/lib/appliance/backups") == (0o700, uid, gid)
    env_file = root / "etc/appliance/appliance.env"
    assert _attributes(env_file) == (0o600, uid, gid)
    values = parse_env_file(env_file)
    assert values["APPLIANCE_ENV"] == "production"
    assert len(values["SECRET_KEY"]) >= 32
    assert values["PRIVACY_SALT"]
    settings = load_settings(environ={}, env_file=env_file)
    assert production_problems(settings) == []
    unit = root / "etc/systemd/system/appliance.service"
    assert unit.read_text() == render_unit()
    assert _attributes(unit) == (0o644, 0, 0)
    wants = root / "etc/systemd/system/multi-user.target.wants/appliance.service"
    assert os.readlink(wants) == "/etc/systemd/system/appliance.service"
    assert (root / "usr/lib/sysusers.d/appliance.conf").read_text() == SYSUSERS_TEXT


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_install_builds_the_tree_and_a_second_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    first = _install("--root", str(root))
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    _check_tree(root)
    assert "created (uid" in first.stdout and "with systemd-sysusers" in first.stdout
    assert "enabled (offline" in first.stdout
    # The program itself is not installed by this command: it says so, and carries on.
    assert "usr/bin/appliance" in first.stdout and "missing or not executable" in first.stdout
    before = _snapshot(root)

    second = _install("--root", str(root))
    assert second.returncode == 0, second.stderr
    assert _snapshot(root) == before
    assert "created" not in second.stdout
    assert second.stdout.count("kept") == 8, second.stdout
    assert second.stdout.splitlines()[-1] == (
        "appliance install: nothing to change; everything was already in place"
    )


@pytest.mark.skipif(shutil.which("useradd") is None, reason="no useradd")
def test_without_systemd_sysusers_useradd_creates_the_user(tmp_path: Path) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("useradd", "systemctl"):
        (tools / tool).symlink_to(str(shutil.which(tool)))
    root = tmp_path / "root"
    root.mkdir()
    done = _install("--root", str(root), env={**os.environ, "PATH": str(tools)})
    assert done.returncode == 0, done.stderr
    assert "with useradd" in done.stdout
    _check_tree(root)


def test_existing_files_are_kept_and_their_modes_fixed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/appliance").mkdir(parents=True)
    env_file = root / "etc/appliance/appliance.env"
    own = "APPLIANCE_ENV=production\nSECRET_KEY=" + "k" * 40 + "\nPRIVACY_SALT=salt\n"
    env_file.write_text(own)
    env_file.chmod(0o644)
    (root / "etc/appliance").chmod(0o755)
    first = _install("--root", str(root))
    assert first.returncode == 0, first.stderr
    assert env_file.read_text() == own
    _check_tree(root)
    assert "appliance.env" in first.stdout and "fixed (was 0644 0:0" in first.stdout

    # A unit edited in place (instead of with a drop-in) is put back.
    unit = root / "etc/systemd/system/appliance.service"
    unit.write_text(unit.read_text().replace("MemoryMax=4G", "MemoryMax=8G"))
    second = _install("--root", str(root))
    assert second.returncode == 0, second.stderr
    assert unit.read_text() == render_unit()
    assert "updated (its content was different)" in second.stdout
    assert second.stdout.splitlines()[-1] == "appliance install: done, 1 change(s)"


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_the_package_unit_is_used_rather_than_shadowed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    packaged = root / "usr/lib/systemd/system/appliance.service"
    packaged.parent.mkdir(parents=True)
    packaged.write_text(render_unit())
    done = _install("--root", str(root))
    assert done.returncode == 0, done.stderr
    assert f"kept (the package's {packaged} is used)" in done.stdout
    assert not (root / "etc/systemd/system/appliance.service").exists()
    wants = root / "etc/systemd/system/multi-user.target.wants/appliance.service"
    assert os.readlink(wants) == "/usr/lib/systemd/system/appliance.service"


def test_binary_names_the_program_the_unit_runs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    program = root / "opt/appliance/appliance"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    done = _install("--root", str(root), "--binary", "/opt/appliance/appliance")
    assert done.returncode == 0, done.stderr
    unit = (root / "etc/systemd/system/appliance.service").read_text()
    assert unit == render_unit("/opt/appliance/appliance")
    assert "missing or not executable" not in done.stdout


def test_prefix_places_the_sysusers_entry_and_the_program(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    done = _install("--root", str(root), "--prefix", "/usr/local")
    assert done.returncode == 0, done.stderr
    assert (root / "usr/local/lib/sysusers.d/appliance.conf").read_text() == SYSUSERS_TEXT
    unit = (root / "etc/systemd/system/appliance.service").read_text()
    assert "\nExecStart=/usr/local/bin/appliance serve\n" in unit


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--root", "/nonexistent/root"], "--root /nonexistent/root is not a directory"),
        (["--prefix", "usr"], "--prefix usr is not an absolute path"),
        (["--binary", "bin/appliance"], "--binary bin/appliance is not an absolute path"),
    ],
)
def test_mistakes_are_one_line_that_says_what_to_do(args: list[str], message: str) -> None:
    done = _install(*args)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"appliance: {message}")


def _nobody_can_import() -> bool:
    """A fresh clone under a private temp dir is unreadable for nobody: nothing to run."""
    if shutil.which("setpriv") is None:
        return False
    probe = [*NOBODY, sys.executable, "-c", "import appliance.ops.install"]
    done = subprocess.run(probe, capture_output=True, timeout=TIMEOUT, check=False, cwd=REPOSITORY)
    return done.returncode == 0


@pytest.mark.skipif(
    not _nobody_can_import(), reason="setpriv missing or repo unreadable for nobody"
)
def test_not_root_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [*NOBODY, sys.executable, "-c", INSTALL, "install", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=REPOSITORY,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        "appliance: install creates a system user and writes /etc; run it as root "
        "(sudo appliance install)\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_the_cli_runs_install(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "install", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=REPOSITORY,
    )
    assert done.returncode == 0, done.stderr
    _check_tree(root)
