"""The `appliance` command line: serve, status, init, config check."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx
import trio

from appliance import __version__
from appliance.auth.arguments import add_api_key_parsers
from appliance.config import ConfigError, Settings, load_settings, masked, startup_problems
from appliance.envfile import DEFAULT_ENV_FILE, generate_env_file_text, write_new_env_file
from appliance.model_arguments import add_model_parsers
from appliance.ops.install import add_install_parser, run_install
from appliance.ops.logs import add_logs_parser
from appliance.ops.owner import handing_back
from appliance.ops.update import add_update_parser
from appliance.store.lock import StateDirBusy, StoreElsewhere

LOGGER = logging.getLogger("appliance.cli")

E = TypeVar("E", bound=BaseException)

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_RUNNING: Final = 3
# 128 + SIGPIPE: what a shell reports for a tool whose output pipe was closed.
EXIT_BROKEN_PIPE: Final = 141


def _parser() -> argparse.ArgumentParser:
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
    commands.add_parser("serve", help="run the daemon (what systemd starts)")
    worker = commands.add_parser("worker", help="(internal) the inference worker process")
    worker.add_argument("--fd", type=int, required=True, help="socket inherited from serve")
    add_model_parsers(commands)
    keys = commands.add_parser("keys", help="API keys, and the encryption keys of stored data")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    key_status = key_commands.add_parser("status", help="conversations per key id")
    key_status.add_argument("--json", action="store_true", help="print JSON for scripts")
    key_commands.add_parser(
        "rotate", help="re-seal everything under the current SECRET_KEY (safe to re-run)"
    )
    add_api_key_parsers(key_commands)
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
    for action, text in (
        ("start", "start the appliance service (systemctl)"),
        ("stop", "stop the appliance service (systemctl)"),
        ("restart", "restart the appliance service and wait until it is ready"),
    ):
        control = commands.add_parser(action, help=text)
        control.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")
    add_update_parser(commands)
    add_logs_parser(commands)
    add_install_parser(commands)
    status = commands.add_parser("status", help="ask the running daemon how it is")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    init = commands.add_parser("init", help="write a new env file with generated secrets")
    init.add_argument(
        "--development", action="store_true", help="APPLIANCE_ENV=development instead"
    )
    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_commands.add_parser("check", help="validate and print the effective settings")
    check.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parser


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
    args = _parser().parse_args(argv)
    handlers = {
        "serve": _serve,
        "status": _status,
        "init": _init,
        "config": _config_check,
        "worker": _worker,
        "models": _models,
        "keys": _keys,
        "backup": _backup,
        "backups": _backup,
        "restore": _backup,
        "start": _control,
        "stop": _control,
        "restart": _control,
        "update": _update,
        "logs": _logs,
        "install": run_install,
    }
    try:
        code: int = handlers[args.command](args)
    except (ConfigError, StateDirBusy, StoreElsewhere) as exc:
        # Every command reads the settings first; a bad one is one line and exit 1. So is a
        # state dir another process holds, or settings that lead to another store.
        _error(str(exc))
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


def _error(message: str) -> None:
    print(f"appliance: {message}", file=sys.stderr)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(env_file=args.env_file)


def _serve(args: argparse.Namespace) -> int:
    from appliance.backup.archive import BackupError
    from appliance.daemon import serve
    from appliance.logs import configure_logging
    from appliance.privacy.rotation import KeyMismatch
    from appliance.store.sealing import SealError
    from appliance.supervisor import ServiceFailed

    settings = _settings(args)
    problems = startup_problems(settings)
    if problems:
        for problem in problems:
            _error(problem)
        return EXIT_ERROR
    configure_logging(
        settings.log_level,
        secrets=(
            settings.secret_key,
            settings.privacy_salt,
            settings.secret_key_previous,
            settings.privacy_salt_previous,
            settings.search_api_key,
        ),
    )
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
                _error(str(refusal))
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


def _worker(args: argparse.Namespace) -> int:
    from appliance.llm.worker import run_worker

    return run_worker(args.fd)


def _models(args: argparse.Namespace) -> int:
    from appliance.model_commands import run_models_command

    settings = _settings(args)
    with handing_back(settings):
        return run_models_command(settings, args)


def _keys(args: argparse.Namespace) -> int:
    from appliance.keys_commands import run_keys_command

    settings = _settings(args)
    with handing_back(settings):
        return run_keys_command(settings, args)


def _backup(args: argparse.Namespace) -> int:
    from appliance.backup.commands import run_backup_command

    settings = _settings(args)
    with handing_back(settings):
        return run_backup_command(settings, args)


def _control(args: argparse.Namespace) -> int:
    from appliance.ops.control import ControlError, systemctl, wait_until_ready

    settings = _settings(args)
    try:
        systemctl(args.command)
    except ControlError as exc:
        _error(str(exc))
        return EXIT_ERROR
    if args.command == "stop":
        print("appliance stopped")
        return EXIT_OK
    if not wait_until_ready(settings, None, args.timeout):
        _error(
            f"the service started but is not ready after {args.timeout:.0f} s; see: appliance logs"
        )
        return EXIT_ERROR
    print(f"appliance is ready on {settings.bind}")
    return EXIT_OK


def _update(args: argparse.Namespace) -> int:
    from appliance.ops.update import run_update

    return run_update(_settings(args), args)


def _logs(args: argparse.Namespace) -> int:
    from appliance.ops.logs import run_logs

    return run_logs(args)


def _status(args: argparse.Namespace) -> int:
    from appliance.local_api import api_base, api_verify

    settings = _settings(args)
    base = f"{api_base(settings)}/api/v1/health"
    try:
        # Loopback: no proxy, .netrc or CA bundle from the environment applies.
        with httpx.Client(
            timeout=args.timeout, trust_env=False, verify=api_verify(settings)
        ) as client:
            live = client.get(f"{base}/live").json()
            other = _other_store(settings, live)
            if other is not None:
                _error(other)
                return EXIT_ERROR
            with handing_back(settings):
                token = _operator_token(settings)
            if token:
                client.headers["Authorization"] = f"Bearer {token}"
            answer = client.get(f"{base}/services")
            # Without the store (so without a key) the services list stays empty.
            services = answer.json() if answer.status_code == 200 else {}
            ready_response = client.get(f"{base}/ready")
    except httpx.TransportError:
        where = _elsewhere(settings)
        _error(f"the daemon is not running (nothing answers on {settings.bind}){where}")
        return EXIT_NOT_RUNNING
    except ValueError:
        _error(f"something on {settings.bind} answered, but not the appliance")
        return EXIT_ERROR
    ready = ready_response.json()
    report = {
        "ready": ready_response.status_code == 200,
        "version": live.get("version"),
        "uptime_seconds": live.get("uptime_seconds"),
        "checks": ready.get("checks", []),
        "services": services.get("services", []),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_status_table(report, settings.bind))
    return EXIT_OK if report["ready"] else EXIT_ERROR


def _other_store(settings: Settings, live: dict[str, Any]) -> str | None:
    """Why the appliance answering on APPLIANCE_BIND is not the one of these settings, or
    None when it is (or is too old to say which store it serves)."""
    from appliance.store.identity import our_store_id

    theirs = live.get("store_id")
    if not theirs:
        return None
    try:
        ours = trio.run(our_store_id, settings)
    except Exception:
        return None  # not ours to read (a state dir of another user, say): cannot tell
    if ours == theirs:
        return None
    mine = (
        f"the state dir {settings.state_dir}"
        if settings.embedded_redis
        else "the Redis at APPLIANCE_REDIS_URL"
    )
    return (
        f"the appliance answering on {settings.bind} (APPLIANCE_BIND) serves another store "
        f"than these settings name ({mine}): give the command that daemon's settings "
        "(--env-file FILE or APPLIANCE_ENV_FILE)"
    )


def _elsewhere(settings: Settings) -> str:
    """Where the daemon of these settings' state dir listens, when that is not here."""
    from appliance.store.lock import StateLock

    holder = StateLock(Path(settings.state_dir)).wait_for_holder()
    if holder is None or not holder.is_daemon or holder.bind == settings.bind:
        return ""
    return f"; {holder.describe()} uses this state dir: set APPLIANCE_BIND={holder.bind}"


def _operator_token(settings: Settings) -> str | None:
    """An admin key for this command when the daemon's store is reachable, else None."""
    from appliance.auth.operator import operator_key

    try:
        return trio.run(operator_key, settings)
    except Exception:
        return None


def _status_table(report: dict[str, Any], bind: str) -> str:
    lines = [
        f"appliance {report['version']} on {bind}: "
        f"{'ready' if report['ready'] else 'NOT READY'}, up {_age(report['uptime_seconds'])}",
        "",
    ]
    # One worker per resident model: `worker:<model>` may be long.
    width = max([10, *(len(service["name"]) for service in report["services"])])
    lines.append(
        f"{'SERVICE':<{width}} {'STATE':<10} {'HEALTHY':<8} {'PID':>8} {'RESTARTS':>8}  LAST ERROR"
    )
    for service in report["services"]:
        lines.append(
            f"{service['name']:<{width}} {service['state']:<10} "
            f"{'yes' if service['healthy'] else 'NO':<8} {service['pid'] or '-':>8} "
            f"{service['restarts']:>8}  {service['last_error'] or '-'}"
        )
    lines += ["", f"{'CHECK':<10} {'STATE':<10} DETAIL"]
    for check in report["checks"]:
        lines.append(f"{check['name']:<10} {check['state']:<10} {check['detail']}")
    return "\n".join(lines)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    value = int(seconds)
    days, value = divmod(value, 86400)
    hours, value = divmod(value, 3600)
    minutes, value = divmod(value, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {value}s"


def _init(args: argparse.Namespace) -> int:
    path: Path = args.env_file or DEFAULT_ENV_FILE
    if path.exists():
        _error(f"{path} already exists; it is left as it is (remove it first to start over)")
        return EXIT_ERROR
    text, admin_key = _env_text_with_admin_key(production=not args.development)
    try:
        write_new_env_file(path, text)
    except FileExistsError:
        _error(f"{path} already exists; it is left as it is")
        return EXIT_ERROR
    except PermissionError:
        _error(f"cannot write {path}: permission denied (run as root, or pass --env-file)")
        return EXIT_ERROR
    print(f"wrote {path} (mode 0600) with new SECRET_KEY and PRIVACY_SALT")
    print(f"first admin API key (shown only now; the daemon records it at start): {admin_key}")
    return EXIT_OK


def _env_text_with_admin_key(production: bool) -> tuple[str, str]:
    """The env file's text with the first admin key's id and hash; and the key."""
    from appliance.auth.apikeys import hash_token, new_token

    text = generate_env_file_text(production=production)
    key_id, token = new_token()
    text += "# The first admin API key, as id:hash (the key was shown once by init).\n"
    text += f"APPLIANCE_ADMIN_KEY_HASH={key_id}:{hash_token(token)}\n"
    return text, token


def _config_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    problems = startup_problems(settings)
    shown = masked(settings)
    if args.json:
        print(
            json.dumps({"valid": not problems, "problems": problems, "settings": shown}, indent=2)
        )
    else:
        width = max(len(name) for name in shown)
        for name, value in shown.items():
            print(f"{name:<{width}}  {value}")
        for problem in problems:
            _error(problem)
        if not problems:
            print(f"\nsettings are valid ({settings.env}); checked {time.strftime('%H:%M:%S')}")
    return EXIT_ERROR if problems else EXIT_OK
