"""Arguments of `appliance keys create|list|revoke`, light to import (the CLI builds its
parser on every start)."""

from __future__ import annotations

import argparse
from typing import Final

SCOPES: Final = ("admin", "user")


def add_api_key_parsers(key_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
