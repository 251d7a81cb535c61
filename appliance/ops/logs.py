"""`appliance logs`: the daemon's journal entries (journalctl underneath), readable or JSON.

Entries are selected by SYSLOG_IDENTIFIER=appliance, which the daemon sets on everything it
sends to journald, so this works under systemd and for a daemon started by hand alike.
`--level error` keeps the journal priorities err and worse (an error log), `--access` the
access lines (LOGGER=appliance.access: one per request). Without a journal the daemon logs
JSON lines to its standard output; when nothing is found the command says where to look
and exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

IDENTIFIER: Final = "appliance"
ACCESS_LOGGER: Final = "appliance.access"
JOURNAL_SOCKET: Final = Path("/run/systemd/journal/socket")
EXIT_NOTHING: Final = 1
LEVELS: Final = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3}
_NAMES_BY_PRIORITY: Final = {
    7: "DEBUG",
    6: "INFO",
    5: "INFO",
    4: "WARNING",
    3: "ERROR",
    2: "CRITICAL",
}
# Journal fields the daemon adds, shown under the names its JSON lines use.
_FIELDS: Final = ("REQUEST_ID", "ENDPOINT", "METHOD", "STATUS", "DURATION_MS", "CLIENT")


def journalctl_command(args: argparse.Namespace, journalctl: str) -> list[str]:
    command = [journalctl, "--no-pager", "--output=json", f"SYSLOG_IDENTIFIER={IDENTIFIER}"]
    if args.request_id:
        command.append(f"REQUEST_ID={args.request_id}")
    if args.access:
        command.append(f"LOGGER={ACCESS_LOGGER}")
    if args.level:
        command.append(f"--priority={LEVELS[args.level]}")
    if args.since:
        command.append(f"--since={args.since}")
    elif not args.request_id:
        command.append(f"--lines={args.lines}")
    if args.follow:
        command.append("--follow")
    return command


def entry_from_journal(raw: dict[str, Any]) -> dict[str, Any]:
    """One journal entry in the shape of the daemon's own JSON lines."""
    micros = int(raw.get("__REALTIME_TIMESTAMP", 0))
    stamp = datetime.datetime.fromtimestamp(micros / 1e6, datetime.UTC)
    try:
        priority = int(raw.get("PRIORITY", 6))
    except ValueError:
        priority = 6
    entry: dict[str, Any] = {
        "timestamp": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": _NAMES_BY_PRIORITY.get(priority, "INFO"),
        "logger": raw.get("LOGGER", IDENTIFIER),
        "message": raw.get("MESSAGE", ""),
    }
    for field in _FIELDS:
        if field in raw:
            entry[field.lower()] = raw[field]
    return entry


def readable(entry: dict[str, Any]) -> str:
    extra = f" [{entry['request_id']}]" if "request_id" in entry else ""
    stamp = entry["timestamp"].replace("T", " ")[:23]
    return f"{stamp} {entry['level']:<7} {entry['logger']}: {entry['message']}{extra}"


def _print_entries(lines: Iterable[str], as_json: bool) -> int:
    shown = 0
    for line in lines:
        try:
            raw = json.loads(line)
        except ValueError:
            continue
        if not isinstance(raw, dict):
            continue
        entry = entry_from_journal(raw)
        print(json.dumps(entry) if as_json else readable(entry), flush=True)
        shown += 1
    return shown


def run_logs(args: argparse.Namespace) -> int:
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        print(
            "appliance: journalctl is not installed; without systemd the daemon logs JSON lines "
            "to its standard output (the terminal or file `appliance serve` writes to)",
            file=sys.stderr,
        )
        return 1
    command = journalctl_command(args, journalctl)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        try:
            shown = _print_entries(process.stdout, args.json)
        except KeyboardInterrupt:
            process.terminate()
            return 0
        except BrokenPipeError:
            # Our reader went away (`appliance logs | head`): journalctl must not outlive us.
            process.terminate()
            raise
        problem = process.stderr.read().strip()
    if process.returncode not in (0, None) or (not shown and "No journal files" in problem):
        print(
            f"appliance: journalctl failed ({problem.splitlines()[-1] if problem else 'no output'})"
            f"; {_where_logs_are()}",
            file=sys.stderr,
        )
        return 1
    if not shown:
        print(
            f"appliance: no matching entries in the journal; {_where_logs_are()}", file=sys.stderr
        )
        return EXIT_NOTHING
    return 0


def _where_logs_are() -> str:
    if not JOURNAL_SOCKET.exists():
        return (
            "no systemd-journald runs on this machine, so a daemon started by hand "
            "(appliance serve, make run) writes its log as JSON lines to its standard output "
            "(the terminal or file it runs with)"
        )
    return (
        "the daemon under systemd logs to the journal (journalctl -u appliance); one started "
        "by hand (appliance serve, make run) logs there too, and as JSON lines to its "
        "standard output"
    )
