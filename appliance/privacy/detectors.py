"""The standard-level detectors behind `appliance.privacy.redaction`.

A detector's scan yields candidates (priority, start, end, category); the redactor resolves
overlaps. Three rules keep every scan safe and fast:

- Linear time: runs are matched possessively (`++`, `*+`) or atomically, repetitions are
  bounded, and lookbehinds stop a scan from restarting inside a run it has rejected, so no
  input makes a regex backtrack catastrophically.
- Skipping in C: every pattern starts with a literal or a character class, lookbehinds come
  after that first character. A leading lookbehind, `\\b` or case-insensitive start costs a
  try at every position, which is most of the time a regex spends on 2 KB of text.
- Few passes: the rules that start at a number or a capital share one pass (`Family`), and
  the detectors driven by a word ("password", "Bearer") run only when it is in the text.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Sequence
from typing import Final

from appliance.privacy.checksums import IBAN_LENGTHS, iban_ok
from appliance.privacy.number_rules import CAPITAL, CAPITAL_RULES, NUMBER, NUMBER_RULES
from appliance.privacy.scanning import (
    PRIORITY,
    Candidate,
    Detector,
    Family,
    Finding,
    Rule,
    Span,
    SpanScan,
    cue_before,
    matches,
    typed,
    word_before,
)
from appliance.privacy.secrets_detect import (
    CREDENTIAL_CUES,
    PEM,
    auth_header_scan,
    credential_scan,
    token_scan,
)

# The scanning machinery is re-exported: the redactor imports it from here.
__all__ = [
    "EMAIL",
    "PRIORITY",
    "URL_CREDENTIALS",
    "Candidate",
    "Detector",
    "Finding",
    "Rule",
    "Span",
    "cue_before",
    "email_scan",
    "iban_scan",
    "ipv6_ok",
    "ipv6_scan",
    "matches",
    "standard_detectors",
    "typed",
    "word_before",
]

# --- IBANs ---------------------------------------------------------------------------------


def iban_scan() -> SpanScan:
    # Anchored at the check digits (two letters before); 30 characters at most follow.
    run = re.compile(r"[0-9](?<=(?<!\w)[A-Za-z]{2}[0-9])\d(?:[ \-]?[A-Za-z0-9]){10,30}+")

    def scan(text: str) -> Iterator[Span]:
        # search, not finditer: a run may swallow the check digits of the next IBAN.
        position = 0
        while (match := run.search(text, position)) is not None:
            found = _iban_at(text, match.start() - 2, match.end())
            if found is not None:
                yield found
            position = found[1] if found else match.start() + 1

    return scan


def _iban_at(text: str, start: int, stop: int) -> Span | None:
    """The IBAN at `start`: its registry length decides where it ends, so the words after
    the run of groups stay out of it."""
    length, count = IBAN_LENGTHS.get(text[start : start + 2].upper(), 0), 0
    for index in range(start, stop):
        count += text[index].isalnum()
        if count == length:
            boundary = not text[index + 1 : index + 2].isalnum()
            compact = re.sub(r"[ \-]", "", text[start : index + 1]).upper()
            return (start, index + 1) if boundary and iban_ok(compact) else None
    return None


# --- IPv6, e-mail, credentials in URLs -------------------------------------------------------

_HEX_COLON: Final = frozenset("0123456789abcdefABCDEF:")


def ipv6_scan() -> SpanScan:
    # Anchored on a colon pair; the candidate is the whole hex/colon run around it.
    anchor = re.compile(r":[0-9A-Fa-f]{0,4}+:")
    candidate = re.compile(r"[0-9A-Fa-f:]{2,39}+(?![\w:.])")

    def scan(text: str) -> Iterator[Span]:
        position = 0
        while (match := anchor.search(text, position)) is not None:
            start = match.start()
            while start > max(0, match.start() - 4) and text[start - 1] in _HEX_COLON:
                start -= 1
            found = candidate.match(text, start)
            if found is not None and not word_before(text, start) and ipv6_ok(found.group()):
                yield found.span()
                position = found.end()
            else:
                position = match.end() - 1

    return scan


def ipv6_ok(value: str) -> bool:
    try:
        address = ipaddress.IPv6Address(value)
    except ValueError:
        return False
    groups = [g for g in value.split(":") if g]
    # "1::2" in a slice or "ab::cd" is code; a real address has 3+ groups or a full one.
    plausible = len(groups) >= 3 or any(len(g) == 4 for g in groups)
    return plausible and not (address.is_loopback or address.is_unspecified)


# local@domain.tld; not after '/' (ssh://git@host), and not "git@github.com:org/repo.git"
# (an scp-style remote, not a mailbox).
EMAIL: Final = (
    r"[\w.%+\-](?<![\w.%+\-/][\w.%+\-])[\w.%+\-]{0,63}@(?:[^\W_](?:[\w\-]{0,61}[^\W_])?\.)+"
    r"[^\W\d_]{2,24}(?![\w\-]|\.[^\W_]|:[^\s/])"
)


def email_scan() -> SpanScan:
    # One anchored try per '@', from the start of the local part before it (64 characters
    # at most), so "a@a@a@..." costs one short try per '@'.
    compiled = re.compile(EMAIL)

    def scan(text: str) -> Iterator[Span]:
        position = 0
        while (at := text.find("@", position)) >= 0:
            position, start = at + 1, at
            while start > 0 and at - start <= 64 and _local_char(text[start - 1]):
                start -= 1
            if start < at and (match := compiled.match(text, start)) is not None:
                yield match.span()
                position = match.end()

    return scan


def _local_char(char: str) -> bool:
    return char.isalnum() or char in "_.%+-"


# ://user:password@host: the user and password are the span, so scheme, host and the '@'
# stay readable. A user without a password (ssh://git@host) is no credential.
URL_CREDENTIALS: Final = r"://(?P<userinfo>[^\s/?#@:\[\]]{0,128}:[^\s/?#\[\]]{1,256})@(?=[\w\[])"
_SCHEME: Final = re.compile(r"(?<![\w+.\-])[A-Za-z][A-Za-z0-9+.\-]{1,15}$")


def _scheme_ok(text: str, start: int, end: int) -> bool:
    return _SCHEME.search(text, max(0, start - 20), start - 3) is not None  # before "://"


def standard_detectors(
    number_rules: Sequence[Rule] = (), capital_rules: Sequence[Rule] = ()
) -> tuple[Detector, ...]:
    """The standard set; a stricter level adds rules to the shared passes."""
    auth = auth_header_scan()
    return (
        Detector(Family(NUMBER, (*NUMBER_RULES, *number_rules))),
        Detector(Family(CAPITAL, (*CAPITAL_RULES, *capital_rules))),
        Detector(typed("IBAN", "IBAN", iban_scan())),
        Detector(token_scan()),
        Detector(typed("pem", "SECRET", matches(PEM)), ("-----BEGIN",)),
        Detector(
            typed("URL_CREDENTIALS", "URL_CREDENTIALS", matches(URL_CREDENTIALS, _scheme_ok, 1)),
            ("://",),
        ),
        Detector(typed("EMAIL", "EMAIL", email_scan()), ("@",)),
        Detector(typed("IP", "IP", ipv6_scan()), (":",)),
        Detector(typed("cued_secret", "SECRET", auth), ("bearer", "basic"), folded=True),
        Detector(typed("cued_secret", "SECRET", credential_scan()), CREDENTIAL_CUES, folded=True),
    )
