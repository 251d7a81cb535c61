"""`appliance backup [verify FILE]`, `appliance backups [prune-previous]`, `appliance restore
FILE`: their arguments; the work is appliance.backup.commands'."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.commands.common import settings_of
from appliance.ops.owner import handing_back

if TYPE_CHECKING:
    from appliance.commands.common import Subparsers


def add_parser(commands: Subparsers) -> None:
    backup = commands.add_parser("backup", help="back up the data now (or: backup verify FILE)")
    backup.add_argument(
        "--with-models", action="store_true", help="include the model files (large)"
    )
    backup.add_argument(
        "--passphrase-file", type=Path, help="also seal the archive with this passphrase"
    )
    backup_commands = backup.add_subparsers(dest="backup_command", metavar="ACTION")
    backup_verify = backup_commands.add_parser(
        "verify", help="check an archive's manifest and checksums; touches no live data"
    )
    backup_verify.add_argument("file", type=Path, help="the backup archive")
    backup_verify.add_argument(
        "--passphrase-file", type=Path, help="passphrase of a sealed archive"
    )
    backups = commands.add_parser("backups", help="list backups: size, age, verified")
    backups.add_argument("--json", action="store_true", help="print JSON for scripts")
    prune = backups.add_subparsers(dest="backups_command", metavar="ACTION").add_parser(
        "prune-previous", help="remove the data that restores moved aside"
    )
    prune.add_argument("--keep", type=int, default=0, help="keep the newest N (default 0)")
    restore = commands.add_parser(
        "restore", help="restore a backup (verified first; the current data is kept aside)"
    )
    restore.add_argument("file", type=Path, help="the backup archive")
    restore.add_argument("--passphrase-file", type=Path, help="passphrase of a sealed archive")
    restore.add_argument("--json", action="store_true", help="print JSON for scripts")
    restore.add_argument(
        "--unauthenticated", action="store_true", help="accept a format 1 (unauthenticated) backup"
    )
    restore.add_argument(
        "--from-other-box",
        type=Path,
        metavar="ENV_FILE",
        help="another appliance's backup: ENV_FILE holds its SECRET_KEY and PRIVACY_SALT",
    )


def run(args: argparse.Namespace) -> int:
    from appliance.backup.commands import run_backup_command

    settings = settings_of(args)
    with handing_back(settings):
        return run_backup_command(settings, args)
