"""The scanning machinery shared by the redactor's detectors.

What a detector yields (`Candidate`), the priorities that settle overlaps, and the helpers
that turn a pattern into a scan: `matches`, `cued` (tried only near a cue word),
`cue_before` (a label right before a value) and `Family` (rules sharing a first character,
matched in one pass). The rules that keep every scan linear and fast are in
`appliance.privacy.detectors`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

Span = tuple[int, int]
Candidate = tuple[int, int, int, str]  # priority, start, end, category
Check = Callable[[str, int, int], bool]  # text, start, end
SpanScan = Callable[[str], Iterator[Span]]

# Overlaps go to the higher priority (the more specific, validated category), then to the
# longer span. Guesses from a cue word come last, so a checksummed value inside them wins.
PRIORITY: Final = MappingProxyType(
    {
        "pem": 100,
        "URL_CREDENTIALS": 95,
        "prefixed_secret": 90,
        "IBAN": 85,
        "CARD": 85,
        "EMAIL": 80,
        "NATIONAL_ID": 70,
        "IP": 60,
        "PHONE": 50,
        "ADDRESS": 45,
        "DOB": 45,
        "cued_id": 40,
        "entropy_secret": 30,
        "cued_secret": 20,
    }
)


@dataclass(frozen=True)
class Finding:
    """One piece of personal data: its category and its span in the text."""

    category: str
    start: int
    end: int


@dataclass(frozen=True)
class Detector:
    scan: Callable[[str], Iterator[Candidate]]
    needles: tuple[str, ...] = ()  # run only if one is in the text (lower-cased if folded)
    folded: bool = False


def word_before(text: str, index: int) -> bool:
    return index > 0 and (text[index - 1].isalnum() or text[index - 1] in "_-")


def typed(rank: str, category: str, scan: SpanScan) -> Callable[[str], Iterator[Candidate]]:
    priority = PRIORITY[rank]
    return lambda text: ((priority, start, end, category) for start, end in scan(text))


def matches(pattern: str, check: Check | None = None, group: int | str = 0) -> SpanScan:
    """A scan over one pattern; `check` vets each match, `group` is the span kept."""
    compiled = re.compile(pattern)

    def scan(text: str) -> Iterator[Span]:
        for match in compiled.finditer(text):
            start, end = match.span(group)
            if check is None or check(text, start, end):
                yield start, end

    return scan


CUE_BEFORE: Final = 24  # a needle may sit inside its cue word ("basic" in "Basic")
CUE_WINDOW: Final = 600  # the cue, its filler and the longest value after it


def cued(pattern: str, cues: Sequence[str], check: Check, group: str) -> SpanScan:
    """A pattern that starts at a cue word, tried only at the word starts just before each
    cue found in the lower-cased text (a case-insensitive start cannot skip ahead)."""
    compiled, whole = re.compile(pattern), matches(pattern, check, group)

    def scan(text: str) -> Iterator[Span]:
        folded = text.lower()
        if len(folded) != len(text):  # case folding changed lengths: scan all of it
            yield from whole(text)
            return
        done = 0
        for hit in sorted({i for cue in cues for i in _occurrences(folded, cue)}):
            for position in range(max(done, hit - CUE_BEFORE), hit + 1):
                if word_before(text, position):
                    continue
                match = compiled.match(text, position, position + CUE_WINDOW)
                if match is not None and check(text, *match.span(group)):
                    yield match.span(group)
                    done = match.end()
                    break

    return scan


def _occurrences(text: str, needle: str) -> Iterator[int]:
    index = text.find(needle)
    while index >= 0:
        yield index
        index = text.find(needle, index + 1)


def cue_before(cue: re.Pattern[str], words: str, width: int = 48) -> Callable[[str, int], bool]:
    """Whether `cue` (anchored with `$`) ends right before `start`. A search for its words
    (a literal alternation: fast) rules most places out before the slower regex runs."""
    quick = re.compile(words)

    def check(text: str, start: int) -> bool:
        window = text[max(0, start - width) : start].lower()
        return quick.search(window) is not None and cue.search(window) is not None

    return check


@dataclass(frozen=True)
class Rule:
    """One pattern of a `Family`, written after the family's first character."""

    name: str
    category: str
    lookbehind: str  # about the first character and what precedes it
    rest: str  # the pattern after the first character
    check: Check | None = None
    spans: Callable[[str, int, int], Iterator[Span]] | None = None  # refines a raw hit
    long: bool = False  # needs 4+ digits or separators right after the first character
    rank: str = ""  # the priority's name, if not the category's


_LONG_GUARD: Final = r"(?=[\d .\-/()+]{4})"


class Family:
    """Rules sharing a first character class, matched in one pass. After the first
    character each rule is an optional lookahead capturing its end, and a chain of
    conditionals fails the position unless some rule matched. Rules marked `long` sit
    behind one shared guard, so a short number ("3 regions") skips them in one test."""

    def __init__(self, first: str, rules: Sequence[Rule]) -> None:
        failing = "(?!)"
        for rule in reversed(rules):
            failing = f"(?({rule.name})|{failing})"
        long = "".join(_branch(r) for r in rules if r.long)
        short = "".join(_branch(r) for r in rules if not r.long)
        guarded = f"(?:{_LONG_GUARD}{long})?" if long else ""
        self._compiled = re.compile(first + guarded + short + failing)
        self._rules = [(self._compiled.groupindex[r.name], r) for r in rules]

    def __call__(self, text: str) -> Iterator[Candidate]:
        for match in self._compiled.finditer(text):
            regs, start = match.regs, match.start()
            for index, rule in self._rules:
                end = regs[index][1]
                if end < 0:
                    continue
                found = rule.spans(text, start, end) if rule.spans else iter(((start, end),))
                for s, e in found:
                    if rule.check is None or rule.check(text, s, e):
                        yield PRIORITY[rule.rank or rule.category], s, e, rule.category


def _branch(rule: Rule) -> str:
    return f"(?:{rule.lookbehind}(?=(?P<{rule.name}>{rule.rest})))?"
