"""`appliance status`: ask the running daemon how it is."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from appliance.commands.common import EXIT_ERROR, EXIT_NOT_RUNNING, EXIT_OK, error, settings_of
from appliance.config import Settings
from appliance.ops.owner import handing_back

if TYPE_CHECKING:
    from appliance.commands.common import Subparsers


def add_parser(commands: Subparsers) -> None:
    status = commands.add_parser("status", help="ask the running daemon how it is")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")


def run(args: argparse.Namespace) -> int:
    from appliance.local_api import api_base, api_verify

    settings = settings_of(args)
    base = f"{api_base(settings)}/api/v1/health"
    try:
        # Loopback: no proxy, .netrc or CA bundle from the environment applies.
        with httpx.Client(
            timeout=args.timeout, trust_env=False, verify=api_verify(settings)
        ) as client:
            live = client.get(f"{base}/live").json()
            other = _other_store(settings, live)
            if other is not None:
                error(other)
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
        error(f"the daemon is not running (nothing answers on {settings.bind}){where}")
        return EXIT_NOT_RUNNING
    except ValueError:
        error(f"something on {settings.bind} answered, but not the appliance")
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
