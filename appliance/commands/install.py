"""`appliance install`: the system user, directories, env file and systemd unit
(appliance.ops.install)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.ops.install import DEFAULT_PREFIX

if TYPE_CHECKING:
    from appliance.commands.common import Subparsers


def add_parser(commands: Subparsers) -> None:
    install = commands.add_parser(
        "install",
        help="create the system user, directories, env file and systemd unit (as root)",
        description=(
            "Set up this machine (or the tree under --root) to run the appliance under "
            "systemd. Safe to re-run: what is in place is kept, and the env file with "
            "its secrets is never overwritten."
        ),
    )
    install.add_argument(
        "--root",
        type=Path,
        default=None,
        help="install into this directory tree instead of / (offline: enables the unit "
        "with systemctl --root, reloads nothing)",
    )
    install.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help=f"where the program is installed (default {DEFAULT_PREFIX}): the unit runs "
        "PREFIX/bin/appliance and the sysusers entry goes to PREFIX/lib/sysusers.d",
    )
    install.add_argument(
        "--binary",
        default=None,
        help="absolute path of the program the unit runs (default PREFIX/bin/appliance); "
        "it is not copied",
    )


def run(args: argparse.Namespace) -> int:
    from appliance.ops.install import run_install

    return run_install(args)
