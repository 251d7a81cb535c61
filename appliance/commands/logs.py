"""`appliance logs`: the daemon's log entries from the journal (appliance.ops.logs)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from appliance.ops.logs import LEVELS

if TYPE_CHECKING:
    from appliance.commands.common import Subparsers


def add_parser(commands: Subparsers) -> None:
    logs = commands.add_parser("logs", help="the daemon's log entries from the journal")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    logs.add_argument("--since", help='journalctl time, e.g. "1 hour ago" or "2026-11-25 03:00"')
    logs.add_argument("--request-id", help="only the entries of one request (X-Request-ID)")
    logs.add_argument(
        "--level",
        type=str.upper,
        choices=sorted(LEVELS),
        help="this level and more severe (journal priority; --level error: errors only)",
    )
    logs.add_argument(
        "--access", action="store_true", help="only the access lines (one per request)"
    )
    logs.add_argument("-n", "--lines", type=int, default=200, help="how many recent entries")
    logs.add_argument("--json", action="store_true", help="one JSON object per line")


def run(args: argparse.Namespace) -> int:
    from appliance.ops.logs import run_logs

    return run_logs(args)
