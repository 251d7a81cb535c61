"""Typed redaction: personal data becomes `[EMAIL]`, `[PHONE]`, `[CARD]`... before content is
stored and before anything is logged (`PRIVACY_REDACT_AGGRESSIVENESS`).

- `standard`: e-mail addresses, phone numbers, payment cards (Luhn and issuer range), IBANs
  (registry length and mod 97), IP addresses, national ids (US SSN, UK NI number, French NIR,
  Spanish DNI/NIE, Italian codice fiscale, and id-shaped values after an id's name),
  credentials in URLs, and secrets: issuer-prefixed keys, JWTs, PEM private keys, values
  of password/token/api-key fields, Authorization headers and random-looking tokens.
- `strict` adds postal addresses (`[ADDRESS]`: house number + street in English, German,
  French, Italian and Spanish forms, US city-state-ZIP, UK postcodes, postcode + city lines,
  P.O. boxes), dates of birth (`[DOB]`: a date after "born", "DOB", "geboren am", "né le"...)
  and obfuscated e-mail addresses ("jane at example dot com").
- `off` returns the text unchanged.

Decisions on look-alikes: a dotted quad is an IP unless a version or section word comes
right before it ("version 1.2.3.4"); loopback, 0.0.0.0 and broadcast are left alone. Plain
dates are kept (only a birth cue makes one personal). Hex-only strings, so 40-character git
hashes, are not secrets. A number labelled as an order, invoice, customer or tracking
number is not a phone or SSN. Placeholders never match a detector, so redaction is
idempotent.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

from appliance.privacy.detectors import (
    PRIORITY,
    Detector,
    Finding,
    Span,
    cued,
    matches,
    standard_detectors,
    word_before,
)

__all__ = ["LEVELS", "Finding", "Level", "RedactionResult", "Redactor"]

Level = Literal["off", "standard", "strict"]
LEVELS: Final[tuple[Level, ...]] = ("off", "standard", "strict")

# --- postal addresses --------------------------------------------------------------------

_NAME: Final = r"[A-ZÄÖÜÉÈÀÂÎÔÁÍÓÚ][\w'’\-]*"
_PARTICLE: Final = (
    r"(?:(?:de|du|des|la|le|les|aux|au|sur|en|dei|degli|del|della|delle|di|da|las|los|el)[ ]+"
    r"|[ldLD]['’])"
)
# English: house number, 1-4 capitalized (or ordinal) words, a street type, a unit.
_EN_STREET: Final = (
    r"\d(?<![\w\-.,/]\d)\d{0,4}[A-Za-z]?(?:[\-/]\d{1,5}[A-Za-z]?)?,?[ ]+(?:(?:[A-Z][A-Za-z'’\-]*"
    r"[a-z]|\d{1,3}(?:st|nd|rd|th)|[NSEW]\.?)[ ]+){1,4}(?i:street|avenue|road|boulevard|lane|"
    r"drive|court|place|square|terrace|way|close|crescent|parkway|highway|circle|trail|mews|"
    r"gardens|grove|(?:st|ave|rd|blvd|ln|dr|ct|pl|sq|pkwy|hwy)\.?)(?![\w\-])(?:[ ]+(?:N|S|E|W|"
    r"NE|NW|SE|SW)(?![\w]))?(?:,?[ ]+(?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|Fl)\.?[ ]*#?"
    r"[ ]*[A-Za-z0-9]{1,5}(?![\w])|[ ]*#[ ]?\d{1,5}[A-Z]?(?![\w]))?"
)
# What may follow an English street line: punctuation, a capitalized word or a number (city,
# postcode), or a small word; "3 Supreme Court cases" is no address.
_EN_FOLLOWER: Final = re.compile(
    r"[ ]+(?!(?:in|near|at|and|or|since|until|for|from|to|on|with|by|after|before|then|today|"
    r"tomorrow|yesterday|now|please|instead|too|as|is|was|are|has|have|will|which|where|if|but|"
    r"so|when)\b)[a-z]"
)
# German: compound (Hauptstraße 5, Alte Poststr. 3), hyphenated (Karl-Marx-Allee 12) or
# adjective + type (Berliner Straße 7). The first capital is consumed before the branches.
_DE_SUFFIX: Final = r"(?:straße|strasse|str\.|weg|allee|platz|gasse|damm|ufer|chaussee|steig|pfad)"
_DE_TYPE: Final = r"(?:Straße|Strasse|Str\.|Weg|Allee|Platz|Gasse|Ring|Damm|Ufer|Chaussee)"
_ADJECTIVE: Final = r"[a-zäöüß]*(?:e|er|es|en)[ ]"
_DE_STREET: Final = (
    r"[A-ZÄÖÜ](?<![\w\-][A-ZÄÖÜ])(?:"
    + _ADJECTIVE
    + r"[A-ZÄÖÜ][a-zäöüß]{2,}"
    + _DE_SUFFIX
    + r"|[a-zäöüß]{2,}"
    + _DE_SUFFIX
    + r"|[a-zäöüß]+-(?:[A-ZÄÖÜ][a-zäöüß]+-)*"
    + _DE_TYPE
    + r"|"
    + _ADJECTIVE
    + _DE_TYPE
    + r")[ ]?\d{1,3}[ ]?[a-zA-Z]?(?:[ ]?[\-/][ ]?\d{1,3}[a-zA-Z]?)?(?![\w])"
)
# An article or pronoun is no street name: "Die Straße 5 Minuten", "Meine Hauptstraße 5".
_ARTICLES: Final = frozenset(
    ["Der", "Die", "Das", "Den", "Dem", "Des", "Ein", "Eine", "Keine", "Meine", "Unsere", "Jede", "Diese", "Ihre", "Seine"]
)
_DE_CUES: Final = (
    "straße",
    "strasse",
    "str.",
    "weg",
    "allee",
    "platz",
    "gasse",
    "ring",
    "damm",
    "ufer",
    "chaussee",
    "steig",
    "pfad",
)
# French: 12 rue de la Paix, 5 bis avenue Victor Hugo.
_FR_STREET: Final = (
    r"\d(?<![\w\-.,/]\d)\d{0,3}(?:[ ]?(?:bis|ter|quater|[A-D])(?![\w]))?,?[ ]+(?i:rue|avenue|"
    r"av\.|boulevard|bd|place|chemin|allée|impasse|quai|route|faubourg|rond-point)(?:[ ]+"
    + _PARTICLE
    + r"*"
    + _NAME
    + r"){1,4}"
)
_FR_CUES: Final = (
    "rue",
    "av",
    "bd",
    "boulevard",
    "place",
    "chemin",
    "allée",
    "impasse",
    "quai",
    "route",
    "faubourg",
    "rond-point",
)
# Type first, number after: Via Roma 12, Calle Mayor 5, Avenue Louise 54 (Belgium).
_TYPE_FIRST: Final = (
    r"(?:Via|Viale|Piazza|Piazzale|Corso|Largo|Calle|Avenida|Plaza|Paseo|Carrer|Rua|Rue|Avenue|"
    r"Boulevard|Chemin|Quai)(?:[ ]+" + _PARTICLE + r"*" + _NAME + r"){1,4},?[ ]+(?:n\.?[ ]?º?"
    r"[ ]?)?\d{1,4}[a-zA-Z]?(?![\w])"
)
# ", IL 62704" with the city before it: anchored on the comma.
_US_STATE_ZIP: Final = (
    r",[ ]?(?:A[LKZR]|C[AOT]|D[EC]|FL|GA|HI|I[DLNA]|K[SY]|LA|M[EDAINSOT]|N[EVHJMYCD]|O[HKR]|PA|"
    r"RI|S[CD]|T[NX]|UT|V[TA]|W[AVIY])[ ]+\d{5}(?:-\d{4})?(?![\w])"
)
_US_CITY: Final = re.compile(r"(?<![\w])[A-Z][a-z]+(?:[ ][A-Z][a-z]+){0,2}$")
_UK_POSTCODE: Final = (
    r"[A-PR-UWYZ](?<![\w][A-Z])[A-HK-Y]?\d[A-HJKPSTUW\d]?[ ]?\d[ABD-HJLNP-UW-Z]{2}(?![\w])"
)
_PO_BOX: Final = r"(?:P\.?[ ]?O\.?[ ]?Box|Postfach|Boîte postale)[ ]+\d{1,6}(?![\w])"
_CITY: Final = r"[A-ZÄÖÜÉÈ][a-zäöüßéèêëàâçîïôû]+"
# A number followed by a currency is an amount ("1500 Euro"), never a postcode and city.
_CURRENCY: Final = r"(?:Euros?|EUR|Dollars?|USD|Franken|CHF|Pfund|Pounds?|Livres?|Yen)(?![\w])"
# 10115 Berlin, D-10115 Berlin, 75008 Paris, 8001 Zürich, 1010 Wien, Frankfurt am Main.
_POSTCODE_CITY: Final = (
    r"\d(?<![\w]\d)\d{3,4}[ ]+(?!" + _CURRENCY + r")" + _CITY + r"(?:(?:[ \-](?:am|an|der|im|"
    r"bei|sur|sous|en|le|la|les|de|lès))*[ \-]" + _CITY + r"){0,2}(?![\w])"
)
_COUNTRY_PREFIX: Final = re.compile(r"(?<![\w])[A-Z]{1,2}-$")
_ALONE_ON_LINE: Final = re.compile(r"[ \t]*(?:,[ \t]*[A-Z][\w ]{2,30})?[ \t]*(?:\n|$)")
# Between the parts of one address: a comma or a line break, and at most a city name.
_ADDRESS_GAP: Final = re.compile(r"[ \t]*(?:[,\n][ \t]*)?(?:[A-Z][a-zäöüé]+,?[ \t]+)?")


class _AddressScan:
    """Street lines and the postcode, city or unit lines around them, merged into one span.

    A postcode + city is an address when it follows a street, carries a country prefix
    (D-10115) or stands alone on its line; "In 2024 Berlin hosted..." is none of these.
    """

    def __init__(self) -> None:
        compile_ = re.compile
        self._english, self._french = compile_(_EN_STREET), compile_(_FR_STREET)
        self._german, self._type_first = compile_(_DE_STREET), compile_(_TYPE_FIRST)
        self._state_zip, self._uk = compile_(_US_STATE_ZIP), compile_(_UK_POSTCODE)
        self._po_box, self._postcode = compile_(_PO_BOX), compile_(_POSTCODE_CITY)

    def __call__(self, text: str) -> Iterator[Span]:
        folded = text.lower()
        parts = [(*m.span(), True) for m in self._uk.finditer(text)]
        parts += [
            (*m.span(), True)
            for m in self._english.finditer(text)
            if not _EN_FOLLOWER.match(text, m.end())
        ]
        if any(cue in folded for cue in _FR_CUES):
            parts += [(*m.span(), True) for m in self._french.finditer(text)]
        if any(cue in folded for cue in _DE_CUES):
            parts += [(*span, True) for span in self._german_streets(text)]
        parts += [
            (*m.span(), True)
            for m in self._type_first.finditer(text)
            if not word_before(text, m.start())
        ]
        parts += [
            (*m.span(), True)
            for m in self._po_box.finditer(text)
            if not word_before(text, m.start())
        ]
        for m in self._state_zip.finditer(text):
            if city := _US_CITY.search(text, max(0, m.start() - 40), m.start()):
                parts.append((city.start(), m.end(), True))
        parts += self._postcode_lines(text)
        yield from _merge(text, sorted(parts))

    def _german_streets(self, text: str) -> Iterator[Span]:
        for match in self._german.finditer(text):
            first = match.group().split(" ", 1)[0]
            if first in _ARTICLES:  # the street may still start at the next word
                match = self._german.match(text, match.start() + len(first) + 1)
            if match is not None:
                yield match.span()

    def _postcode_lines(self, text: str) -> list[tuple[int, int, bool]]:
        parts = []
        for m in self._postcode.finditer(text):
            start = m.start()
            if prefix := _COUNTRY_PREFIX.search(text, max(0, start - 3), start):
                parts.append((prefix.start(), m.end(), True))
                continue
            line_start = text.rfind("\n", 0, start) + 1
            alone = not text[line_start:start].strip() and _ALONE_ON_LINE.match(text, m.end())
            parts.append((start, m.end(), bool(alone)))
        return parts


def _merge(text: str, parts: list[tuple[int, int, bool]]) -> Iterator[Span]:
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


# --- dates of birth and obfuscated e-mail --------------------------------------------------

_MONTHS: Final = "|".join(
    sorted(
        ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october", "november", "december", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "januar", "jänner", "februar", "märz", "maerz", "juni", "juli", "oktober", "dezember", "janvier", "février", "fevrier", "mars", "avril", "mai", "juin", "juillet", "août", "aout", "septembre", "octobre", "novembre", "décembre", "decembre"],
        key=len,
        reverse=True,
    )
)
_DATE: Final = (
    r"\d{4}-\d{1,2}-\d{1,2}(?!\d)|\d{4}/\d{1,2}/\d{1,2}(?!\d)|\d{1,2}[./\-]\d{1,2}[./\-]"
    r"(?:\d{4}|\d{2})(?!\d)|\d{1,2}(?:st|nd|rd|th|er|\.)?[ ]+(?:of[ ]+)?(?:" + _MONTHS + r")\.?,?"
    r"[ ]+\d{4}(?!\d)|(?:" + _MONTHS + r")\.?[ ]+\d{1,2}(?:st|nd|rd|th)?,?[ ]+\d{4}(?!\d)|"
    r"\d{1,2}(?:st|nd|rd|th|er|\.)?[ ]+(?:of[ ]+)?(?:"
    + _MONTHS
    + r")(?![\w])|(?:"
    + _MONTHS
    + r")[ ]+\d{1,2}(?:st|nd|rd|th)?(?![\w])|(?:19|20)\d{2}(?!\d)"
)
# A birth cue, filler ("is the", ": ", "(dd/mm/yyyy)"), then any common date format; only the
# date is replaced, so "born on [DOB]" still reads.
_DOB: Final = (
    r"(?i)\b(?:born|date of birth|birth ?date|birthday|year of birth|d\.?o\.?b\.?|geboren(?: am)?"
    r"|geb\.|geburtsdatum|geburtstag|geburtsjahr|jahrgang|n[ée]e?(?:\(e\))? (?:le|en)|date de "
    r"naissance|fecha de nacimiento|nacid[oa] el|data di nascita|nat[oa] il)(?![\w])(?:[ \t:=,"
    r"\-–\"']|\([^()\n]{0,20}\)|\b(?:is|was|on|the|am|le|el|il|in|of)\b)*+(?P<date>" + _DATE + r")"
)
_DOB_CUES: Final = (
    "born",
    "birth",
    "dob",
    "d.o.b",
    "geb",
    "jahrgang",
    "né",
    "ne le",
    "nee",
    "née",
    "naissance",
    "nacimiento",
    "nacid",
    "nascita",
    "nato",
    "nata",
)
_TLD: Final = r"(?:com|org|net|edu|gov|io|de|fr|ch|at|uk|co|eu|it|es|nl|be|info|me|us|ca|dev)"
# jane [at] example [dot] com, jane(at)example.com, jane at example dot com.
_OBFUSCATED_EMAIL: Final = (
    r"[\w.+\-](?<![\w.+\-][\w.+\-])[\w.+\-]{0,63}(?:[ ]?[\[({<][ ]?at[ ]?[\])}>][ ]?(?:[\w\-]"
    r"{1,63}(?:[ ]?[\[({<][ ]?dot[ ]?[\])}>][ ]?|[ ]dot[ ]|\.))+|[ ](?:at|AT)[ ](?:[\w\-]{1,63}"
    r"[ ](?:dot|DOT)[ ])+)" + _TLD + r"(?![\w])"
)
_OBFUSCATION_CUES: Final = ("[at", "(at", "{at", "<at", "[ at", "( at", " dot ")


def strict_detectors() -> tuple[Detector, ...]:
    return (
        Detector("ADDRESS", PRIORITY["ADDRESS"], _AddressScan()),
        Detector(
            "DOB", PRIORITY["DOB"], cued(_DOB, _DOB_CUES, None, "date"), _DOB_CUES, folded=True
        ),
        Detector(
            "EMAIL", PRIORITY["EMAIL"], matches(_OBFUSCATED_EMAIL), _OBFUSCATION_CUES, folded=True
        ),
    )


# --- the redactor ------------------------------------------------------------------------


@dataclass(frozen=True)
class RedactionResult:
    text: str  # with typed placeholders
    findings: tuple[Finding, ...]  # spans in the original text, in order
    counts: dict[str, int] = field(default_factory=dict)  # category -> number replaced


class Redactor:
    """Finds and replaces personal data at one level; build once, share freely (stateless)."""

    def __init__(self, level: Level) -> None:
        if level not in LEVELS:
            raise ValueError(
                f"PRIVACY_REDACT_AGGRESSIVENESS is {level!r}; use one of: {', '.join(LEVELS)}"
            )
        self.level: Final = level
        detectors: tuple[Detector, ...] = ()
        if level != "off":
            detectors = standard_detectors()
        if level == "strict":
            detectors += strict_detectors()
        self._detectors = detectors

    def find(self, text: str) -> list[Finding]:
        """Every finding in `text`, overlaps resolved, in order of position."""
        folded = text.lower() if self._detectors else text
        candidates = [
            (detector.priority, start, end, detector.category)
            for detector in self._detectors
            if _wanted(detector, text, folded)
            for start, end in detector.scan(text)
            if start < end
        ]
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


def _wanted(detector: Detector, text: str, folded: str) -> bool:
    haystack = folded if detector.folded else text
    return not detector.needles or any(needle in haystack for needle in detector.needles)


def _resolve(candidates: list[tuple[int, int, int, str]]) -> list[Finding]:
    """Keep non-overlapping findings: higher priority first, then longer, then earlier."""
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
