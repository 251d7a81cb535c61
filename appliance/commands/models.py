"""`appliance models ...`: its arguments; the work is appliance.llm.commands'."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.commands.common import settings_of
from appliance.ops.owner import handing_back

if TYPE_CHECKING:
    from appliance.commands.common import Subparsers


def add_parser(commands: Subparsers) -> None:
    models = commands.add_parser(
        "models", help="list, import, pull, verify, remove, set, load, unload and ps models"
    )
    actions = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="installed models, their state and defaults")
    listing.add_argument("--json", action="store_true", help="print JSON for scripts")
    importing = actions.add_parser("import", help="copy a GGUF file in, checked")
    importing.add_argument("path", type=Path, help="the .gguf file")
    importing.add_argument("--name", help="model name (default: the file name)")
    pull = actions.add_parser("pull", help="download a GGUF file over HTTP(S), checked")
    pull.add_argument("url", help="the file's URL (Hugging Face: .../resolve/main/FILE.gguf)")
    pull.add_argument("--sha256", help="the file's SHA-256 (checked; always recorded)")
    pull.add_argument("--name", help="model name (default: the URL's file name)")
    verify = actions.add_parser("verify", help="re-check headers and checksums")
    verify.add_argument("name", nargs="?", help="one model (default: all)")
    remove = actions.add_parser("remove", help="delete a model")
    remove.add_argument("name", help="the model to remove")
    setting = actions.add_parser(
        "set", help="a model's defaults: system, temperature, top_p, top_k, min_p, ..."
    )
    setting.add_argument("name", help="the model")
    setting.add_argument(
        "assignments", nargs="+", metavar="KEY=VALUE", help="KEY= (empty) clears one"
    )
    load = actions.add_parser("load", help="load a model in the running daemon")
    load.add_argument("name", help="the model")
    load.add_argument("--keep-alive", help="how long it stays once idle: 5m, 1h, -1 (for ever), 0")
    unload = actions.add_parser("unload", help="unload a resident model")
    unload.add_argument("name", help="the model")
    ps = actions.add_parser("ps", help="resident models: memory, slots, idle time")
    ps.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    from appliance.llm.commands import run_models_command

    settings = settings_of(args)
    with handing_back(settings):
        return run_models_command(settings, args)
