"""Typed redaction: personal data becomes `[EMAIL]`, `[PHONE]`, `[CARD]`... before content is
stored and before anything is logged (`PRIVACY_REDACT_AGGRESSIVENESS`).

- `standard`: e-mail addresses, phone numbers, payment cards (Luhn and issuer range), IBANs
  (registry length and mod 97), IP addresses, national ids (US SSN, UK NI number, French
  NIR, Spanish DNI/NIE, Italian codice fiscale, and id-shaped values after an id's name),
  credentials in URLs, and secrets: issuer-prefixed keys, JWTs, PEM private keys, values of
  password/token/api-key fields, Authorization headers and random-looking tokens.
- `strict` adds postal addresses (`[ADDRESS]`: house number + street in English, German,
  French, Italian and Spanish forms, US city-state-ZIP, UK postcodes, postcode + city lines,
  P.O. boxes), dates of birth (`[DOB]`: a date after "born", "DOB", "geboren am", "né le"...)
  and obfuscated e-mail addresses ("jane at example dot com").
- `off` returns the text unchanged.

Look-alikes: a dotted quad is an IP unless a version or section word comes right before it
("version 1.2.3.4"); loopback, 0.0.0.0 and broadcast identify nobody and are kept. Dates
without a birth cue are kept. Hex-only strings, 40-character git hashes among them, are not
secrets. A number labelled as an order, invoice, customer or tracking number is not a phone
or an SSN. Placeholders match no detector, so redacting twice changes nothing.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

import trio

from appliance.privacy.detectors import (
    PRIORITY,
    Candidate,
    Detector,
    Finding,
    Rule,
    Span,
    cue_before,
    matches,
    standard_detectors,
    typed,
    word_before,
)

__all__ = ["LEVELS", "Finding", "Level", "RedactionResult", "Redactor"]

Level = Literal["off", "standard", "strict"]
LEVELS: Final[tuple[Level, ...]] = ("off", "standard", "strict")


def _either_case(words: str) -> str:
    """`[Ww]ord` alternatives (a case-insensitive branch is slow to try), led by a lookahead
    on their first letters so that most positions fail at once."""
    alternatives = sorted(words.split(), key=len, reverse=True)
    firsts = "".join(sorted({c for w in alternatives for c in (w[0].lower(), w[0].upper())}))
    spelled = "|".join(f"[{w[0].upper()}{w[0].lower()}]{re.escape(w[1:])}" for w in alternatives)
    return f"(?=[{firsts}])(?:{spelled})"


# --- postal addresses: rules of the shared passes, then merged ------------------------------

_APOSTROPHES: Final = "'\u2019"
_NAME: Final = rf"[A-ZÄÖÜÉÈÀÂÎÔÁÍÓÚ][\w{_APOSTROPHES}\-]*"
_PARTICLE: Final = (
    r"(?:(?:de|du|des|la|le|les|aux|au|sur|en|dei|degli|del|della|delle|di|da|las|los|el)[ ]+"
    rf"|[ldLD][{_APOSTROPHES}])"
)
# English, after the house number's first digit: 1-4 capitalized (or ordinal) words, a
# street type, a direction, a unit.
_EN_STREET: Final = (
    rf"\d{{0,4}}[A-Za-z]?(?:[\-/]\d{{1,5}}[A-Za-z]?)?,?[ ]+(?:(?:[A-Z][A-Za-z{_APOSTROPHES}\-]*"
    r"[a-z]|\d{1,3}(?:st|nd|rd|th)|[NSEW]\.?)[ ]+){1,4}"
    + _either_case(
        "street avenue road boulevard lane drive court place square terrace way close crescent "
        "parkway highway circle trail mews gardens grove st. ave. rd. blvd. ln. dr. ct. pl. sq. "
        "pkwy. hwy. st ave rd blvd ln dr ct pl sq pkwy hwy"
    )
    + r"(?![\w\-])(?:[ ]+(?:N|S|E|W|NE|NW|SE|SW)(?![\w]))?(?:,?[ ]+(?:Apt|Apartment|Suite|Ste|"
    r"Unit|Flat|Floor|Fl)\.?[ ]*#?[ ]*[A-Za-z0-9]{1,5}(?![\w])|[ ]*#[ ]?\d{1,5}[A-Z]?(?![\w]))?"
)
# What may follow an English street line: punctuation, a capitalized word or a number (city,
# postcode), or a small word; "3 Supreme Court cases" is no address.
_EN_FOLLOWER: Final = re.compile(
    r"[ ]+(?!(?:in|near|at|and|or|since|until|for|from|to|on|with|by|after|before|then|today|"
    r"tomorrow|yesterday|now|please|instead|too|as|is|was|are|has|have|will|which|where|if|but|"
    r"so|when)\b)[a-z]"
)
# French, after the first digit: 12 rue de la Paix, 5 bis avenue Victor Hugo.
_FR_STREET: Final = (
    r"\d{0,3}(?:[ ]?(?:bis|ter|quater|[A-D])(?![\w]))?,?[ ]+"
    + _either_case(
        "rue avenue av. boulevard bd place chemin allée impasse quai route faubourg rond-point"
    )
    + rf"(?:[ ]+{_PARTICLE}*{_NAME}){{1,4}}"
)
# German, after the first capital: compound (Hauptstraße 5, Alte Poststr. 3), hyphenated
# (Karl-Marx-Allee 12) or adjective + type (Berliner Straße 7), then the house number.
_DE_SUFFIX: Final = r"(?:straße|strasse|str\.|weg|allee|platz|gasse|damm|ufer|chaussee|steig|pfad)"
_DE_TYPE: Final = r"(?:Straße|Strasse|Str\.|Weg|Allee|Platz|Gasse|Ring|Damm|Ufer|Chaussee)"
_ADJECTIVE: Final = r"[a-zäöüß]*(?:e|er|es|en)[ ]"
_DE_STREET: Final = (
    rf"(?:{_ADJECTIVE}[A-ZÄÖÜ][a-zäöüß]{{2,}}{_DE_SUFFIX}|[a-zäöüß]{{2,}}{_DE_SUFFIX}|"
    rf"[a-zäöüß]+-(?:[A-ZÄÖÜ][a-zäöüß]+-)*{_DE_TYPE}|{_ADJECTIVE}{_DE_TYPE})"
    r"[ ]?\d{1,3}[ ]?[a-zA-Z]?(?:[ ]?[\-/][ ]?\d{1,3}[a-zA-Z]?)?(?![\w])"
)
# An article or pronoun is no street name ("Die Straße 5 Minuten"); the street itself, if
# any ("Die Hauptstraße 5"), is a hit of its own at the next capital.
_ARTICLES: Final = frozenset((
    "Der", "Die", "Das", "Den", "Dem", "Des", "Ein", "Eine", "Keine", "Meine", "Unsere", "Jede",
    "Diese", "Ihre", "Seine",
))  # fmt: skip
_UK_POSTCODE: Final = r"[A-HK-Y]?\d[A-HJKPSTUW\d]?[ ]?\d[ABD-HJLNP-UW-Z]{2}(?![\w])"
_CITY: Final = r"[A-ZÄÖÜÉÈ][a-zäöüßéèêëàâçîïôû]+"
# A number followed by a currency is an amount ("1500 Euro"), never a postcode and city.
_CURRENCY: Final = r"(?:Euros?|EUR|Dollars?|USD|Franken|CHF|Pfund|Pounds?|Livres?|Yen)(?![\w])"
# 10115 Berlin, 75008 Paris, 8001 Zürich, 1010 Wien, 60311 Frankfurt am Main.
_POSTCODE_CITY: Final = (
    rf"\d{{3,4}}[ ]+(?!{_CURRENCY}){_CITY}(?:(?:[ \-](?:am|an|der|im|bei|sur|sous|en|le|la|les"
    rf"|de|lès))*[ \-]{_CITY}){{0,2}}(?![\w])"
)
_HOUSE_NUMBER: Final = r"(?<=[0-9])(?<![\w\-.,/][0-9])"
# A number labelled as a chapter, room, page... is not a house number.
_OTHER_NUMBER: Final = re.compile(
    r"(?i)\b(?:chapter|chap\.|section|sec\.|page|p\.|pp\.|room|episode|ep\.|part|volume|vol\.|"
    r"step|level|season|track|figure|fig\.|table|kapitel|seite|raum|zimmer|chapitre|salle)\s*$"
)


def _house_number_ok(text: str, start: int, end: int) -> bool:
    return _OTHER_NUMBER.search(text, max(0, start - 12), start) is None


def _english_ok(text: str, start: int, end: int) -> bool:
    return not _EN_FOLLOWER.match(text, end) and _house_number_ok(text, start, end)


def _german_ok(text: str, start: int, end: int) -> bool:
    return text[start:end].split(" ", 1)[0] not in _ARTICLES


# Address parts come out of the shared passes as "street" or "postcode" and are merged.
_ADDRESS_NUMBER_RULES: Final = (
    Rule("en", "street", _HOUSE_NUMBER, _EN_STREET, check=_english_ok, rank="ADDRESS"),
    Rule("fr", "street", _HOUSE_NUMBER, _FR_STREET, check=_house_number_ok, rank="ADDRESS"),
    Rule("postcode", "postcode", r"(?<=[0-9])", _POSTCODE_CITY, rank="ADDRESS"),
)
_ADDRESS_CAPITAL_RULES: Final = (
    Rule("uk", "street", r"(?<=[A-PR-UWYZ])", _UK_POSTCODE, rank="ADDRESS"),
    Rule("de", "street", r"(?<![\-][A-ZÄÖÜ])", _DE_STREET, check=_german_ok, rank="ADDRESS"),
)
_ADDRESS_PARTS: Final = frozenset(("street", "postcode"))
# Type first, number after: Via Roma 12, Calle Mayor 5, Avenue Louise 54 (Belgium).
_TYPE_FIRST: Final = (
    r"(?:Via|Viale|Piazza|Piazzale|Corso|Largo|Calle|Avenida|Plaza|Paseo|Carrer|Rua|Rue|Avenue|"
    rf"Boulevard|Chemin|Quai)(?:[ ]+{_PARTICLE}*{_NAME}){{1,4}},?[ ]+(?:n\.?[ ]?º?[ ]?)?\d{{1,4}}"
    r"[a-zA-Z]?(?![\w])"
)
_PO_BOX: Final = r"(?:P\.?[ ]?O\.?[ ]?Box|Postfach|Boîte postale)[ ]+\d{1,6}(?![\w])"
# ", IL 62704", anchored on the comma; the city before it is found afterwards.
_US_STATE_ZIP: Final = (
    r",[ ]?(?:A[LKZR]|C[AOT]|D[EC]|FL|GA|HI|I[DLNA]|K[SY]|LA|M[EDAINSOT]|N[EVHJMYCD]|O[HKR]|PA|"
    r"RI|S[CD]|T[NX]|UT|V[TA]|W[AVIY])[ ]+\d{5}(?:-\d{4})?(?![\w])"
)
_US_CITY: Final = re.compile(r"(?<![\w])[A-Z][a-z]+(?:[ ][A-Z][a-z]+){0,2}$")
_COUNTRY_PREFIX: Final = re.compile(r"(?<![\w])[A-Z]{1,2}-$")  # D-10115, CH-8001
_ALONE_ON_LINE: Final = re.compile(r"[ \t]*(?:,[ \t]*[A-Z][\w ]{2,30})?[ \t]*(?:\n|$)")
# Between the parts of one address: a comma or a line break, and at most a city name.
_ADDRESS_GAP: Final = re.compile(r"[ \t]*(?:[,\n][ \t]*)?(?:[A-Z][a-zäöüé]+,?[ \t]+)?")


class _Addresses:
    """Street lines and the postcode, city or unit lines around them, merged into one span.

    A postcode + city is an address when it follows a street, carries a country prefix
    (D-10115) or stands alone on its line; "In 2024 Berlin hosted..." is none of these.
    """

    def __init__(self) -> None:
        self._type_first, self._po_box = re.compile(_TYPE_FIRST), re.compile(_PO_BOX)
        self._state_zip = re.compile(_US_STATE_ZIP)

    def __call__(self, text: str, hits: list[Candidate]) -> Iterator[Candidate]:
        parts = [
            _postcode(text, start, end) if kind == "postcode" else (start, end, True)
            for _, start, end, kind in hits
        ]
        for pattern in (self._type_first, self._po_box):
            parts += [
                (*m.span(), True)
                for m in pattern.finditer(text)
                if not word_before(text, m.start())
            ]
        for m in self._state_zip.finditer(text):
            if city := _US_CITY.search(text, max(0, m.start() - 40), m.start()):
                parts.append((city.start(), m.end(), True))
        for start, end in _merge(text, sorted(parts)):
            yield PRIORITY["ADDRESS"], start, end, "ADDRESS"


def _postcode(text: str, start: int, end: int) -> tuple[int, int, bool]:
    if prefix := _COUNTRY_PREFIX.search(text, max(0, start - 3), start):
        return prefix.start(), end, True
    line_start = text.rfind("\n", 0, start) + 1
    alone = not text[line_start:start].strip() and _ALONE_ON_LINE.match(text, end)
    return start, end, bool(alone)


def _merge(text: str, parts: list[tuple[int, int, bool]]) -> Iterator[Span]:
    """Touching or nearby parts become one address, kept if one of them is anchored."""
    group: list[int] = []  # start, end, anchored (0/1)
    for start, end, anchored in parts:
        if group and (start <= group[1] or _ADDRESS_GAP.fullmatch(text, group[1], start)):
            group[1], group[2] = max(group[1], end), group[2] | anchored
            continue
        if group and group[2]:
            yield group[0], group[1]
        group = [start, end, int(anchored)]
    if group and group[2]:
        yield group[0], group[1]


# --- dates of birth and obfuscated e-mail ----------------------------------------------------

_MONTHS: Final = (
    "january february march april may june july august september october november december "
    "jan feb mar apr jun jul aug sep sept oct nov dec januar jänner februar märz maerz juni "
    "juli oktober dezember janvier février fevrier mars avril mai juin juillet août aout "
    "septembre octobre novembre décembre decembre"
)
_MONTH_NAMES: Final = frozenset(_MONTHS.split())
# A date after a birth cue, in any common format; only the date is replaced, so "born on
# [DOB]" still reads. Dates start with a digit or a capitalized month, so they are rules of
# the shared passes, kept when a cue and filler words ("is the", ": ") come right before.
_DIGIT_DATE: Final = (  # after the first digit
    r"\d{3}-\d{1,2}-\d{1,2}(?!\d)|\d{3}/\d{1,2}/\d{1,2}(?!\d)|\d?[./\-]\d{1,2}[./\-](?:\d{4}|\d{2})"
    r"(?!\d)|\d?(?:st|nd|rd|th|er|\.)?[ ]+(?:of[ ]+)?"
    + _either_case(_MONTHS)
    + r"\.?(?:,?[ ]+\d{4}(?!\d)|(?![\w]))|(?:(?<=1)9|(?<=2)0)\d\d(?!\d)"
)
_MONTH_DATE: Final = r"[a-zä]{2,8}\.?[ ]+\d{1,2}(?:st|nd|rd|th)?(?:,?[ ]+\d{4}(?!\d)|(?![\w]))"
_BIRTH_CUE: Final = re.compile(
    r"(?i)\b(?:born|date of birth|birth ?date|birthday|year of birth|d\.?o\.?b\.?|geboren(?: am)?"
    r"|geb\.|geburtsdatum|geburtstag|geburtsjahr|jahrgang|n[ée]e?(?:\(e\))? (?:le|en)|date de "
    r"naissance|fecha de nacimiento|nacid[oa] el|data di nascita|nat[oa] il)(?![\w])(?:[ \t:=,"
    r"\-\u2013\"']|\([^()\n]{0,20}\)|\b(?:is|was|on|the|am|le|el|il|in|of)\b)*+$"
)
_AFTER_BIRTH_CUE: Final = cue_before(
    _BIRTH_CUE,
    r"born|birth|dob|d\.o\.b|geb|jahrgang|n[ée]|naissance|nacimiento|nacid|nascita|nat",
    64,
)


def _birth_date_ok(text: str, start: int, end: int) -> bool:
    return _AFTER_BIRTH_CUE(text, start)


def _month_date_ok(text: str, start: int, end: int) -> bool:
    month = text[start:end].split(" ", 1)[0].rstrip(".").lower()
    return month in _MONTH_NAMES and _AFTER_BIRTH_CUE(text, start)


STRICT_NUMBER_RULES: Final = (
    *_ADDRESS_NUMBER_RULES,
    Rule("dob", "DOB", r"(?<=[0-9])", _DIGIT_DATE, check=_birth_date_ok),
)
STRICT_CAPITAL_RULES: Final = (
    *_ADDRESS_CAPITAL_RULES,
    Rule("dob_month", "DOB", "", _MONTH_DATE, check=_month_date_ok),
)
_TLD: Final = r"(?:com|org|net|edu|gov|io|de|fr|ch|at|uk|co|eu|it|es|nl|be|info|me|us|ca|dev)"
# jane [at] example [dot] com, jane(at)example.com, jane at example dot com.
_OBFUSCATED_EMAIL: Final = (
    r"[\w.+\-](?<![\w.+\-][\w.+\-])[\w.+\-]{0,63}(?:[ ]?[\[({<][ ]?at[ ]?[\])}>][ ]?(?:[\w\-]"
    r"{1,63}(?:[ ]?[\[({<][ ]?dot[ ]?[\])}>][ ]?|[ ]dot[ ]|\.))+|[ ](?:at|AT)[ ](?:[\w\-]{1,63}"
    rf"[ ](?:dot|DOT)[ ])+){_TLD}(?![\w])"
)
_OBFUSCATION_CUES: Final = ("[at", "(at", "{at", "<at", "[ at", "( at", " dot ")


# --- the redactor ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RedactionResult:
    text: str  # with typed placeholders
    findings: tuple[Finding, ...]  # spans in the original text, in order
    counts: dict[str, int] = field(default_factory=dict)  # category -> how many replaced


class Redactor:
    """Finds and replaces personal data at one level. Build one per level and share it: it
    holds compiled patterns only, no state between calls."""

    def __init__(self, level: Level) -> None:
        if level not in LEVELS:
            raise ValueError(
                f"PRIVACY_REDACT_AGGRESSIVENESS is {level!r}; use one of: {', '.join(LEVELS)}"
            )
        self.level: Final = level
        self._detectors: tuple[Detector, ...] = ()
        self._addresses: _Addresses | None = None
        if level == "standard":
            self._detectors = standard_detectors()
        elif level == "strict":
            self._detectors = (
                *standard_detectors(STRICT_NUMBER_RULES, STRICT_CAPITAL_RULES),
                Detector(
                    typed("EMAIL", "EMAIL", matches(_OBFUSCATED_EMAIL)), _OBFUSCATION_CUES, True
                ),
            )
            self._addresses = _Addresses()

    def find(self, text: str) -> list[Finding]:
        """Every finding in `text`, overlaps resolved, in order of position."""
        folded = text.lower() if self._detectors else text
        candidates: list[Candidate] = []
        parts: list[Candidate] = []
        for detector in self._detectors:
            haystack = folded if detector.folded else text
            if detector.needles and not any(n in haystack for n in detector.needles):
                continue
            for candidate in detector.scan(text):
                if candidate[1] < candidate[2]:
                    (parts if candidate[3] in _ADDRESS_PARTS else candidates).append(candidate)
        if self._addresses is not None:
            candidates += self._addresses(text, parts)
        return _resolve(candidates)

    def redact(self, text: str) -> RedactionResult:
        findings = self.find(text)
        pieces: list[str] = []
        counts: dict[str, int] = {}
        position = 0
        for finding in findings:
            pieces += (text[position : finding.start], f"[{finding.category}]")
            position = finding.end
            counts[finding.category] = counts.get(finding.category, 0) + 1
        pieces.append(text[position:])
        return RedactionResult("".join(pieces), tuple(findings), counts)


# Short texts redact in well under a millisecond; longer ones go to a thread so a
# 100 KB body (tens of milliseconds, more on hostile input) never stalls the event loop.
INLINE_REDACT_CHARS: Final = 4096


async def redact_off_loop(redactor: Redactor, text: str) -> RedactionResult:
    """`redactor.redact(text)`, in a thread when the text is long."""
    if len(text) <= INLINE_REDACT_CHARS:
        return redactor.redact(text)
    return await trio.to_thread.run_sync(redactor.redact, text)


def _resolve(candidates: list[Candidate]) -> list[Finding]:
    """Non-overlapping findings: higher priority first, then longer, then earlier (and the
    category's name last, so that equal candidates always resolve the same way)."""
    candidates.sort(key=lambda c: (-c[0], c[1] - c[2], c[1], c[3]))
    starts: list[int] = []
    ends: list[int] = []
    kept: list[Finding] = []
    for _, start, end, category in candidates:
        index = bisect_right(starts, start)
        if (index and ends[index - 1] > start) or (index < len(starts) and starts[index] < end):
            continue
        starts.insert(index, start)
        ends.insert(index, end)
        kept.insert(index, Finding(category, start, end))
    return kept
