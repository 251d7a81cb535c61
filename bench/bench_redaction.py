"""Redaction: recall and false-positive rate on the labelled corpus per level (overall and
per category), and the time to redact a realistic 2 KB chat message per level.

Recall counts a labelled item as found only with its exact span and category; the
false-positive rate is the share of samples with nothing to find that got a finding (per
category: of the samples without an item of that category). The corpus, its labelling
rules and the scoring live in tests/redaction_corpus.py; the batch written before the
detectors ever ran on it (HELD_OUT_SAMPLES) is also scored on its own.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any, Final

from harness import REPO, note, result

if str(REPO) not in sys.path:  # tests/ is a package of the repository, not installed
    sys.path.insert(0, str(REPO))

from appliance.privacy.redaction import LEVELS, Redactor
from tests.redaction_corpus import HELD_OUT_SAMPLES, SAMPLES, Find, Score, evaluate

NAME: Final = "redaction"
RECALL_GOAL: Final = 0.98
FALSE_POSITIVE_GOAL: Final = 0.02
LATENCY_GOAL_US: Final = 1000.0
MESSAGE_SIZE: Final = 2048
# A support conversation as users write it: some personal data among ordinary numbers
# (versions, dates, prices, order numbers, a URL) and prose.
_WITH_DATA: Final = (
    "Hi, this is Jane Miller again (jane.miller@example.com, +49 30 1234567). Following up on "
    "ticket #48213 from 15.10.2024: the appliance at our office, 12 rue de la Paix, 75002 "
    "Paris, still fails after the upgrade to version 2.4.1. The admin UI is on 10.0.4.17 and "
    "the nightly job logs in with postgres://backup:Winter2024!@db.internal:5432/app, which I "
    "know is bad. Billing charged card 4111 1111 1111 1111 twice (order ORD-2024-000123, EUR "
    "1,299.00 each); please refund to DE89 3704 0044 0532 0130 00 instead. "
)
_PLAIN: Final = (
    "Could you summarise the attached release notes for the team? We moved from 2.3 to 2.4 "
    "last week, the dashboard now loads in about 1.5 s instead of 4 s, and the 99th "
    "percentile of request latency dropped by 30% across all 3 regions. Two open questions: "
    "whether the cache should expire after 10 or 15 minutes, and how we explain the new "
    "pricing tiers (19, 49 and 99 euros a month) to existing customers before 1 March. "
)


def _message(lead: str) -> str:
    filler = _PLAIN * (MESSAGE_SIZE // len(_PLAIN) + 1)
    return (lead + filler)[:MESSAGE_SIZE]


MESSAGES: Final = {"with_personal_data": _message(_WITH_DATA), "without": _message(_PLAIN)}


def run(quick: bool) -> Iterator[dict[str, Any]]:
    yield from corpus_quality()
    yield from latency(rounds=5 if quick else 20, per_round=100 if quick else 250)


def corpus_quality() -> Iterator[dict[str, Any]]:
    for level in ("standard", "strict"):
        find = _finder(Redactor(level))
        score = evaluate(find, level)
        held_out = evaluate(find, level, HELD_OUT_SAMPLES)
        note(
            f"{level}: recall {score.recall:.4f}, false positives "
            f"{score.false_positive_rate:.4f} over {len(SAMPLES)} samples"
        )
        yield from _overall(level, score, held_out)
        for category, part in score.categories.items():
            common = {"level": level, "category": category}
            yield result(
                NAME,
                "corpus_recall",
                round(part.recall, 4),
                "ratio",
                found=part.found,
                expected=part.expected,
                misses=part.misses,
                **common,
            )
            yield result(
                NAME,
                "corpus_false_positive_rate",
                round(part.false_positive_rate, 4),
                "ratio",
                flagged=part.false_positive_samples,
                clean_samples=part.clean_samples,
                false_positives=part.false_positives,
                **common,
            )


def _finder(redactor: Redactor) -> Find:
    return lambda text: [(f.category, f.start, f.end) for f in redactor.find(text)]


def _overall(level: str, score: Score, held_out: Score) -> Iterator[dict[str, Any]]:
    recall_goal: dict[str, Any] = {}
    false_positive_goal: dict[str, Any] = {}
    if level == "strict":
        recall_goal = {"goal": f">= {RECALL_GOAL}", "meets_goal": score.recall >= RECALL_GOAL}
        false_positive_goal = {
            "goal": f"<= {FALSE_POSITIVE_GOAL}",
            "meets_goal": score.false_positive_rate <= FALSE_POSITIVE_GOAL,
        }
    expected = sum(c.expected for c in score.categories.values())
    yield result(
        NAME,
        "corpus_recall",
        round(score.recall, 4),
        "ratio",
        level=level,
        category="all",
        expected=expected,
        samples=len(SAMPLES),
        **recall_goal,
    )
    yield result(
        NAME,
        "corpus_false_positive_rate",
        round(score.false_positive_rate, 4),
        "ratio",
        level=level,
        category="all",
        flagged=score.negative_samples_flagged,
        negative_samples=score.negative_samples,
        spurious_findings=score.spurious,
        **false_positive_goal,
    )
    yield result(
        NAME,
        "held_out_recall",
        round(held_out.recall, 4),
        "ratio",
        level=level,
        samples=len(HELD_OUT_SAMPLES),
    )
    yield result(
        NAME,
        "held_out_false_positive_rate",
        round(held_out.false_positive_rate, 4),
        "ratio",
        level=level,
        flagged=held_out.negative_samples_flagged,
        negative_samples=held_out.negative_samples,
    )


def latency(rounds: int, per_round: int) -> Iterator[dict[str, Any]]:
    """Microseconds per redact() call, wall clock and this thread's CPU time; levels and
    messages take turns within each round so that drift hits them all alike. The goal is
    judged on CPU time: on a shared 2-core box the wall clock's tail measures the
    neighbours (time spent descheduled), not the redactor."""
    redactors: dict[str, Redactor] = {level: Redactor(level) for level in LEVELS}
    walls: dict[tuple[str, str], list[float]] = {
        (lv, kind): [] for lv in LEVELS for kind in MESSAGES
    }
    cpus: dict[tuple[str, str], list[float]] = {key: [] for key in walls}
    for redactor in redactors.values():  # warm up
        for message in MESSAGES.values():
            for _ in range(20):
                redactor.redact(message)
    for round_ in range(rounds):
        for level, kind in walls if round_ % 2 == 0 else reversed(walls):
            redact, message = redactors[level].redact, MESSAGES[kind]
            wall, cpu = walls[level, kind], cpus[level, kind]
            for _ in range(per_round):
                started, started_cpu = time.perf_counter_ns(), time.thread_time_ns()
                redact(message)
                cpu.append((time.thread_time_ns() - started_cpu) / 1000)
                wall.append((time.perf_counter_ns() - started) / 1000)
    for (level, kind), wall in walls.items():
        (wall_p50, wall_p99), (cpu_p50, cpu_p99) = (
            _percentiles(wall),
            _percentiles(cpus[level, kind]),
        )
        note(
            f"{level} {kind}: p50 {wall_p50:.0f} us, p99 {wall_p99:.0f} us (CPU p99 {cpu_p99:.0f})"
        )
        goal: dict[str, Any] = {}
        if level != "off":
            goal = {
                "goal": f"cpu p99 < {LATENCY_GOAL_US:g}",
                "meets_goal": cpu_p99 < LATENCY_GOAL_US,
            }
        common = {"level": level, "message": kind, "chars": len(MESSAGES[kind]), "calls": len(wall)}
        yield result(
            NAME, "redact_latency_p50", round(wall_p50, 1), "us", cpu=round(cpu_p50, 1), **common
        )
        yield result(
            NAME,
            "redact_latency_p99",
            round(wall_p99, 1),
            "us",
            cpu=round(cpu_p99, 1),
            **common,
            **goal,
        )


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]
