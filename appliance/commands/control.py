"""`appliance start|stop|restart`: the systemd service, through systemctl
(appliance.ops.control)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from appliance.commands.common import EXIT_ERROR, EXIT_OK, error, settings_of

if TYPE_CHECKING:
    from appliance.commands.common import Subparsers


def add_parser(commands: Subparsers) -> None:
    for action, text in (
        ("start", "start the appliance service (systemctl)"),
        ("stop", "stop the appliance service (systemctl)"),
        ("restart", "restart the appliance service and wait until it is ready"),
    ):
        control = commands.add_parser(action, help=text)
        control.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")


def run(args: argparse.Namespace) -> int:
    from appliance.ops.control import ControlError, systemctl, wait_until_ready

    settings = settings_of(args)
    try:
        systemctl(args.command)
    except ControlError as exc:
        error(str(exc))
        return EXIT_ERROR
    if args.command == "stop":
        print("appliance stopped")
        return EXIT_OK
    if not wait_until_ready(settings, None, args.timeout):
        error(
            f"the service started but is not ready after {args.timeout:.0f} s; see: appliance logs"
        )
        return EXIT_ERROR
    print(f"appliance is ready on {settings.bind}")
    return EXIT_OK
