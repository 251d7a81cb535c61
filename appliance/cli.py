"""The `appliance` command line: a table of the command modules (appliance.commands)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from appliance import __version__
from appliance.commands import (
    backup,
    config,
    control,
    init,
    install,
    keys,
    logs,
    models,
    serve,
    status,
    update,
    worker,
)
from appliance.commands.common import EXIT_ERROR, error
from appliance.config import ConfigError
from appliance.envfile import DEFAULT_ENV_FILE
from appliance.store.lock import StateDirBusy, StoreElsewhere

if TYPE_CHECKING:
    from appliance.commands.common import Subparsers

# 128 + SIGPIPE: what a shell reports for a tool whose output pipe was closed.
EXIT_BROKEN_PIPE: Final = 141


class Command(Protocol):
    """A command module: it adds its parser(s) and runs what was parsed to an exit code."""

    def add_parser(self, commands: Subparsers) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


# In the order `appliance --help` lists them.
COMMANDS: Final[tuple[Command, ...]] = (
    serve,
    worker,
    models,
    keys,
    backup,
    control,
    update,
    logs,
    install,
    status,
    init,
    config,
)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The parser, and which module runs each command name."""
    parser = argparse.ArgumentParser(
        prog="appliance", description="A private AI assistant for an edge box."
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    parser.add_argument(
        "--env-file",
        type=Path,
        default=None,
        help=f"settings file (default: {DEFAULT_ENV_FILE} when it exists)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    owners: dict[str, Command] = {}
    for command in COMMANDS:
        known = set(commands.choices)
        command.add_parser(commands)
        owners.update(dict.fromkeys(set(commands.choices) - known, command))
    return parser, owners


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _dispatch(argv)
        finally:
            # Output to a pipe is written at exit: a reader that has gone shows here.
            sys.stdout.flush()
    except BrokenPipeError:
        return _reader_gone()
    except BaseExceptionGroup as group:
        if _only(group, BrokenPipeError):
            return _reader_gone()
        raise


def _dispatch(argv: Sequence[str] | None) -> int:
    parser, owners = _parser()
    args = parser.parse_args(argv)
    try:
        code = owners[args.command].run(args)
    except (ConfigError, StateDirBusy, StoreElsewhere) as exc:
        # Every command reads the settings first; a bad one is one line and exit 1. So is a
        # state dir another process holds, or settings that lead to another store.
        error(str(exc))
        return EXIT_ERROR
    return code


def _reader_gone() -> int:
    """The reader of our output went away (`appliance status | head -1`): stop quietly,
    with the status a shell shows for a tool stopped by a closed pipe."""
    with contextlib.suppress(OSError):
        # Python flushes stdout again at exit, and would complain there.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def _only(group: BaseExceptionGroup[BaseException], kind: type[BaseException]) -> bool:
    return all(
        _only(exc, kind) if isinstance(exc, BaseExceptionGroup) else isinstance(exc, kind)
        for exc in group.exceptions
    )
