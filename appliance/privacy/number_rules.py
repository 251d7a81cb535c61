"""The rules of the two shared passes (`Family`): one over values that start with a digit,
'+' or '(' (cards, phones, US SSN, French NIR, Spanish DNI, IPv4, ids after an id's name),
one over values that start with a capital (UK NINO, Italian codice fiscale, Spanish NIE).
Each rule's check vets a hit: its checksum, its digit count, or the label before it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Final

from appliance.privacy.checksums import codice_fiscale_ok, dni_ok, luhn_ok, nir_ok
from appliance.privacy.scanning import Check, Rule, Span, cue_before

# --- cards ---------------------------------------------------------------------------------

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
