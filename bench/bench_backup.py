"""Backup and restore throughput against `tar czf` and `tar xzf` on the same state dir.

The state dir (1 GiB by default, `--size-mb` for a quick look) is built in a temp dir:
  - 45% compressible text in two large files: JSON-lines records with random ids, numbers
    and a little prose, like an append-only log or an export (gzip -6 makes them ~30%);
  - 45% incompressible random bytes in two large files, like sealed Redis values;
  - 10% small files of 16-48 KiB in eight folders, half text and half random.
Text is cut from a pool of 1 MiB blocks of distinct records; deflate sees 32 KiB at a
time, so reusing blocks does not make the text easier to compress.

Each round times `tar czf` and `write_archive`, then `tar xzf` and `extract_archive`
(which also hashes every member and fsyncs every file, as a restore must), alternating
which goes first, with the page cache written back (`sync`) before each step. The best
round of each counts. Run alone: `.venv/bin/python bench/bench_backup.py [--size-mb N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from harness import REPO, note, result, short_tempdir

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from appliance.backup.archive import Source, extract_archive, verify_archive, write_archive
from appliance.store.sealing import KeyRing

NAME: Final = "backup"
RATIO_GOAL: Final = 0.8
MIB: Final = 1024 * 1024
FULL_MB: Final = 1024
QUICK_MB: Final = 128
TEXT_BLOCK: Final = MIB
TEXT_POOL: Final = 16
SMALL_MIN: Final = 16 * 1024
SMALL_MAX: Final = 48 * 1024
SMALL_DIRS: Final = 8
WORDS: Final = (
    *("the", "model", "answered", "a", "question", "about", "weather", "and", "water"),
    *("in", "garden", "while", "user", "asked", "for", "summary", "of", "meeting", "notes"),
    *("from", "tuesday", "list", "open", "tasks", "please", "remind", "me", "tomorrow"),
)


def run(quick: bool) -> Iterator[dict[str, Any]]:
    yield from backup_throughput(QUICK_MB if quick else FULL_MB, rounds=1 if quick else 2)


def backup_throughput(size_mb: int, rounds: int) -> Iterator[dict[str, Any]]:
    with short_tempdir() as work:
        state = work / "state"
        note(f"building a {size_mb} MiB state dir")
        size = build_state(state, size_mb * MIB)
        sources = [
            Source(path.relative_to(state).as_posix(), path)
            for path in sorted(state.rglob("*"))
            if path.is_file()
        ]
        keys = KeyRing("bench-secret-" + "b" * 30, "bench-salt")  # authenticates the manifest
        best: dict[str, float] = {}
        sizes: dict[str, int] = {}
        for round_ in range(rounds):
            archives = work / f"archives{round_}"
            archives.mkdir()
            tar_file = archives / "state.tar.gz"
            ours: list[Path] = []

            def tar_create(tar_file: Path = tar_file) -> None:
                subprocess.run(["tar", "-C", str(state), "-czf", str(tar_file), "."], check=True)

            def our_create(archives: Path = archives, ours: list[Path] = ours) -> None:
                when = datetime.now(UTC)
                meta = {"bench": "backup"}
                ours.append(write_archive(archives, sources, meta, keys=keys, when=when))

            steps: dict[str, Callable[[], None]] = {"tar_czf": tar_create, "write": our_create}
            _timed_steps(steps, round_, best)
            sizes = {"tar_czf": tar_file.stat().st_size, "write": ours[0].stat().st_size}

            def tar_extract(work: Path = work, tar_file: Path = tar_file) -> None:
                dest = work / "tar-out"
                dest.mkdir()
                subprocess.run(["tar", "-C", str(dest), "-xzf", str(tar_file)], check=True)

            def our_extract(work: Path = work, ours: list[Path] = ours) -> None:
                extract_archive(ours[0], work / "our-out", keys=keys)

            steps = {"tar_xzf": tar_extract, "extract": our_extract}
            _timed_steps(steps, round_, best)
            if round_ == 0:
                _check_same(work / "tar-out", work / "our-out", sources)
                _sync()
                started = time.monotonic()
                verify_archive(ours[0], keys=keys, record=False)
                best["verify"] = time.monotonic() - started
            for name in ("tar-out", "our-out"):
                shutil.rmtree(work / name)
            shutil.rmtree(archives)
    common = {"size_mib": size // MIB, "files": len(sources), "rounds": rounds}
    for step, seconds in best.items():
        yield result(NAME, f"{step}_throughput", round(size / MIB / seconds, 1), "MiB/s", **common)
    for mine, theirs in (("write", "tar_czf"), ("extract", "tar_xzf")):
        ratio = best[theirs] / best[mine]
        yield result(
            NAME,
            f"{mine}_vs_{theirs}",
            round(ratio, 3),
            "ratio",
            ours_mib_s=round(size / MIB / best[mine], 1),
            theirs_mib_s=round(size / MIB / best[theirs], 1),
            goal=f">= {RATIO_GOAL}",
            meets_goal=ratio >= RATIO_GOAL,
            **common,
        )
    yield result(
        NAME,
        "compressed_size_vs_tar_czf",
        round(sizes["write"] / sizes["tar_czf"], 3),
        "ratio",
        ours_bytes=sizes["write"],
        theirs_bytes=sizes["tar_czf"],
        **common,
    )


def _timed_steps(steps: dict[str, Callable[[], None]], round_: int, best: dict[str, float]) -> None:
    # Alternate the order, so neither always runs right after the other's writeback.
    order = list(steps) if round_ % 2 == 0 else list(steps)[::-1]
    for step in order:
        _sync()
        started = time.monotonic()
        steps[step]()
        seconds = time.monotonic() - started
        note(f"round {round_ + 1}: {step} {seconds:.2f} s")
        best[step] = min(best.get(step, seconds), seconds)


def _sync() -> None:
    os.sync()


def _check_same(tar_out: Path, our_out: Path, sources: list[Source]) -> None:
    """Both restores gave the same bytes: a benchmark of a wrong restore is worthless."""
    for source in sources:
        ours = (our_out / source.arcname).read_bytes()
        if ours != (tar_out / source.arcname).read_bytes() or ours != source.path.read_bytes():
            raise RuntimeError(f"{source.arcname} differs after the restores")


def build_state(state: Path, size: int) -> int:
    """Fill `state` with the documented mix; its total size in bytes."""
    rng = random.Random(20240601)
    pool = [_text_block(rng) for _ in range(TEXT_POOL)]
    large = int(size * 0.45)
    files = {
        "redis/appendonly.aof": ("text", large * 2 // 3),
        "exports/conversations.jsonl": ("text", large - large * 2 // 3),
        "redis/dump.rdb": ("random", large * 2 // 3),
        "state/blobs.bin": ("random", large - large * 2 // 3),
    }
    left = size - 2 * large
    count = 0
    while left > 0:
        small = min(left, rng.randint(SMALL_MIN, SMALL_MAX))
        kind = "text" if count % 2 == 0 else "random"
        files[f"small/d{count % SMALL_DIRS}/item{count:05d}.json"] = (kind, small)
        left -= small
        count += 1
    for name, (kind, length) in files.items():
        path = state / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as file:
            written = 0
            while written < length:
                piece = min(length - written, 4 * MIB)
                if kind == "random":
                    file.write(os.urandom(piece))
                else:
                    block = pool[rng.randrange(TEXT_POOL)]
                    start = rng.randrange(TEXT_BLOCK - min(piece, TEXT_BLOCK) + 1)
                    file.write(block[start : start + min(piece, TEXT_BLOCK)])
                    piece = min(piece, TEXT_BLOCK)
                written += piece
    return sum(length for _, length in files.values())


def _text_block(rng: random.Random) -> bytes:
    records = []
    length = 0
    while length < TEXT_BLOCK:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        record = json.dumps(
            {
                "id": f"{rng.getrandbits(128):032x}",
                "conversation": f"conv:{{{rng.getrandbits(64):016x}}}",
                "created": 1_700_000_000 + rng.randrange(30_000_000),
                "tokens": rng.randrange(4096),
                "score": round(rng.random(), 6),
                "text": words,
            }
        ).encode()
        records.append(record + b"\n")
        length += len(record) + 1
    return b"".join(records)[:TEXT_BLOCK]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="backup/restore throughput against tar")
    parser.add_argument("--size-mb", type=int, default=FULL_MB, help="state dir size in MiB")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (the best counts)")
    args = parser.parse_args(argv)
    for line in backup_throughput(args.size_mb, args.rounds):
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
