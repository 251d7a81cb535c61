"""`make mutate`: mutation-test the modules listed in modules.toml against their own tests.

    python -m tools.mutate                 every listed module
    python -m tools.mutate appliance/envfile.py ...   only these
    python -m tools.mutate --list MODULE   print the mutants, run nothing
    python -m tools.mutate MODULE --only 'settle'   only the mutants whose line has this

Prints a score per module (caught / (mutants - equivalent)) and each survivor with file:line
and the change; exits 1 when a module scores under its threshold or when the allow-list of
equivalent mutants names a mutant that no longer exists.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tools.mutate import mutants as mutation
from tools.mutate.runner import Executor, Outcome, preload, tree_copy

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parents[1]
CONFIG: Final = HERE / "modules.toml"
ALLOW_LIST: Final = HERE / "equivalent.txt"
LOG_DIR: Final = ROOT / "build" / "mutate"
# A mutant's tests may take this many times the unmutated run (plus a margin) before the
# mutant counts as a hang (caught): the shared machine's speed varies.
TIMEOUT_FACTOR: Final = 4
TIMEOUT_MARGIN_S: Final = 20.0
MARKS: Final = {Outcome.KILLED: ".", Outcome.TIMEOUT: "T", Outcome.SURVIVED: "S"}


@dataclass(frozen=True)
class Module:
    path: str
    tests: tuple[str, ...]
    threshold: float


@dataclass
class Result:
    module: Module
    mutants: int = 0
    equivalent: int = 0
    caught: int = 0
    timeouts: int = 0
    seconds: float = 0.0
    survivors: list[mutation.Mutant] = field(default_factory=list)

    @property
    def score(self) -> float:
        judged = self.mutants - self.equivalent
        return 100.0 if judged == 0 else 100.0 * self.caught / judged

    @property
    def passed(self) -> bool:
        return self.score >= self.module.threshold


def load_modules() -> list[Module]:
    with CONFIG.open("rb") as handle:
        data = tomllib.load(handle)
    modules = [
        Module(entry["path"], tuple(entry["tests"]), float(entry["threshold"]))
        for entry in data["module"]
    ]
    for module in modules:
        for name in (module.path, *(test.partition("::")[0] for test in module.tests)):
            if not (ROOT / name).is_file():
                raise SystemExit(f"{CONFIG.name}: {name} does not exist")
    return modules


def load_allow_list() -> dict[str, str]:
    """Equivalent mutants: `<key as printed for a survivor, without :line> -- <reason>`."""
    allowed: dict[str, str] = {}
    for number, line in enumerate(ALLOW_LIST.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        key, separator, reason = line.rpartition(" -- ")
        if not separator or not reason.strip():
            raise SystemExit(f"{ALLOW_LIST.name}:{number}: needs `<mutant> -- <reason>`")
        allowed[key.strip()] = reason.strip()
    return allowed


def choose(modules: list[Module], names: list[str]) -> list[Module]:
    if not names:
        return modules
    by_path = {module.path: module for module in modules}
    unknown = [name for name in names if name not in by_path]
    if unknown:
        raise SystemExit(
            f"not in {CONFIG.name}: {', '.join(unknown)} (listed: {', '.join(by_path)})"
        )
    return [by_path[name] for name in names]


def mutate_module(
    module: Module, executor: Executor, allowed: dict[str, str], only: list[str] | None = None
) -> Result:
    started = time.monotonic()
    target = executor.copy_root / module.path
    original = target.read_text()
    found = mutation.mutants(module.path, original)
    if only:
        found = [m for m in found if m.key in only or any(t in m.describe() for t in only)]
    mutation.unchanged(original)
    result = Result(module, mutants=len(found))
    stem = module.path.replace("/", ".").removesuffix(".py")
    baseline = executor.run(module.tests, float("inf"), f"{stem}.baseline.log")
    if baseline.outcome is not Outcome.SURVIVED:
        raise SystemExit(
            f"{module.path}: its tests fail without a mutant (exit {baseline.exit_code}); "
            f"see {LOG_DIR / (stem + '.baseline.log')}"
        )
    timeout = baseline.seconds * TIMEOUT_FACTOR + TIMEOUT_MARGIN_S
    print(
        f"{module.path}: {len(found)} mutants, tests {' '.join(module.tests)} "
        f"({baseline.seconds:.1f} s unmutated)",
        flush=True,
    )
    try:
        for mutant in found:
            if mutant.key in allowed:
                result.equivalent += 1
                print("=", end="", flush=True)
                continue
            target.write_text(mutation.apply(original, mutant))
            run = executor.run(module.tests, timeout, f"{stem}.log")
            print(MARKS[run.outcome], end="", flush=True)
            if run.outcome is Outcome.SURVIVED:
                result.survivors.append(mutant)
            else:
                result.caught += 1
                result.timeouts += run.outcome is Outcome.TIMEOUT
    finally:
        target.write_text(original)
    result.seconds = time.monotonic() - started
    print()
    return result


def report(result: Result) -> None:
    verdict = "ok" if result.passed else f"UNDER THRESHOLD {result.module.threshold:.0f}%"
    print(
        f"  {result.module.path}: {result.score:.1f}% ({result.caught} caught of "
        f"{result.mutants - result.equivalent}; {result.equivalent} equivalent, "
        f"{result.timeouts} by timeout; {result.seconds:.0f} s) {verdict}"
    )
    for mutant in result.survivors:
        print(f"    survived: {mutant.describe()}")


def table(results: list[Result]) -> None:
    print("\n| module | mutants | equivalent | caught | score | threshold | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| `{r.module.path}` | {r.mutants} | {r.equivalent} | {r.caught} | "
            f"{r.score:.1f}% | {r.module.threshold:.0f}% | {r.seconds:.0f} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.mutate", description=__doc__)
    parser.add_argument("modules", nargs="*", help="module paths from modules.toml")
    parser.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    parser.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="only the mutants whose printed line contains TEXT, or whose allow-list form is "
        "TEXT (repeatable; e.g. to re-test survivors)",
    )
    parser.add_argument(
        "--tests",
        nargs="+",
        metavar="TEST",
        help="run these tests instead of the configured ones (e.g. to score an older suite)",
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that the tree copy is removed and no test run is left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    modules = choose(load_modules(), args.modules)
    if args.tests:
        modules = [Module(m.path, tuple(args.tests), m.threshold) for m in modules]
    allowed = load_allow_list()
    if args.list:
        for module in modules:
            for mutant in mutation.mutants(module.path, (ROOT / module.path).read_text()):
                mark = "=" if mutant.key in allowed else " "
                print(f"{mark} {mutant.describe()}")
        return 0
    all_keys = {
        mutant.key
        for module in modules
        for mutant in mutation.mutants(module.path, (ROOT / module.path).read_text())
    }
    chosen = tuple(module.path + " " for module in modules)
    stale = [key for key in allowed if key.startswith(chosen) and key not in all_keys]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    preload()
    started = time.monotonic()
    results: list[Result] = []
    with tree_copy(ROOT) as copy_root:
        executor = Executor(copy_root, LOG_DIR)
        for module in modules:
            result = mutate_module(module, executor, allowed, args.only)
            report(result)
            results.append(result)
    table(results)
    print(f"\n{len(results)} modules in {time.monotonic() - started:.0f} s")
    failed = [r.module.path for r in results if not r.passed]
    for key in stale:
        print(f"{ALLOW_LIST.name}: no such mutant any more (remove or update): {key}")
    if failed:
        print(f"under threshold: {', '.join(failed)}")
    return 1 if failed or stale else 0


if __name__ == "__main__":
    sys.exit(main())
