"""What every command shares: exit codes, the one-line error, the settings of `--env-file`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Final

from appliance.config import Settings, load_settings

if TYPE_CHECKING:
    from typing import TypeAlias

    # What `add_parser(commands)` is given: the subparsers of `appliance COMMAND`.
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_RUNNING: Final = 3


def error(message: str) -> None:
    print(f"appliance: {message}", file=sys.stderr)


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings of `--env-file` (else the default env file), then the environment."""
    return load_settings(env_file=args.env_file)
