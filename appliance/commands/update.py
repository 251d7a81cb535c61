"""`appliance update NEW`: back up, install a new build, restart; roll back if it is not
ready (appliance.ops.update)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.commands.common import settings_of
from appliance.ops.update import DEFAULT_READY_TIMEOUT

if TYPE_CHECKING:
    from appliance.commands.common import Subparsers


def add_parser(commands: Subparsers) -> None:
    update = commands.add_parser(
        "update", help="back up, install a new build, restart; roll back if it is not ready"
    )
    update.add_argument("new", type=Path, help="the new build: its directory or its executable")
    update.add_argument(
        "--install-dir",
        type=Path,
        help="the installed build (default: the directory of the running program)",
    )
    update.add_argument(
        "--timeout", type=float, default=DEFAULT_READY_TIMEOUT, help="seconds to wait for ready"
    )
    update.add_argument("--no-backup", action="store_true", help="skip the backup (not advised)")


def run(args: argparse.Namespace) -> int:
    from appliance.ops.update import run_update

    return run_update(settings_of(args), args)
