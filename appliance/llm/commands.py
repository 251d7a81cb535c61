"""`appliance models ...`: the registry and the resident models from the command line.

`list`, `import`, `verify`, `remove`, `set` and `pull` work on the files (the models dir and
its manifest), so they work whether the daemon runs or not; a running daemon sees the change
at its next request. `load`, `unload` and `ps` ask the running daemon (an operator key made
in its store, as `appliance status` does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final

import httpx
import msgspec
import trio

from appliance.config import InvalidKeepAlive, Settings, parse_keep_alive
from appliance.llm.model_defaults import InvalidDefault, parse_assignment
from appliance.llm.pull import Puller
from appliance.llm.registry import ModelRegistry, RegistryError
from appliance.progress import ProgressBar

MB: Final = 1024 * 1024
# Loading a large model through the daemon may take a while.
LOAD_TIMEOUT: Final = 600.0


class DaemonError(Exception):
    """The daemon is not there or refused; the message says why."""


def run_models_command(settings: Settings, args: argparse.Namespace) -> int:
    models_dir = Path(settings.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(models_dir)
    action = args.models_command
    try:
        if action in ("load", "unload", "ps"):
            return _ask_daemon(settings, args)
        if action == "list":
            return _list(registry, args.json)
        if action == "import":
            if args.path.is_symlink():
                # Followed on purpose (model caches are symlinks), and said; nothing of the
                # target is shown unless it imports.
                print(f"{args.path.name} is a symlink: importing the file it points to")
            record = registry.import_file(
                args.path, args.name, progress=ProgressBar(f"importing {args.path.name}")
            )
            print(f"imported {record.name} ({record.size // MB} MB, sha256 {record.sha256 or '?'})")
            return 0
        if action == "pull":
            return _pull(settings, registry, args)
        if action == "verify":
            results = registry.verify(args.name, progress=ProgressBar("verifying"))
            failed = [r for r in results if not r.ok]
            for result in results:
                print(f"{result.name:<32} {'ok' if result.ok else 'FAILED'}  {result.reason or ''}")
            return 1 if failed else 0
        if action == "remove":
            registry.remove(args.name)
            print(f"removed {args.name}")
            return 0
        if action == "set":
            changes = dict(parse_assignment(text) for text in args.assignments)
            record = registry.set_defaults(args.name, changes)
            print(f"{record.name}: {record.defaults.describe() or 'no defaults'}")
            return 0
    except (RegistryError, InvalidDefault, InvalidKeepAlive, DaemonError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"appliance: {exc.strerror or exc}", file=sys.stderr)
        return 1
    raise AssertionError(action)


def _list(registry: ModelRegistry, as_json: bool) -> int:
    records = registry.list()
    if as_json:
        print(json.dumps([msgspec.to_builtins(r) for r in records], indent=2))
        return 0
    if not records:
        print("no models installed; import one with: appliance models import PATH")
        return 0
    print(f"{'NAME':<32} {'STATE':<8} {'SIZE':>8}  {'ARCH':<10} REASON / DEFAULTS")
    for record in records:
        print(
            f"{record.name:<32} {record.state:<8} {record.size // MB:>6}MB  "
            f"{record.architecture or '-':<10} {record.reason or record.defaults.describe()}"
        )
    return 0


def _pull(settings: Settings, registry: ModelRegistry, args: argparse.Namespace) -> int:
    puller = Puller(
        registry,
        allowed_hosts=settings.pull_allowed_hosts,
        max_bytes=settings.pull_max_size,
        progress=ProgressBar(f"pulling {args.name}" if args.name else "pulling"),
    )
    record = puller.pull(args.url, name=args.name, sha256=args.sha256)
    resumed = f", resumed at {puller.resumed_from // MB} MB" if puller.resumed_from else ""
    print(f"pulled {record.name} ({record.size // MB} MB{resumed}, sha256 {record.sha256})")
    return 0


def _ask_daemon(settings: Settings, args: argparse.Namespace) -> int:
    from appliance.auth.operator import operator_key
    from appliance.local_api import api_base, api_verify

    action = args.models_command
    keep_alive = getattr(args, "keep_alive", None)
    if keep_alive is not None:
        parse_keep_alive(keep_alive)  # a typo is said here, not by the daemon
    try:
        token = trio.run(operator_key, settings)
    except Exception:
        raise DaemonError(
            "the daemon is not running (its store does not answer); load, unload and ps ask "
            "the running daemon: start it (systemctl start appliance)"
        ) from None
    base = f"{api_base(settings)}/api/v1/models"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(
            timeout=LOAD_TIMEOUT, headers=headers, trust_env=False, verify=api_verify(settings)
        ) as client:
            if action == "ps":
                response = client.get(f"{base}/resident")
            elif action == "load":
                body = {"keep_alive": keep_alive} if keep_alive is not None else {}
                response = client.post(f"{base}/{args.name}/load", json=body)
            else:
                response = client.post(f"{base}/{args.name}/unload")
    except httpx.TransportError:
        raise DaemonError(f"the daemon does not answer on {settings.bind}") from None
    answer = _answer(response)
    if action == "ps":
        _print_resident(answer, args.json)
    elif action == "load":
        print(
            f"{answer['name']} loaded ({answer['estimated_bytes'] // MB} MB estimated, "
            f"RSS {answer['rss_bytes'] // MB} MB, keep-alive {answer['keep_alive']})"
        )
    else:
        print(answer["message"])
    return 0


def _answer(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        raise DaemonError(f"the daemon answered HTTP {response.status_code}") from None
    if response.status_code >= 400:
        try:
            message = body["error"]["message"]
        except (KeyError, TypeError):
            message = f"HTTP {response.status_code}"
        raise DaemonError(message)
    return body


def _print_resident(answer: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    used, budget = answer["memory_used_bytes"] // MB, answer["memory_budget_bytes"] // MB
    models = answer["models"]
    if not models:
        print(f"no model is resident (budget {budget} MB)")
        return
    print(
        f"{'NAME':<32} {'STATE':<9} {'PID':>7} {'MEMORY':>8} {'RSS':>7} {'SLOTS':>6} "
        f"{'IDLE':>7}  KEEP-ALIVE"
    )
    for model in models:
        idle = f"{model['idle_seconds']:.0f}s" if model["running"] == 0 else "busy"
        print(
            f"{model['name']:<32} {model['state']:<9} {model['pid'] or '-':>7} "
            f"{model['estimated_bytes'] // MB:>6}MB {model['rss_bytes'] // MB:>5}MB "
            f"{model['running']:>2}/{model['slots']:<3} {idle:>7}  {model['keep_alive']}"
        )
    print(f"memory: {used} MB of {budget} MB (APPLIANCE_MODEL_MEMORY)")
