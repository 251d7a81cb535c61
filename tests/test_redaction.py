"""Redaction: recall and false positives on the labelled corpus, exact placeholders, `off`,
idempotence, random text, and inputs built to make a regex backtrack.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.privacy.redaction import LEVELS, Finding, Redactor
from tests.conftest import examples
from tests.redaction_corpus import (
    CATEGORIES,
    NEGATIVE_SAMPLES,
    POSITIVE_SAMPLES,
    SAMPLES,
    Sample,
    Score,
    evaluate,
    luhn_digit,
)

REDACTORS: dict[str, Redactor] = {level: Redactor(level) for level in LEVELS}
RECALL_GOAL = {"standard": 0.98, "strict": 0.98}
FALSE_POSITIVE_GOAL = {"standard": 0.02, "strict": 0.02}
CATEGORY_RECALL_FLOOR = 0.95
CATEGORY_FALSE_POSITIVE_CEILING = 0.05
PATHOLOGICAL_TIMEOUT = 5.0  # seconds for 100 KB; linear scans take well under one


def _find(level: str) -> Callable[[str], list[tuple[str, int, int]]]:
    redactor = REDACTORS[level]
    return lambda text: [(f.category, f.start, f.end) for f in redactor.find(text)]


def _score(level: str) -> Score:
    return evaluate(_find(level), level)


def _expected_text(sample: Sample, level: str) -> str:
    text = sample.text
    for category, start, end in sorted(sample.spans(level), key=lambda s: -s[1]):
        text = text[:start] + f"[{category}]" + text[end:]
    return text


# --- the corpus ----------------------------------------------------------------------------


def test_corpus_covers_every_category_with_enough_samples() -> None:
    assert len(POSITIVE_SAMPLES) >= 200 and len(NEGATIVE_SAMPLES) >= 200
    for category in CATEGORIES["strict"]:
        items = [i for s in SAMPLES for i in s.strict if i[0] == category]
        assert len(items) >= 20, f"{category}: only {len(items)} labelled items"
    for sample in SAMPLES:
        assert set(sample.standard) <= set(sample.strict), sample.text
        sample.spans("strict")  # every labelled text is found in its sample


@pytest.mark.parametrize("level", ["standard", "strict"])
def test_recall_and_false_positive_rate_meet_the_goal(level: str) -> None:
    score = _score(level)
    assert score.recall >= RECALL_GOAL[level], _misses(score)
    assert score.false_positive_rate <= FALSE_POSITIVE_GOAL[level], _false_positives(score)


@pytest.mark.parametrize("level", ["standard", "strict"])
def test_every_category_meets_its_floor(level: str) -> None:
    score = _score(level)
    assert set(score.categories) == set(CATEGORIES[level])
    for category, result in score.categories.items():
        assert result.expected > 0, category
        assert result.recall >= CATEGORY_RECALL_FLOOR, (category, result.misses)
        assert result.false_positive_rate <= CATEGORY_FALSE_POSITIVE_CEILING, (
            category,
            result.false_positives,
        )


def _misses(score: Score) -> str:
    return "; ".join(f"{c}: {r.misses}" for c, r in score.categories.items() if r.misses)


def _false_positives(score: Score) -> str:
    flagged = {c: r.false_positives for c, r in score.categories.items() if r.false_positives}
    return f"{score.negative_samples_flagged}/{score.negative_samples} flagged: {flagged}"


# --- placeholders, levels, idempotence ------------------------------------------------------


@pytest.mark.parametrize("level", ["standard", "strict"])
def test_placeholders_replace_exactly_the_labelled_spans(level: str) -> None:
    redactor = REDACTORS[level]
    exact = 0
    for sample in SAMPLES:
        result = redactor.redact(sample.text)
        found = {(f.category, f.start, f.end) for f in result.findings}
        if found == sample.spans(level):  # the rare mismatches are scored by the tests above
            exact += 1
            assert result.text == _expected_text(sample, level), sample.text
    assert exact >= 0.98 * len(SAMPLES)


def test_examples_of_each_placeholder() -> None:
    redact = REDACTORS["strict"].redact
    assert redact("mail jane@example.com now").text == "mail [EMAIL] now"
    assert redact("call +49 30 1234567.").text == "call [PHONE]."
    assert redact("card 4111 1111 1111 1111, thanks").text == "card [CARD], thanks"
    assert redact("IBAN DE89 3704 0044 0532 0130 00 BIC X").text == "IBAN [IBAN] BIC X"
    assert redact("from 203.0.113.42:443").text == "from [IP]:443"
    assert redact("SSN 078-05-1120").text == "SSN [NATIONAL_ID]"
    assert (
        redact("postgres://app:s3cret@db.example.com/app").text
        == "postgres://[URL_CREDENTIALS]@db.example.com/app"
    )
    assert redact("key AKIAIOSFODNN7EXAMPLE").text == "key [SECRET]"
    assert redact("at 12 rue de la Paix, 75002 Paris.").text == "at [ADDRESS]."
    assert redact("born on 12 March 1985").text == "born on [DOB]"


def test_off_changes_nothing_and_finds_nothing() -> None:
    off = REDACTORS["off"]
    for sample in SAMPLES:
        result = off.redact(sample.text)
        assert result.text == sample.text
        assert result.findings == () and result.counts == {}


def test_standard_keeps_addresses_and_birth_dates() -> None:
    text = "born on 12 March 1985 at 221B Baker Street, London NW1 6XE"
    assert REDACTORS["standard"].redact(text).text == text
    assert REDACTORS["strict"].redact(text).text == "born on [DOB] at [ADDRESS]"


@pytest.mark.parametrize("level", ["standard", "strict"])
def test_redaction_is_idempotent(level: str) -> None:
    redactor = REDACTORS[level]
    for sample in SAMPLES:
        once = redactor.redact(sample.text).text
        twice = redactor.redact(once)
        assert twice.text == once and twice.findings == (), (sample.text, twice.findings)


def test_result_lists_findings_in_order_with_counts() -> None:
    text = "a@example.com, b@example.com and 10.1.2.3"
    result = REDACTORS["standard"].redact(text)
    assert result.findings == (
        Finding("EMAIL", 0, 13),
        Finding("EMAIL", 15, 28),
        Finding("IP", 33, 41),
    )
    assert result.counts == {"EMAIL": 2, "IP": 1}
    assert REDACTORS["standard"].find(text) == list(result.findings)


def test_overlaps_go_to_the_most_specific_category() -> None:
    find = REDACTORS["strict"].find
    # The password is also "pass@host": the URL credential wins, the host stays.
    assert [f.category for f in find("https://user:pass@example.com/x")] == ["URL_CREDENTIALS"]
    # A token after a password cue is a prefixed secret, and one finding.
    assert [f.category for f in find("password: ghp_" + "a1B2" * 9)] == ["SECRET"]
    # A card inside a password value is still a card.
    assert [f.category for f in find("password: 4111111111111111")] == ["CARD"]


def test_decisions_on_look_alikes() -> None:
    find = REDACTORS["strict"].find
    assert find("commit 3f2c1a9b8e7d6c5b4a3928170f6e5d4c3b2a1908") == []  # git hash
    assert find("upgrade to version 1.2.3.4") == []  # version cue
    assert [f.category for f in find("ping 1.2.3.4")] == ["IP"]  # no cue: an IP
    assert find("bind 127.0.0.1 and 0.0.0.0") == []  # identical on every machine
    assert find("the launch is on 12.03.2024") == []  # a date without a birth cue
    assert find("Your order ORD-2024-000123") == []
    assert find("ssh://git@github.com/org/repo and git@github.com:org/repo.git") == []
    assert find("jane at example dot com") != []  # strict: obfuscated e-mail
    assert REDACTORS["standard"].find("jane at example dot com") == []


def test_an_unknown_level_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="PRIVACY_REDACT_AGGRESSIVENESS is 'max'"):
        Redactor("max")  # type: ignore[arg-type]


# --- random text ---------------------------------------------------------------------------

NUMBER_ALPHABET = "0123456789 -./+()@:#=_abcdefXYZ[]\n'\""
CARD_BRANDS = [
    ("4", 16),
    ("4", 13),
    ("51", 16),
    ("2221", 16),
    ("37", 15),
    ("6011", 16),
    ("3528", 16),
    ("62", 19),
    ("36", 14),
]
NO_DIGITS = st.text(st.characters(blacklist_categories=("Nd", "Cs")), max_size=40)


@st.composite
def card_numbers(draw: st.DrawFn) -> str:
    prefix, length = draw(st.sampled_from(CARD_BRANDS))
    body = prefix + "".join(
        str(d)
        for d in draw(
            st.lists(
                st.integers(0, 9),
                min_size=length - len(prefix) - 1,
                max_size=length - len(prefix) - 1,
            )
        )
    )
    number = body + luhn_digit(body)
    if length == 16 and draw(st.booleans()):
        separator = draw(st.sampled_from([" ", "-"]))
        return separator.join(number[i : i + 4] for i in range(0, 16, 4))
    return number


EMAILS = st.from_regex(
    r"[A-Za-z0-9._%+\-]{1,20}@(?:[a-z0-9](?:[a-z0-9\-]{0,10}[a-z0-9])?\.){1,3}[a-z]{2,6}",
    fullmatch=True,
)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=400), st.text(NUMBER_ALPHABET, max_size=400)))
def test_any_text_redacts_without_error(text: str) -> None:
    for level in LEVELS:
        result = REDACTORS[level].redact(text)
        assert all(0 <= f.start < f.end <= len(text) for f in result.findings)
        assert all(a.end <= b.start for a, b in pairwise(result.findings))


@settings(max_examples=200, deadline=None)
@given(before=NO_DIGITS, number=card_numbers(), after=NO_DIGITS)
def test_an_inserted_card_never_survives(before: str, number: str, after: str) -> None:
    # "card" keeps a product label ("EAN", "SKU") that `before` might end with away from it.
    text = f"{before} card {number} {after}"
    for level in ("standard", "strict"):
        assert number not in REDACTORS[level].redact(text).text


@settings(max_examples=200, deadline=None)
@given(before=st.text(max_size=40), email=EMAILS, after=st.text(max_size=40))
def test_an_inserted_email_never_survives(before: str, email: str, after: str) -> None:
    text = f"{before} {email} {after}"
    for level in ("standard", "strict"):
        assert email not in REDACTORS[level].redact(text).text


# --- inputs built to backtrack -------------------------------------------------------------

PATHOLOGICAL = {
    "digits": "1" * 100_000,
    "digit groups": "1 " * 50_000,
    "dotted digits": "1." * 50_000,
    "phone-ish": "+1 (0" * 20_000,
    "hyphen groups": "4111-" * 20_000,
    "at signs": "a@" * 50_000,
    "domain dots": "a@a." * 25_000,
    "dashes": "-" * 100_000,
    "punctuation": "!?.,;:()[]{}<>" * 7_000,
    "colons": ":" * 100_000,
    "hex colons": "ab:" * 33_000,
    "pem headers": "-----BEGIN PRIVATE KEY-----" * 3_700,
    "url prefixes": "http://a:" * 11_000,
    "one long word": "a" * 100_000 + "===",
    "base64": "aZ3+/b9Q" * 12_500,
    "streets": "12 Main Street " * 6_500,
    "capitals": "AB12 " * 20_000,
    "cue words": "password: born on Tel: SSN: " * 3_500,
    "emails": "a@b.co " * 14_000,
    "iban-ish": "DE89 3704 " * 10_000,
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_input_finishes(name: str) -> None:
    text = PATHOLOGICAL[name]
    done = threading.Event()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            for level in ("standard", "strict"):
                REDACTORS[level].redact(text)
        except BaseException as error:  # reported below, in the test's thread
            failure.append(error)
        finally:
            done.set()

    started = time.monotonic()
    # A daemon thread: if a scan ever backtracks for minutes, the test fails and the run
    # still ends.
    threading.Thread(target=work, name=f"redact-{name}", daemon=True).start()
    assert done.wait(PATHOLOGICAL_TIMEOUT), f"{name}: not done after {PATHOLOGICAL_TIMEOUT} s"
    assert not failure, failure
    assert time.monotonic() - started < PATHOLOGICAL_TIMEOUT


def test_a_long_message_is_redacted_whole() -> None:
    text = ("note " * 2_000) + "mail jane@example.com " + ("x " * 2_000) + "call +49 30 1234567"
    result = REDACTORS["strict"].redact(text)
    assert [f.category for f in result.findings] == ["EMAIL", "PHONE"]
    assert re.search(r"\[EMAIL\].*\[PHONE\]$", result.text)


# --- any unicode, and redacting twice -----------------------------------------------------

ODD_CHARACTERS = st.sampled_from(
    [
        "\u200b",  # zero-width space
        "\u200d",  # zero-width joiner
        "\u202e",  # right-to-left override
        "\u2067",  # right-to-left isolate
        "\ufeff",  # byte order mark
        "\u0301",  # combining accent
        "\ud800",  # lone surrogates: what undecodable input may become
        "\udcff",
        "\U0001f600",
        "\u0663",  # an Arabic-Indic digit
        "\uff11",  # a full-width digit
        "\n",
        "\r",
        "\t",
        "@",
        ".",
        "[",
        "]",
    ]
)
ANY_TEXT = st.one_of(
    st.text(st.characters(), max_size=300),  # every code point, surrogates included
    st.lists(st.one_of(ODD_CHARACTERS, st.text(NUMBER_ALPHABET, max_size=6)), max_size=60).map(
        "".join
    ),
)


@settings(max_examples=examples(150), deadline=None)
@given(text=ANY_TEXT)
def test_any_unicode_redacts_and_redacting_twice_changes_nothing(text: str) -> None:
    for level in ("standard", "strict"):
        once = REDACTORS[level].redact(text)
        assert all(0 <= f.start < f.end <= len(text) for f in once.findings)
        twice = REDACTORS[level].redact(once.text)
        assert twice.text == once.text, (level, twice.findings)


@settings(max_examples=examples(60), deadline=None)
@given(
    before=st.text(st.characters(), max_size=20),
    email=EMAILS,
    after=st.text(st.characters(), max_size=20),
    repeat=st.integers(1, 2000),
)
def test_an_email_on_a_very_long_line_of_odd_text_never_survives(
    before: str, email: str, after: str, repeat: int
) -> None:
    padding = "\u200b\u202e" * repeat  # zero-width and right-to-left marks, no spaces
    text = f"{padding}{before} {email} {after}{padding}"
    for level in ("standard", "strict"):
        assert email not in REDACTORS[level].redact(text).text
