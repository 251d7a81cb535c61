"""`appliance serve`: run the daemon (what systemd starts)."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, TypeVar

import trio

from appliance.commands.common import EXIT_ERROR, error, settings_of
from appliance.config import Settings
from appliance.store.lock import StateDirBusy

if TYPE_CHECKING:
    from appliance.commands.common import Subparsers


LOGGER = logging.getLogger("appliance.cli")

E = TypeVar("E", bound=BaseException)


def add_parser(commands: Subparsers) -> None:
    commands.add_parser("serve", help="run the daemon (what systemd starts)")


def logged_secrets(settings: Settings) -> tuple[str, ...]:
    """The values the daemon's log lines never show (scrubbed when they would)."""
    return (
        settings.secret_key,
        settings.privacy_salt,
        settings.secret_key_previous,
        settings.privacy_salt_previous,
        settings.search_api_key,
    )


def run(args: argparse.Namespace) -> int:
    from appliance.backup.archive import BackupError
    from appliance.daemon import serve
    from appliance.logs import configure_logging
    from appliance.privacy.rotation import KeyMismatch
    from appliance.startup_checks import startup_problems
    from appliance.store.sealing import SealError
    from appliance.supervisor import ServiceFailed

    settings = settings_of(args)
    problems = startup_problems(settings)
    if problems:
        for problem in problems:
            error(problem)
        return EXIT_ERROR
    configure_logging(settings.log_level, secrets=logged_secrets(settings))
    try:
        return trio.run(serve, settings)
    except (
        ServiceFailed,
        OSError,
        KeyMismatch,
        SealError,
        BackupError,
        StateDirBusy,
        ExceptionGroup,
    ) as exc:
        failed = _find(exc, ServiceFailed)
        if failed is not None:
            LOGGER.error("%s; exiting so that systemd restarts the unit", failed)
            return EXIT_ERROR
        for refusal in (
            _find(exc, StateDirBusy),
            _find(exc, KeyMismatch),
            _find(exc, SealError),
            _find(exc, BackupError),
        ):
            if refusal is not None:
                LOGGER.error("cannot start: %s", refusal)
                error(str(refusal))
                return EXIT_ERROR
        os_error = _find(exc, OSError)
        if os_error is None:
            raise
        # Typically the port is taken or a directory is not writable.
        LOGGER.error("cannot start: %s", os_error)
        return EXIT_ERROR


def _find(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of `kind` in `exc`, looking inside exception groups."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None
