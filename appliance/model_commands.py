"""`appliance models list|import|verify|remove`: the registry from the command line.

The registry is files (the models dir and its manifest), so these commands work whether
the daemon runs or not; a running daemon sees the change at its next request.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Final

import msgspec

from appliance.config import Settings
from appliance.llm.registry import ModelRegistry, RegistryError
from appliance.progress import ProgressBar

MB: Final = 1024 * 1024


def run_models_command(settings: Settings, args: argparse.Namespace) -> int:
    models_dir = Path(settings.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(models_dir)
    try:
        if args.models_command == "list":
            return _list(registry, args.json)
        if args.models_command == "import":
            if args.path.is_symlink():
                # Followed on purpose (model caches are symlinks), and said; nothing of the
                # target is shown unless it imports.
                print(f"{args.path.name} is a symlink: importing the file it points to")
            record = registry.import_file(
                args.path, args.name, progress=ProgressBar(f"importing {args.path.name}")
            )
            print(f"imported {record.name} ({record.size // MB} MB, sha256 {record.sha256 or '?'})")
            return 0
        if args.models_command == "verify":
            results = registry.verify(args.name, progress=ProgressBar("verifying"))
            failed = [r for r in results if not r.ok]
            for result in results:
                print(f"{result.name:<32} {'ok' if result.ok else 'FAILED'}  {result.reason or ''}")
            return 1 if failed else 0
        if args.models_command == "remove":
            registry.remove(args.name)
            print(f"removed {args.name}")
            return 0
    except RegistryError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"appliance: {exc.strerror or exc}", file=sys.stderr)
        return 1
    raise AssertionError(args.models_command)


def _list(registry: ModelRegistry, as_json: bool) -> int:
    records = registry.list()
    if as_json:
        print(json.dumps([msgspec.to_builtins(r) for r in records], indent=2))
        return 0
    if not records:
        print("no models installed; import one with: appliance models import PATH")
        return 0
    print(f"{'NAME':<32} {'STATE':<8} {'SIZE':>8}  {'ARCH':<10} REASON")
    for record in records:
        print(
            f"{record.name:<32} {record.state:<8} {record.size // MB:>6}MB  "
            f"{record.architecture or '-':<10} {record.reason or ''}"
        )
    return 0
