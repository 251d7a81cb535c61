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
import math
import re
from collections import Counter
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


# --- scanning helpers ----------------------------------------------------------------------


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


# --- checksums -----------------------------------------------------------------------------


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
IBAN_LENGTHS: Final = MappingProxyType(
    {
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
)


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


# --- cards and IBANs -----------------------------------------------------------------------

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
    """Cards inside a run of digit groups, longest window first, so that a reference
    number or a CVV next to a card does not hide it."""
    if _labelled(_PRODUCT_LABEL, text, start):
        return
    groups = [m.span() for m in _DIGIT_GROUP.finditer(text, start, end)]
    index = 0
    while index < len(groups):
        for stop in range(min(len(groups), index + 5), index, -1):
            window = groups[index:stop]
            one_separator = len({text[e] for _, e in window[:-1]}) <= 1
            digits = text[window[0][0] : window[-1][1]].replace(" ", "").replace("-", "")
            if one_separator and _layout_ok([e - s for s, e in window]) and card_ok(digits):
                yield window[0][0], window[-1][1]
                index = stop
                break
        else:
            index += 1


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


# --- phones, national ids, IPv4 --------------------------------------------------------------

# A number labelled as something else (order, invoice, customer number...) is that thing.
_OTHER_LABEL: Final = re.compile(
    r"(?i)(?:order|invoice|ticket|ref(?:erence)?|tracking|customer|account|kunden(?:nummer)?|"
    r"rechnung(?:snummer)?|bestell(?:nummer)?|auftrag(?:snummer)?|commande|facture|sku|item|"
    r"part|serial|isbn|case|id)\.?\s*(?:no\.?|nr\.?|number|nummer|numéro|n°|#)?\s*[:#.]?\s*$"
)
# "version 1.2.3.4" is a version, and so is anything after a release or section word.
_VERSION_CUE: Final = re.compile(
    r"(?i)(?:\bversion|\bver\.?|\bv|\brelease|\brel\.?|\bbuild|\bfirmware|\bfw|\brev\.?|"
    r"\brevision|\bpatch|\bupdate|\bupgrade|\bsection|\bchapter|\bclause|§|\babschnitt|"
    r"\bkapitel|\bchapitre|\boid)\s*[:#]?\s*$|[A-Za-z]/$"  # .../$: Chrome/120.0.0.0
)
_PHONE_CUE: Final = re.compile(
    r"(?i)\b(?:tel|phone|telephone|mobile|mob|cell|fax|call|handy|telefon|mobil|tél|téléphone"
    r"|portable|whatsapp)\b\.?(?:\s*(?:no|nr|number|nummer|numéro|#)\b\.?)?\s*[:\-]?\s*$"
)
_ID_CUE: Final = re.compile(
    r"(?i)\b(?:ssn|social security (?:number|no\.?)|passport (?:number|no\.?|nr\.?)|reisepass"
    r"(?:nummer)?|(?:personal)?ausweis(?:nummer)?|id card (?:number|no\.?)|national id(?: number)?"
    r"|tax id|tin|steuer-?id|steuer-?identifikationsnummer|numéro de sécurité sociale|driver'?s "
    r"licen[cs]e (?:number|no\.?))(?![\w])\s*(?:is|:|#|=)?\s*$"
)
_AFTER_PHONE_WORD: Final = cue_before(
    _PHONE_CUE, "tel|phone|mob|cell|fax|call|handy|tél|portable|whatsapp"
)
_AFTER_ID_WORD: Final = cue_before(
    _ID_CUE, "ssn|social|passport|reisepass|ausweis|id|tin|steuer|sécurité|licen"
)


def _digits(value: str) -> int:
    return sum(map(str.isdigit, value))


def _phone_ok(low: int, high: int) -> Check:
    def check(text: str, start: int, end: int) -> bool:
        in_range = low <= _digits(text[start:end]) <= high
        return in_range and not _labelled(_OTHER_LABEL, text, start)

    return check


def _international_ok(text: str, start: int, end: int) -> bool:
    value = text[start:end]
    count = _digits(value.replace("(0)", "", 1))
    if value.startswith("00"):  # 00 as the exit code: needs separators to read as a phone
        plausible = 11 <= count <= 17 and not value.isdigit()
    else:  # E.164 allows 15 digits; 9 is the shortest national number plus country code
        plausible = 9 <= count <= 15
    return plausible and not _labelled(_OTHER_LABEL, text, start)


def _cued_phone_ok(text: str, start: int, end: int) -> bool:
    return 7 <= _digits(text[start:end]) <= 15 and _AFTER_PHONE_WORD(text, start)


def _cued_id_ok(text: str, start: int, end: int) -> bool:
    return _digits(text[start:end]) >= 5 and _AFTER_ID_WORD(text, start)


def _ssn_ok(text: str, start: int, end: int) -> bool:
    # Never issued: area 000, 666 and 900-999, group 00, serial 0000.
    area, group, serial = text[start:end].split("-")
    valid = area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"
    return valid and not _labelled(_OTHER_LABEL, text, start)


def _ipv4_ok(text: str, start: int, end: int) -> bool:
    octets = text[start:end].split(".")
    if any(int(o) > 255 or (len(o) > 1 and o[0] == "0") for o in octets):
        return False
    # Loopback, "any" and broadcast are the same on every machine: they identify nobody.
    if octets[0] in ("0", "127") or octets == ["255"] * 4:
        return False
    return _VERSION_CUE.search(text, max(0, start - 24), start) is None


def _nino_ok(text: str, start: int, end: int) -> bool:
    return text[start : start + 2] not in ("BG", "GB", "NK", "KN", "TN", "NT", "ZZ")


def _without(separators: str, valid: Callable[[str], bool]) -> Check:
    table = str.maketrans("", "", separators)
    return lambda text, start, end: valid(text[start:end].translate(table))


# The shared passes: a number's first character ([0-9+(]) or a capital, not inside a word.
NUMBER: Final = r"[0-9+(](?<![\w][0-9+(])"
CAPITAL: Final = r"[A-ZÄÖÜ](?<![\w][A-ZÄÖÜ])"
_DIGIT: Final = r"(?<=[0-9])"
# Card: 13+ characters of digit groups joined by single spaces or hyphens.
_CARD: Final = r"(?=[\d \-]{12})\d*+(?:[ \-]\d++)*+(?![\w]|[.,\-/]\d)"
# International phone: +CC or 00CC, then groups; atomic, so a rejected run is not retried.
_INTERNATIONAL: Final = (
    r"(?:(?<=\+)|(?<=0)0)[1-9](?>\d*+(?:(?:[ .\-/]|\s?\(0\)\s?|\s(?=\())?(?:\(\d{1,5}\)|\d++))*+)"
    r"(?![\w])"
)
# North American (NXX) NXX-XXXX with separators; area and exchange never start with 0/1.
_NANP: Final = (
    r"(?:(?<=1)[ .\-](?:\([2-9]\d\d\)\s?|[2-9]\d\d[ .\-])|(?<=\()[2-9]\d\d\)\s?|(?<=[2-9])\d\d"
    r"[ .\-])[2-9]\d\d[ .\-]\d{4}(?![\w]|[.\-/]\d)"
)
# Trunk prefix 0: 030 1234567, 01 42 68 53 00, (030) 123 456 78, 06.12.34.56.78; 9-12
# digits (a date has at most 8), one separator kind after the area code.
_TRUNK: Final = (
    r"(?:(?<=\()0\d{1,4}\)\s?|(?<=0)(?!0)\d{1,4}[ /.\-])(?>\d++(?:(?P<sep>[ .\-])\d++(?:"
    r"(?P=sep)\d++)*+)?)(?![\w]|[.,\-/:]\d)"
)
# Any 7-15 digits right after a phone word: "Tel: 4155552671", "Handy 0151/1234567".
_CUED_PHONE: Final = r"(?:(?<=\+)\(?\d|(?<=\()\d|(?<=[0-9]))[\d \-./()]{5,18}\d(?![\w])"
_NIR: Final = r" ?\d{2} ?(?:0[1-9]|1[0-2]|[2-9]\d) ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?![\w])"
_IPV4: Final = r"\d{0,2}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\w]|\.\d|-[A-Za-z])"
# An id-shaped value after an id's name: 5+ characters, 4+ digits after the first one.
_ID_VALUE: Final = r"(?=(?:[A-Z \-]*+\d){4})[A-Z0-9]{0,11}(?:[ \-][0-9]{1,8}){0,4}(?![\w])"

NUMBER_RULES: Final = (
    Rule("card", "CARD", _DIGIT + r"(?<![.,+\-/]\d)(?<!\d[ \-]\d)", _CARD, spans=card_spans,
         long=True),
    Rule("intl", "PHONE", r"(?<=[+0])(?<![\w+\-./][+0])(?<!\d[ .\-/][+0])", _INTERNATIONAL,
         check=_international_ok, long=True),
    Rule("nanp", "PHONE", r"(?<=[(1-9])(?<![\w+.\-/][(1-9])(?<!\d[ .][(1-9])", _NANP,
         check=_phone_ok(10, 11), long=True),
    Rule("trunk", "PHONE", r"(?<=[(0])(?<![\w+.,\-/:][(0])(?<!\d[ .\-/][(0])", _TRUNK,
         check=_phone_ok(9, 12), long=True),
    Rule("cued_phone", "PHONE", r"(?<![0-9][ .\-/][0-9+(])", _CUED_PHONE, check=_cued_phone_ok,
         long=True),
    # US SSN AAA-GG-SSSS.
    Rule("ssn", "NATIONAL_ID", _DIGIT + r"(?<![\-][0-9])(?<!\d [0-9])", r"\d\d-\d\d-\d{4}"
         r"(?![\w]|-\d)", check=_ssn_ok, long=True),
    # French NIR (sécurité sociale), with its key.
    Rule("nir", "NATIONAL_ID", r"(?<=[12])(?<!\d [12])", _NIR, check=_without(" ", nir_ok),
         long=True),
    # Spanish DNI, with its mod-23 letter.
    Rule("dni", "NATIONAL_ID", _DIGIT + r"(?<!-[0-9])", r"\d{7}-?[A-HJ-NP-TV-Z](?![\w])",
         check=_without("-", dni_ok), long=True),
    Rule("ipv4", "IP", _DIGIT + r"(?<![.][0-9])", _IPV4, check=_ipv4_ok, long=True),
    Rule("cued_id", "NATIONAL_ID", _DIGIT + r"(?<![0-9][ \-][0-9])", _ID_VALUE,
         check=_cued_id_ok, rank="cued_id"),
)  # fmt: skip
CAPITAL_RULES: Final = (
    # UK National Insurance: two letters (not D F I Q U V, not BG GB NK KN TN NT ZZ), 6 digits.
    Rule("nino", "NATIONAL_ID", r"(?<=[A-CEGHJ-PR-TW-Z])",
         r"[A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![\w])", check=_nino_ok),
    # Italian codice fiscale and Spanish NIE, with their check letters.
    Rule("cf", "NATIONAL_ID", r"(?<=[A-Z])", r"[A-Z]{5}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z]"
         r"(?![\w])", check=lambda text, start, end: codice_fiscale_ok(text[start:end])),
    Rule("nie", "NATIONAL_ID", r"(?<=[XYZ])", r"-?\d{7}-?[A-HJ-NP-TV-Z](?![\w])",
         check=_without("-", dni_ok)),
    Rule("cued_id_letter", "NATIONAL_ID", r"(?<![0-9][ \-][A-Z])", _ID_VALUE,
         check=_cued_id_ok, rank="cued_id"),
)  # fmt: skip


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


# --- secrets -------------------------------------------------------------------------------

PEM: Final = (
    r"-----BEGIN[A-Z ]{0,40}PRIVATE KEY(?: BLOCK)?-----(?:[A-Za-z0-9+/=\s:,.]|-(?!----))*+"
    r"(?:-----END[A-Z ]{0,40}PRIVATE KEY(?: BLOCK)?-----)?"
)
# Issuer prefixes that make a token self-identifying, and JWTs (base64url of '{"' is eyJ).
PREFIXED_SECRET: Final = (
    r"(?:sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}+|sk_(?:live|test)_[A-Za-z0-9]{16,}+|rk_(?:live|"
    r"test)_[A-Za-z0-9]{16,}+|pk_(?:live|test)_[A-Za-z0-9]{16,}+|gh[pousr]_[A-Za-z0-9]{36,255}+|"
    r"github_pat_[A-Za-z0-9_]{22,255}+|xox[baprs]-[A-Za-z0-9\-]{10,}+|AKIA[A-Z0-9]{16}|ASIA"
    r"[A-Z0-9]{16}|AIza[0-9A-Za-z_\-]{35}|glpat-[A-Za-z0-9_\-]{20,}+|npm_[A-Za-z0-9]{36}|hf_"
    r"[A-Za-z0-9]{30,}+|pypi-[A-Za-z0-9_\-]{50,}+|SG\.[\w\-]{16,}+\.[\w\-]{16,}+|eyJ[A-Za-z0-9_\-]"
    r"{8,}+\.[A-Za-z0-9_\-]{8,}+\.[A-Za-z0-9_\-]{4,}+)(?![\w\-])"
)
AUTH_HEADER: Final = (
    r"(?i)\b(?:bearer[ \t]+(?=[A-Za-z0-9\-._~+/]{16})|basic[ \t]+(?=[A-Za-z0-9+/]*[0-9+/=]))"
    r"(?P<value>[A-Za-z0-9\-._~+/]{8,512}+=*)(?![\w\-])"
)
# key: value and key = value, anchored on the separator; the key's last word says what the
# value is: a password (any value) or a token, secret or api key (a token-shaped value).
_SEPARATOR: Final = r"[:=](?P<q>[ \t]*[\"'`]?)(?P<value>[^\s\"'`]{3,200}+)"
_PASSWORD_KEY: Final = re.compile(
    r"(?i)(?:passw(?:or)?d|passwort|kennwort|pwd|passphrase|mot de passe|contraseña)[\"']?"
    r"[ \t]*$"
)
_TOKEN_KEY: Final = re.compile(
    r"(?i)(?:secret|token|credentials?|apikey|(?:api|secret|access|private|signing|encryption|"
    r"master|licen[cs]e)[_\- ]?key)[\"']?[ \t]*$"
)
PASSWORD_IS: Final = (
    r"(?i)\b(?:password|passwort|kennwort|mot de passe|contraseña) (?:is|ist|est|es) "
    r"(?P<q>[\"'`]?)(?P<value>[^\s\"'`]{3,200}+)"
)
CREDENTIAL_CUES: Final = (
    "pass", "pwd", "kennwort", "contraseña", "secret", "token", "key", "credential"
)  # fmt: skip
# Placeholders, references and code are not credentials: <token>, ${TOKEN}, os.environ[...].
_NOT_A_VALUE: Final = re.compile(
    r"(?i)^(?:[\[<{$%*]|\.\.\.|x+$|none$|null$|nil$|undefined$|true$|false$|required$|optional$"
    r"|changeme$|example$|string$|your[_\-]|(?-i:[A-Z_][A-Z0-9_]*)$)|[()\[\]{}]|environ|getenv"
    r"|^[A-Za-z_]\w*(?:\.\w+)+$"
)


def _classes(value: str) -> int:
    """How many of lower case, upper case, digits and other characters `value` mixes."""
    return (
        any(map(str.islower, value))
        + any(map(str.isupper, value))
        + any(map(str.isdigit, value))
        + (not value.isalnum())
    )


def credential_value_ok(value: str, quoted: bool, password: bool) -> bool:
    if (not quoted and _NOT_A_VALUE.search(value)) or value.startswith(("[", "<", "{", "$")):
        return False
    digit_or_symbol = not value.isalpha()
    if password:  # any value, but unquoted prose ("password: click the link") is none
        return len(value) >= 3 and (quoted or digit_or_symbol)
    return len(value) >= 8 and _classes(value) >= 2 and digit_or_symbol


def credential_scan() -> SpanScan:
    separator, password_is = re.compile(_SEPARATOR), re.compile(PASSWORD_IS)

    def spans(match: re.Match[str], password: bool) -> Iterator[Span]:
        value = match.group("value").rstrip(".,;:")
        if credential_value_ok(value, bool(match.group("q").strip()), password):
            yield match.start("value"), match.start("value") + len(value)

    def scan(text: str) -> Iterator[Span]:
        for match in separator.finditer(text):
            start = max(0, match.start() - 40)
            if _PASSWORD_KEY.search(text, start, match.start()):
                yield from spans(match, True)
            elif _TOKEN_KEY.search(text, start, match.start()):
                yield from spans(match, False)
        for match in password_is.finditer(text):
            yield from spans(match, True)

    return scan


# Random-looking tokens. Shannon entropy floor in bits per character: random base62/base64
# strings of 24+ characters measure 3.9-5.2 and lowercase+digit (base36) ones 3.6-4.7; 3.5
# drops repetitive strings (AAAA...1, padding) and keeps 99% of random 24-character base36.
ENTROPY_MIN: Final = 3.5
# Entropy alone cannot tell a token from a long identifier (get_user_by_id_and_timestamp
# measures 3.7 too), so structure decides: random text changes character class (letter and
# digit, or lower to upper inside a run) on 35-45% of its characters, identifiers on under
# 20%; and word-like runs (3+ letters with a vowel) cover under 60% of random text.
SWITCH_RATE_MIN: Final = 0.2
SWITCH_RATE_FEW_WORDS: Final = 0.12
WORD_SHARE_MAX: Final = 0.6
TOKEN_MIN: Final = 24
TOKEN_MAX: Final = 256  # longer runs are encoded data (images, archives), not credentials
LONG_WORD: Final = 15  # the shortest prefixed token: xoxb- and 10 characters
_TOKEN_RUN: Final = re.compile(r"[A-Za-z0-9+/_\-]++=*+")
_SEGMENT: Final = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_PART_SEPARATORS: Final = re.compile(r"[/_.\-]")
_HEX: Final = re.compile(r"[0-9a-fA-F\-]+")
_PATH_WORD: Final = re.compile(r"[a-z][a-z0-9._\-]{2,}|[A-Z][a-z]{2,}[A-Za-z]*")
_SLASH_PARTS: Final = re.compile(r"[^/]+")


def shannon_entropy(value: str) -> float:
    size = len(value)
    return -sum(n / size * math.log2(n / size) for n in Counter(value).values())


def _kind(char: str) -> int:
    return 0 if char.islower() else 1 if char.isupper() else 2 if char.isdigit() else 3


def switch_rate(token: str) -> float:
    """Class changes per character inside separator-free parts; entering a Capitalized word
    (lower, Upper, lower: camelCase) or leaving its capital does not count."""
    switches = 0
    for part in _PART_SEPARATORS.split(token):
        for index in range(len(part) - 1):
            a, b = _kind(part[index]), _kind(part[index + 1])
            camel = a == 0 and b == 1 and part[index + 2 : index + 3].islower()
            switches += a != b and (a, b) != (1, 0) and not camel
    return switches / len(token)


def word_share(token: str) -> float:
    words = (m.group() for m in _SEGMENT.finditer(token))
    vowels = "aeiouyAEIOUY"
    return sum(
        len(w) for w in words if len(w) >= 3 and w.isalpha() and any(c in vowels for c in w)
    ) / len(token)


def looks_random(token: str) -> bool:
    """A credential-like token: long, mixed classes, high entropy, and not made of words.

    Hex-only strings (git hashes, digests, UUIDs) are checksums and ids, not secrets: a key
    in hex is found by its name (`api_key = ...`) instead.
    """
    if not TOKEN_MIN <= len(token) <= TOKEN_MAX or _HEX.fullmatch(token):
        return False
    if token.isdigit() or _classes(token.strip("=_-/.")) < 2:
        return False
    if not any(map(str.isalpha, token)) or shannon_entropy(token) < ENTROPY_MIN:
        return False
    rate = switch_rate(token)
    few_words = rate >= SWITCH_RATE_FEW_WORDS and word_share(token) <= WORD_SHARE_MAX
    return rate >= SWITCH_RATE_MIN or few_words


def _random_spans(token: str, base: int) -> Iterator[Span]:
    """The token if it looks random; in a URL path (a segment is a word) only the random
    segments, since base64 contains '/' too."""
    parts = [m.span() for m in _SLASH_PARTS.finditer(token)]
    path = len(parts) > 1 and any(
        _PATH_WORD.fullmatch(token[s:e]) and word_share(token[s:e]) >= WORD_SHARE_MAX
        for s, e in parts
    )
    if path:
        yield from ((base + s, base + e) for s, e in parts if looks_random(token[s:e]))
    elif looks_random(token):
        yield base, base + len(token)


def token_scan() -> Callable[[str], Iterator[Candidate]]:
    """Prefixed secrets and random-looking tokens, searched only inside long
    whitespace-separated words, which split() finds in C."""
    prefixed = re.compile(PREFIXED_SECRET)
    known, guessed = PRIORITY["prefixed_secret"], PRIORITY["entropy_secret"]

    def scan(text: str) -> Iterator[Candidate]:
        cursor = 0
        for word in [w for w in text.split() if len(w) >= LONG_WORD]:
            start = text.find(word, cursor)
            while start > 0 and not text[start - 1].isspace():  # inside an earlier word
                start = text.find(word, start + 1)
            cursor = start + len(word)
            for match in prefixed.finditer(text, start, cursor):
                if not word_before(text, match.start()):
                    yield known, match.start(), match.end(), "SECRET"
            if len(word) >= TOKEN_MIN:
                for s, e in _token_spans(text, start, cursor):
                    yield guessed, s, e, "SECRET"

    return scan


def _token_spans(text: str, start: int, end: int) -> Iterator[Span]:
    for match in _TOKEN_RUN.finditer(text, start, end):  # maximal runs: linear
        token = match.group()
        if len(token) - len(token.rstrip("=")) > 2 or word_before(text, match.start()):
            continue  # not base64 padding, or glued to a word
        if not text.endswith("base64,", 0, match.start()):  # not a data: URI's payload
            yield from _random_spans(token, match.start())


def standard_detectors(
    number_rules: Sequence[Rule] = (), capital_rules: Sequence[Rule] = ()
) -> tuple[Detector, ...]:
    """The standard set; a stricter level adds rules to the shared passes."""
    auth = cued(AUTH_HEADER, ("bearer", "basic"), lambda t, s, e: _classes(t[s:e]) >= 2, "value")
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
