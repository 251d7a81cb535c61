"""`appliance config check`: validate the settings and print the effective ones."""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from appliance.commands.common import EXIT_ERROR, EXIT_OK, error, settings_of
from appliance.config import masked

if TYPE_CHECKING:
    from appliance.commands.common import Subparsers


def add_parser(commands: Subparsers) -> None:
    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_commands.add_parser("check", help="validate and print the effective settings")
    check.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    from appliance.startup_checks import startup_problems

    settings = settings_of(args)
    problems = startup_problems(settings)
    shown = masked(settings)
    if args.json:
        print(
            json.dumps({"valid": not problems, "problems": problems, "settings": shown}, indent=2)
        )
    else:
        width = max(len(name) for name in shown)
        for name, value in shown.items():
            print(f"{name:<{width}}  {value}")
        for problem in problems:
            error(problem)
        if not problems:
            print(f"\nsettings are valid ({settings.env}); checked {time.strftime('%H:%M:%S')}")
    return EXIT_ERROR if problems else EXIT_OK
