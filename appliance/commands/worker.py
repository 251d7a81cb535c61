"""`appliance worker --fd N`: the inference worker process (started by `serve`)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.commands.common import Subparsers


def add_parser(commands: Subparsers) -> None:
    worker = commands.add_parser("worker", help="(internal) the inference worker process")
    worker.add_argument("--fd", type=int, required=True, help="socket inherited from serve")


def run(args: argparse.Namespace) -> int:
    from appliance.llm.worker import run_worker

    return run_worker(args.fd)
