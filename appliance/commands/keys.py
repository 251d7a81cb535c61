"""`appliance keys ...`: API keys, and the encryption keys of stored data; the work is
appliance.privacy.commands' (status, rotate) and appliance.auth.commands' (API keys)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from appliance.auth.scopes import SCOPES
from appliance.commands.common import settings_of
from appliance.ops.owner import handing_back

if TYPE_CHECKING:
    from appliance.commands.common import Subparsers


def add_parser(commands: Subparsers) -> None:
    keys = commands.add_parser("keys", help="API keys, and the encryption keys of stored data")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    key_status = key_commands.add_parser("status", help="conversations per key id")
    key_status.add_argument("--json", action="store_true", help="print JSON for scripts")
    key_commands.add_parser(
        "rotate", help="re-seal everything under the current SECRET_KEY (safe to re-run)"
    )
    _add_api_key_parsers(key_commands)


def _add_api_key_parsers(key_commands: Subparsers) -> None:
    """`keys create|list|revoke|usage`: API keys (appliance.auth.commands)."""
    create = key_commands.add_parser("create", help="a new API key (shown once)")
    create.add_argument("--name", required=True, help="who or what uses it")
    create.add_argument("--scope", choices=SCOPES, default="user", help="admin or user")
    create.add_argument("--tokens-per-day", type=int, help="this key's daily token budget")
    create.add_argument("--tokens-per-month", type=int, help="this key's monthly token budget")
    listing = key_commands.add_parser("list", help="API keys: name, scope, created, last use")
    listing.add_argument("--json", action="store_true", help="print JSON for scripts")
    revoke = key_commands.add_parser("revoke", help="revoke an API key now")
    revoke.add_argument("name", help="the key's name")
    usage = key_commands.add_parser("usage", help="tokens each key used today and this month")
    usage.add_argument("name", nargs="?", help="one key (default: all)")
    usage.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    from appliance.privacy.commands import run_keys_command

    settings = settings_of(args)
    with handing_back(settings):
        return run_keys_command(settings, args)
