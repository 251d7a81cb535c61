"""The standard-level detectors behind `appliance.privacy.redaction`.

A detector's scan yields candidates (priority, start, end, category); `Redactor` resolves
overlaps. Three rules keep the scans safe and fast:

- Linear time: runs are matched possessively (`++`, `*+`) or atomically, repetitions are
  bounded and lookbehinds stop a scan from restarting inside a run it has rejected, so no
  input can make a regex backtrack catastrophically.
- Skipping in C: every pattern starts with a literal or a character class (lookbehinds come
  after the first character). A leading lookbehind, `\\b` or case-insensitive start costs a
  try at every position, which is most of the time a regex takes on 2 KB of text.
- Few passes: the rules that start at a number share one pass (`Family`), and detectors
  driven by a word ("password", "Tel") run only near that word.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

Span = tuple[int, int]
Candidate = tuple[int, int, int, str]  # priority, start, end, category
Check = Callable[[str, int, int], bool]  # text, start, end

# Overlaps go to the higher priority (the more specific, validated category), then to the
# longer span. Cue-only guesses come last so that a checksummed value inside them wins.
PRIORITY: Final = {
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


def typed(rank: str, category: str, scan: Callable[[str], Iterator[Span]]) -> Callable[[str], Iterator[Candidate]]:
    priority = PRIORITY[rank]
    return lambda text: ((priority, start, end, category) for start, end in scan(text))


def matches(pattern: str, check: Check | None = None, group: int | str = 0) -> Callable[[str], Iterator[Span]]:
    """A scan over one pattern; `check` vets each match, `group` is the span kept."""
    compiled = re.compile(pattern)

    def scan(text: str) -> Iterator[Span]:
        for match in compiled.finditer(text):
            start, end = match.span(group)
            if check is None or check(text, start, end):
                yield start, end

    return scan


CUE_BEFORE: Final = 24  # a needle may sit inside its cue: "birth" in "date of birth"
CUE_WINDOW: Final = 400  # the cue, filler words and the longest value after it


def cued(pattern: str, cues: Sequence[str], check: Check | None = None, group: int | str = 0) -> Callable[[str], Iterator[Span]]:
    """A scan for a pattern that starts at a cue word, searched only in short windows at the
    cues found in the lower-cased text (a case-insensitive start cannot skip ahead)."""
    compiled, whole = re.compile(pattern), matches(pattern, check, group)

    def scan(text: str) -> Iterator[Span]:
        folded = text.lower()
        if len(folded) != len(text):  # case folding changed lengths: scan all of it
            yield from whole(text)
            return
        hits = sorted({i for cue in cues for i in _occurrences(folded, cue)})
        done = 0
        for hit in hits:
            for match in compiled.finditer(text, max(done, hit - CUE_BEFORE), hit + CUE_WINDOW):
                start, end = match.span(group)
                if check is None or check(text, start, end):
                    yield start, end
                    done = match.end()
                if match.start() > hit:
                    break

    return scan


def _occurrences(text: str, needle: str) -> Iterator[int]:
    index = text.find(needle)
    while index >= 0:
        yield index
        index = text.find(needle, index + 1)


@dataclass(frozen=True)
class Rule:
    """One pattern of a `Family`, written after the family's first character."""

    name: str
    rank: str
    category: str
    lookbehind: str  # about the first character and what precedes it
    rest: str  # the pattern after the first character
    check: Check | None = None
    spans: Callable[[str, int, int], Iterator[Span]] | None = None  # refine a raw hit
    back: int = 0  # characters before the first one that belong to the item


class Family:
    """Rules sharing a first character class, matched in one pass: after the first
    character each rule is an optional lookahead that captures its end, and a chain of
    conditionals fails the position unless some rule matched."""

    def __init__(self, first: str, rules: Sequence[Rule]) -> None:
        failing = "(?!)"
        for rule in reversed(rules):
            failing = f"(?({rule.name})|{failing})"
        branches = "".join(f"(?:{r.lookbehind}(?=(?P<{r.name}>{r.rest})))?" for r in rules)
        self._compiled = re.compile(first + branches + failing)
        self._rules = [(self._compiled.groupindex[r.name], r) for r in rules]

    def __call__(self, text: str) -> Iterator[Candidate]:
        for match in self._compiled.finditer(text):
            regs, first = match.regs, match.start()
            for index, rule in self._rules:
                end = regs[index][1]
                if end < 0:
                    continue
                start = first - rule.back
                found = rule.spans(text, start, end) if rule.spans else iter(((start, end),))
                for s, e in found:
                    if rule.check is None or rule.check(text, s, e):
                        yield PRIORITY[rule.rank], s, e, rule.category


# --- checksums ---------------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _lengths(length: int, countries: str) -> dict[str, int]:
    return dict.fromkeys(countries.split(), length)


# IBAN length per country (SWIFT IBAN registry): a known length is half of the check.
IBAN_LENGTHS: Final = {
    **_lengths(15, "NO"),
    **_lengths(16, "BE"),
    **_lengths(18, "DK FI FO GL NL FK SD"),
    **_lengths(19, "MK SI"),
    **_lengths(20, "AT BA EE KZ LT LU XK MN"),
    **_lengths(21, "CH HR LI LV"),
    **_lengths(22, "BG BH CR DE GB GE IE ME RS VA"),
    **_lengths(23, "AE GI IL IQ TL OM SO"),
    **_lengths(24, "AD CZ ES MD PK RO SA SE SK TN VG"),
    **_lengths(25, "LY PT ST"),
    **_lengths(26, "IS TR"),
    **_lengths(27, "FR GR IT MC MR SM BI DJ"),
    **_lengths(28, "AL AZ BY CY DO GT HU LB PL SV NI"),
    **_lengths(29, "BR EG PS QA UA"),
    **_lengths(30, "JO KW MU"),
    **_lengths(31, "MT SC"),
    **_lengths(32, "LC"),
    **_lengths(33, "RU"),
}


def iban_ok(compact: str) -> bool:
    """ISO 13616: the registry length, then mod 97 of the rearranged number is 1."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact[2:].isascii():
        return False
    remainder = 0
    for char in compact[4:] + compact[:4]:
        remainder = (remainder * (100 if char.isalpha() else 10) + int(char, 36)) % 97
    return remainder == 1


def nir_ok(value: str) -> bool:
    """French NIR: 13 characters (Corsica's 2A/2B count as 19/18) and a 97-complement key."""
    body = value[:13].replace("2A", "19").replace("2B", "18")
    return body.isdigit() and 97 - int(body) % 97 == int(value[13:])


def dni_ok(value: str) -> bool:
    """Spanish DNI/NIE: the letter is the number mod 23 (NIE's X/Y/Z stand for 0/1/2)."""
    number = value[:-1].translate(str.maketrans("XYZ", "012"))
    return number.isdigit() and "TRWAGMYFPDXBNJZSQVHLCKE"[int(number) % 23] == value[-1]


# Codice fiscale: odd positions weigh 0-9 / A-Z by this table (digits as A-J), even ones
# count them as 0-25; the 16th letter is the sum mod 26.
_CF_ODD: Final = (1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10)
_CF_ODD_ALL: Final = (*_CF_ODD, 22, 25, 24, 23)


def codice_fiscale_ok(value: str) -> bool:
    total = 0
    for index, char in enumerate(value[:15]):
        rank = int(char) if char.isdigit() else ord(char) - 65
        total += _CF_ODD_ALL[rank] if index % 2 == 0 else rank
    return chr(65 + total % 26) == value[15]


# --- numbers: cards, IBANs, phones, SSNs, NIRs, DNIs, IPv4 -----------------------------------

_ANY: Final = tuple(range(13, 20))
# (lowest prefix, highest prefix, lengths): issuer ranges of the major schemes.
CARD_RANGES: Final = (
    ("4", "4", (13, 16, 19)),  # Visa
    ("51", "55", (16,)),  # Mastercard
    ("2221", "2720", (16,)),  # Mastercard 2-series
    ("34", "34", (15,)),  # American Express
    ("37", "37", (15,)),
    ("300", "305", (14, 16, 19)),  # Diners Club
    ("36", "36", (14, 16, 19)),
    ("38", "39", (14, 16, 19)),
    ("3528", "3589", (16, 17, 18, 19)),  # JCB
    ("2200", "2204", (16, 17, 18, 19)),  # Mir
    ("50", "50", _ANY),  # Maestro
    ("56", "69", _ANY),  # Maestro, Discover, UnionPay, RuPay
)
# Printed layouts: 4-4-4-4(-3), Amex 4-6-5, Diners 4-6-4; anything else is another number.
_CARD_LAYOUTS: Final = ((4, 6, 5), (4, 6, 4))
_DIGIT_GROUP: Final = re.compile(r"\d+")
# Product and parcel numbers share card lengths (EAN-13 starts with 4 like Visa, IMEI is
# Luhn-checked): labelled as such, they are not cards.
_PRODUCT_LABEL: Final = re.compile(
    r"(?i)(?:ean|gtin|sku|isbn|imei|upc|artikel(?:nummer)?|art\.-?nr|tracking|sendungsnummer)"
    r"\.?\s*(?:no\.?|nr\.?|number|#)?\s*[:#.]?\s*$"
)
# A number labelled as something else (order, invoice, customer number...) is that thing.
_OTHER_LABEL: Final = re.compile(
    r"(?i)(?:order|invoice|ticket|ref(?:erence)?|tracking|customer|account|kunden(?:nummer)?|"
    r"rechnung(?:snummer)?|bestell(?:nummer)?|auftrag(?:snummer)?|commande|facture|sku|item|"
    r"part|serial|isbn|case|id)\.?\s*(?:no\.?|nr\.?|number|nummer|numéro|n°|#)?\s*[:#.]?\s*$"
)


def _labelled(label: re.Pattern[str], text: str, start: int) -> bool:
    return label.search(text, max(0, start - 32), start) is not None


def card_ok(digits: str) -> bool:
    if not 13 <= len(digits) <= 19 or not digits.isascii() or not luhn_ok(digits):
        return False
    return any(
        len(digits) in lengths and low <= digits[: len(low)] <= high
        for low, high, lengths in CARD_RANGES
    )


def _layout_ok(lengths: list[int]) -> bool:
    if len(lengths) == 1 or tuple(lengths) in _CARD_LAYOUTS:
        return True
    return len(lengths) >= 4 and all(n == 4 for n in lengths[:-1]) and lengths[-1] <= 4


def card_spans(text: str, start: int, end: int) -> Iterator[Span]:
    """Cards inside a run of digit groups, longest window first, so that a reference number
    or a CVV next to a card does not hide it."""
    if _labelled(_PRODUCT_LABEL, text, start):
        return
    groups = [m.span() for m in _DIGIT_GROUP.finditer(text, start, end)]
    index = 0
    while index < len(groups):
        for stop in range(min(len(groups), index + 5), index, -1):
            window = groups[index:stop]
            separators = {text[e] for _, e in window[:-1]}
            piece = text[window[0][0] : window[-1][1]]
            if len(separators) <= 1 and _layout_ok([e - s for s, e in window]):
                if card_ok(piece.replace(" ", "").replace("-", "")):
                    yield window[0][0], window[-1][1]
                    index = stop
                    break
        else:
            index += 1


def iban_spans(text: str, start: int, end: int) -> Iterator[Span]:
    """The IBAN at `start`: the registry length decides where it ends, so the words that
    follow the run of groups stay out of it."""
    length, count = IBAN_LENGTHS.get(text[start : start + 2].upper(), 0), 0
    for index in range(start, end):
        count += text[index].isalnum()
        if count == length:
            if not text[index + 1 : index + 2].isalnum():
                if iban_ok(re.sub(r"[ \-]", "", text[start : index + 1]).upper()):
                    yield start, index + 1
            return


def _digits(value: str) -> int:
    return sum(char.isdigit() for char in value)


def _international_ok(text: str, start: int, end: int) -> bool:
    value = text[start:end]
    count = _digits(value.replace("(0)", "", 1))
    if value.startswith("00"):  # 00 as the exit code: needs separators to read as a phone
        return 11 <= count <= 17 and not value.isdigit()
    # E.164 allows 15 digits; 9 is the shortest national number plus its country code.
    return 9 <= count <= 15


def _phone_ok(low: int, high: int) -> Check:
    def check(text: str, start: int, end: int) -> bool:
        if not low <= _digits(text[start:end]) <= high:
            return False
        return not _labelled(_OTHER_LABEL, text, start)

    return check


def _ssn_ok(text: str, start: int, end: int) -> bool:
    # Never issued: area 000, 666 and 900-999, group 00, serial 0000.
    area, group, serial = text[start:end].split("-")
    valid = area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"
    return valid and not _labelled(_OTHER_LABEL, text, start)


# "version 1.2.3.4" is a version, and so is anything after a release or section word.
_VERSION_CUE: Final = re.compile(
    r"(?i)(?:\bversion|\bver\.?|\bv|\brelease|\brel\.?|\bbuild|\bfirmware|\bfw|\brev\.?|"
    r"\brevision|\bpatch|\bupdate|\bupgrade|\bsection|\bchapter|\bclause|§|\babschnitt|"
    r"\bkapitel|\bchapitre|\boid)\s*[:#]?\s*$|[A-Za-z]/$"  # .../$: Chrome/120.0.0.0
)


def _ipv4_ok(text: str, start: int, end: int) -> bool:
    octets = text[start:end].split(".")
    if any(int(o) > 255 or (len(o) > 1 and o[0] == "0") for o in octets):
        return False
    # Loopback, "any" and broadcast are the same on every machine: they identify nobody.
    if octets[0] in ("0", "127") or octets == ["255"] * 4:
        return False
    return _VERSION_CUE.search(text, max(0, start - 24), start) is None


_NOT_AFTER_WORD: Final = r"(?<![\w][0-9+(])"
# Rules after the first character of a number ([0-9+(]); see each comment.
NUMBER_RULES: Final = (
    # Card: a run of 13+ characters of digit groups joined by single spaces or hyphens.
    Rule("card", "CARD", "CARD", _NOT_AFTER_WORD + r"(?<=[0-9])(?<![.,+\-/]\d)(?<!\d[ \-]\d)",
         r"(?=[\d \-]{12})\d*+(?:[ \-]\d++)*+(?![\w]|[.,\-/]\d)", spans=card_spans),
    # IBAN, anchored at its check digits: two letters before, 30 characters at most after.
    Rule("iban", "IBAN", "IBAN", r"(?<=(?<!\w)[A-Za-z]{2}[0-9])",
         r"\d(?:[ \-]?[A-Za-z0-9]){10,30}+", spans=iban_spans, back=3),
    # International phone: +CC or 00CC then groups; atomic, so a rejected run is not retried.
    Rule("intl", "PHONE", "PHONE", r"(?<=[+0])(?<![\w+\-./][+0])(?<!\d[ .\-/][+0])",
         r"(?:(?<=\+)|(?<=0)0)[1-9](?>\d*+(?:(?:[ .\-/]|\s?\(0\)\s?|\s(?=\())?(?:\(\d{1,5}\)"
         r"|\d++))*+)(?![\w])", check=_phone_ok(0, 99), back=1),
    # North American (NXX) NXX-XXXX with separators; area and exchange never start with 0/1.
    Rule("nanp", "PHONE", "PHONE", r"(?<=[(1-9])(?<![\w+.\-/][(1-9])(?<!\d[ .][(1-9])",
         r"(?:(?<=1)[ .\-](?:\([2-9]\d\d\)\s?|[2-9]\d\d[ .\-])|(?<=\()[2-9]\d\d\)\s?|(?<=[2-9])"
         r"\d\d[ .\-])[2-9]\d\d[ .\-]\d{4}(?![\w]|[.\-/]\d)", check=_phone_ok(10, 11), back=1),
    # Trunk prefix 0: 030 1234567, 01 42 68 53 00, (030) 123 456 78, 06.12.34.56.78; 9-12
    # digits (a date has at most 8), one separator kind after the area code.
    Rule("trunk", "PHONE", "PHONE", r"(?<=[(0])(?<![\w+.,\-/:][(0])(?<!\d[ .\-/][(0])",
         r"(?:(?<=\()0\d{1,4}\)\s?|(?<=0)(?!0)\d{1,4}[ /.\-])(?>\d++(?:(?P<sep>[ .\-])\d++"
         r"(?:(?P=sep)\d++)*+)?)(?![\w]|[.,\-/:]\d)", check=_phone_ok(9, 12), back=1),
    # US SSN AAA-GG-SSSS.
    Rule("ssn", "NATIONAL_ID", "NATIONAL_ID", _NOT_AFTER_WORD + r"(?<![\-][0-9])(?<!\d [0-9])",
         r"(?<=[0-9])\d\d-\d\d-\d{4}(?![\w]|-\d)", check=_ssn_ok, back=1),
    # French NIR (sécurité sociale), with its key.
    Rule("nir", "NATIONAL_ID", "NATIONAL_ID", _NOT_AFTER_WORD + r"(?<=[12])(?<!\d [12])",
         r" ?\d{2} ?(?:0[1-9]|1[0-2]|[2-9]\d) ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?![\w])",
         check=lambda t, s, e: nir_ok(t[s:e].replace(" ", "")), back=1),
    # Spanish DNI, with its mod-23 letter.
    Rule("dni", "NATIONAL_ID", "NATIONAL_ID", _NOT_AFTER_WORD + r"(?<=[0-9])(?<!-[0-9])",
         r"\d{7}-?[A-HJ-NP-TV-Z](?![\w])", check=lambda t, s, e: dni_ok(t[s:e].replace("-", "")),
         back=1),
    # IPv4 dotted quad (octets, loopback and version words are checked after).
    Rule("ipv4", "IP", "IP", _NOT_AFTER_WORD + r"(?<=[0-9])(?<![.][0-9])",
         r"\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\w]|\.\d|-[A-Za-z])", check=_ipv4_ok, back=1),
)
# Rules after the first capital letter (not after a word character).
CAPITAL_RULES: Final = (
    # UK National Insurance: two letters (not D F I Q U V, not BG GB NK KN TN NT ZZ), 6 digits.
    Rule("nino", "NATIONAL_ID", "NATIONAL_ID", r"(?<=[A-CEGHJ-PR-TW-Z])",
         r"[A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![\w])",
         check=lambda t, s, e: t[s : s + 2] not in ("BG", "GB", "NK", "KN", "TN", "NT", "ZZ"),
         back=1),
    # Italian codice fiscale, with its check letter.
    Rule("cf", "NATIONAL_ID", "NATIONAL_ID", "",
         r"[A-Z]{5}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z](?![\w])",
         check=lambda t, s, e: codice_fiscale_ok(t[s:e]), back=1),
    # Spanish NIE, with its mod-23 letter.
    Rule("nie", "NATIONAL_ID", "NATIONAL_ID", r"(?<=[XYZ])", r"-?\d{7}-?[A-HJ-NP-TV-Z](?![\w])",
         check=lambda t, s, e: dni_ok(t[s:e].replace("-", "")), back=1),
)
_CAPITAL: Final = r"[A-Z](?<![\w][A-Z])"
