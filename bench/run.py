"""Run the benchmarks (`make bench`): every bench/bench_*.py, one JSON object per line.

Each module has `NAME` and `run(quick: bool)`, which yields result dicts with at least
bench, metric, value and unit. Progress goes to stderr, results to stdout.

    .venv/bin/python bench/run.py [--only core] [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent
# Run as a script, bench/ is already first on sys.path; imported otherwise, make it so.
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from harness import note  # noqa: E402


def discover() -> list[ModuleType]:
    return [importlib.import_module(p.stem) for p in sorted(BENCH_DIR.glob("bench_*.py"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the appliance benchmarks")
    parser.add_argument("--only", metavar="NAME", help="run one benchmark (e.g. core)")
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    args = parser.parse_args(argv)
    modules = discover()
    names = [module.NAME for module in modules]
    if args.only is not None:
        modules = [m for m in modules if args.only in (m.NAME, m.__name__)]
        if not modules:
            parser.error(f"no benchmark named {args.only!r}; known: {', '.join(names)}")
    failed = []
    for module in modules:
        note(f"{module.NAME}: starting{' (quick)' if args.quick else ''}")
        started = time.monotonic()
        try:
            for line in module.run(args.quick):
                print(json.dumps(line), flush=True)
        except Exception:
            # One broken benchmark should not hide the others' numbers.
            traceback.print_exc()
            failed.append(module.NAME)
        note(f"{module.NAME}: done in {time.monotonic() - started:.1f} s")
    if failed:
        note(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
