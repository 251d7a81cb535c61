"""The appliance as a systemd service: start/stop/restart through systemctl, readiness
through the HTTP API. When systemd is not PID 1 these say so instead of failing obscurely.

`APPLIANCE_SYSTEMCTL` names another systemctl (tests use one that runs the service
directly, where this machine has no systemd).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Final

import httpx

from appliance.config import Settings
from appliance.local_api import api_base, api_verify

UNIT: Final = "appliance.service"
SYSTEMD_RUNNING_MARKER: Final = Path("/run/systemd/system")
SYSTEMCTL_TIMEOUT: Final = 120.0
POLL_INTERVAL: Final = 0.25


class ControlError(RuntimeError):
    """A service operation could not be done; the message says why and what to do."""


def systemctl_command() -> list[str]:
    configured = os.environ.get("APPLIANCE_SYSTEMCTL")
    if configured:
        return [configured]
    if not SYSTEMD_RUNNING_MARKER.is_dir():
        raise ControlError(
            "systemd is not running on this machine (no /run/systemd/system), so there is no "
            "appliance service to control: run the daemon with `appliance serve` and stop it "
            "with SIGTERM"
        )
    found = shutil.which("systemctl")
    if found is None:
        raise ControlError("systemctl is not installed; install systemd or run `appliance serve`")
    return [found]


def systemctl(action: str) -> None:
    """`systemctl ACTION appliance.service`; ControlError with its message on failure."""
    command = [*systemctl_command(), action, UNIT]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise ControlError(
            f"systemctl {action} did not finish in {SYSTEMCTL_TIMEOUT:.0f} s"
        ) from None
    if done.returncode != 0:
        # The first line says what happened; later ones are hints such as "(followed by ...)".
        lines = (done.stderr or done.stdout).strip().splitlines()
        detail = lines[0] if lines else f"exit {done.returncode}"
        raise ControlError(f"systemctl {action} {UNIT} failed ({detail}); see: appliance logs")


def serving_version(settings: Settings, timeout: float = 2.0) -> str | None:
    """The version of the daemon that answers, or None when none does."""
    try:
        response = httpx.get(
            f"{api_base(settings)}/api/v1/health/live",
            timeout=timeout,
            trust_env=False,
            verify=api_verify(settings),
        )
        version = response.json().get("version")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) else None


def wait_until_ready(settings: Settings, version: str | None, timeout: float) -> bool:
    """Whether the daemon (of `version`, when given) answers ready within `timeout`."""
    deadline = time.monotonic() + timeout
    base, verify = api_base(settings), api_verify(settings)
    while time.monotonic() < deadline:
        try:
            live = httpx.get(
                f"{base}/api/v1/health/live", timeout=2.0, trust_env=False, verify=verify
            ).json()
            ready = httpx.get(
                f"{base}/api/v1/health/ready", timeout=5.0, trust_env=False, verify=verify
            )
            if ready.status_code == 200 and (version is None or live.get("version") == version):
                return True
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        time.sleep(POLL_INTERVAL)
    return False
