"""Enabling the unit with systemctl: online (systemd running) or offline (`--root`)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Final

from appliance.ops.accounts import InstallError, run_tool
from appliance.ops.control import SYSTEMD_RUNNING_MARKER, UNIT
from appliance.ops.files import Report, changed

SYSTEMCTL_TIMEOUT: Final = 60.0


def enable(root: Path | None, report: Report, unit_outcome: str) -> None:
    """Enable the unit: offline inside `root`, or through the running systemd (after a
    daemon-reload when the unit file changed); without either, say what to do."""
    subject = f"systemd unit {UNIT}"
    if root is not None:
        systemctl = ["systemctl", f"--root={root}"]
    elif SYSTEMD_RUNNING_MARKER.is_dir():
        systemctl = ["systemctl"]
        if changed(unit_outcome):
            run_tool([*systemctl, "daemon-reload"], "systemctl daemon-reload")
            report.note("systemd", "reloaded (systemctl daemon-reload)")
    else:
        report.note(
            subject,
            "installed but NOT enabled: systemd is not running here (no "
            f"{SYSTEMD_RUNNING_MARKER}); run `systemctl enable --now appliance` once it "
            "is, or `appliance install --root /` to enable it offline",
        )
        return
    if not enable_unit(systemctl):
        report.step(subject, "kept (enabled)")
    elif root is not None:
        report.step(subject, "enabled (offline; starts at the next boot)")
    else:
        report.step(subject, "enabled (start it with: systemctl start appliance)")
    if root is None and unit_outcome.startswith("updated"):
        report.note(
            subject, "a running service keeps the old unit until: systemctl restart appliance"
        )


def enable_unit(systemctl: list[str]) -> bool:
    """Enable the unit; False when it already was. `systemctl` may carry `--root=ROOT`."""
    if is_enabled(systemctl):
        return False
    run_tool([*systemctl, "enable", UNIT], "systemctl enable")
    if not is_enabled(systemctl):
        raise InstallError(
            f"systemctl enable {UNIT} ran but the unit is still not enabled; "
            f"check `{' '.join(systemctl)} is-enabled {UNIT}`"
        )
    return True


def is_enabled(systemctl: list[str]) -> bool:
    try:
        done = subprocess.run(
            [*systemctl, "is-enabled", UNIT],
            capture_output=True,
            text=True,
            timeout=SYSTEMCTL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InstallError(
            f"systemctl is-enabled did not answer in {SYSTEMCTL_TIMEOUT:.0f} s"
        ) from None
    except OSError as exc:
        raise InstallError(
            f"cannot run systemctl: {exc.strerror}; install systemd and re-run"
        ) from None
    # "enabled", "disabled", "static", ... on stdout; the exit status says only yes or no.
    return done.stdout.strip() == "enabled"
