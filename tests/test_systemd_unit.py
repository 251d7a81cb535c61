"""The systemd unit: what systemd-analyze says of it, and the settings the daemon relies on.

`systemd/appliance.service` is the text that `appliance install` writes (generated from
appliance/ops/unit.py). systemd-analyze runs on a copy in a temp dir whose ExecStart
names a stub script there: `verify` refuses a unit whose program does not exist, and
/usr/bin/appliance exists only on an installed box. That line is the only difference.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Final

import msgspec
import pytest

from appliance.config import Settings
from appliance.ops.unit import DEFAULT_BINARY, SYSUSERS_TEXT, render_unit

REPOSITORY: Final = Path(__file__).resolve().parents[1]
UNIT_FILE: Final = REPOSITORY / "systemd" / "appliance.service"
DROP_INS: Final = REPOSITORY / "systemd" / "appliance.service.d"
MAX_EXPOSURE: Final = 1.5
TIMEOUT: Final = 60.0

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd)",
)


def _directives(text: str) -> dict[str, list[str]]:
    """`Key` -> values in order (a unit may repeat a key, such as SystemCallFilter=)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def _testable_copy(directory: Path, *, drop_ins: bool = False) -> Path:
    """The unit in `directory`, its ExecStart naming a stub there (see the module doc)."""
    stub = directory / "appliance"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT_FILE.read_text()
    copy = text.replace(f"ExecStart={DEFAULT_BINARY} ", f"ExecStart={stub} ")
    changed = [line for line in copy.splitlines() if line not in text.splitlines()]
    assert changed == [f"ExecStart={stub} serve"]
    unit = directory / "appliance.service"
    unit.write_text(copy)
    if drop_ins:
        # Installed the way the examples say, beside the unit, where verify reads them.
        (directory / "appliance.service.d").mkdir()
        for example in DROP_INS.glob("*.conf.example"):
            target = directory / "appliance.service.d" / example.name.removesuffix(".example")
            shutil.copyfile(example, target)
    return unit


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_repository_copies_are_what_install_writes() -> None:
    regenerate = "regenerate them with: python -m appliance.ops.unit"
    assert UNIT_FILE.read_text() == render_unit(), regenerate
    sysusers = REPOSITORY / "packaging" / "sysusers" / "appliance.conf"
    assert sysusers.read_text() == SYSUSERS_TEXT, regenerate


def test_the_settings_the_daemon_relies_on() -> None:
    unit = _directives(UNIT_FILE.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": f"{DEFAULT_BINARY} serve",
        "User": "appliance",
        "Group": "appliance",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "KillMode": "mixed",
        "OOMPolicy": "continue",
        "MemoryMax": "4G",
        "CPUQuota": "200%",
        "StateDirectory": "appliance",
        "StateDirectoryMode": "0700",
        "RuntimeDirectory": "appliance",
        "RuntimeDirectoryMode": "0700",
        "ConfigurationDirectory": "appliance",
        "UMask": "0077",
        "Environment": "APPLIANCE_ENV_FILE=/etc/appliance/appliance.env",
        "WantedBy": "multi-user.target",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    # Stopping drains HTTP for APPLIANCE_GRACEFUL_TIMEOUT, then Redis saves: both must fit.
    graceful = next(
        f.default for f in msgspec.structs.fields(Settings) if f.name == "graceful_timeout"
    )
    assert int(unit["TimeoutStopSec"][0]) >= graceful + 30
    # READY=1 waits for the preloaded model.
    assert int(unit["TimeoutStartSec"][0]) >= 300


@needs_systemd_analyze
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    unit = _testable_copy(tmp_path)
    done = _analyze("verify", "--man=no", str(unit))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert [line for line in output.splitlines() if "appliance" in line] == []


@needs_systemd_analyze
def test_drop_in_examples_verify_cleanly(tmp_path: Path) -> None:
    unit = _testable_copy(tmp_path, drop_ins=True)
    assert sorted(p.name for p in (tmp_path / "appliance.service.d").iterdir()) == [
        "gpu.conf",
        "lan.conf",
        "search.conf",
    ]
    done = _analyze("verify", "--man=no", str(unit))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert [line for line in output.splitlines() if "appliance" in line] == []


@needs_systemd_analyze
def test_security_exposure_is_low_and_every_flag_is_explained(tmp_path: Path) -> None:
    unit = _testable_copy(tmp_path)
    done = _analyze("security", "--offline=true", "--no-pager", str(unit))
    report = done.stdout + done.stderr
    overall = re.search(r"Overall exposure level for appliance\.service: (\d+\.\d+)", report)
    assert overall is not None, report
    assert float(overall.group(1)) <= MAX_EXPOSURE, report
    explained = _flagged_explanations(UNIT_FILE.read_text())
    for line in report.splitlines():
        if line.startswith("✗"):
            setting = line[1:].split()[0].split("=")[0]
            assert any(setting in block for block in explained), (
                f"{setting} costs exposure but no '# Flagged' comment says why:\n{line}"
            )


def _flagged_explanations(text: str) -> list[str]:
    """Each `# Flagged ...` comment block with the directive that follows it."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("# Flagged"):
            current = [line]
        elif current is not None and line.startswith("#"):
            current.append(line)
        elif current is not None:
            blocks.append("\n".join([*current, line]))
            current = None
    return blocks


def test_another_binary_changes_only_exec_start() -> None:
    default = render_unit().splitlines()
    other = render_unit("/opt/appliance/appliance").splitlines()
    assert [b for a, b in zip(default, other, strict=True) if a != b] == [
        "ExecStart=/opt/appliance/appliance serve"
    ]
