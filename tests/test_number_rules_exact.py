"""The number rules (cards, phones, national ids, IPv4) by exact example at their boundaries:
each issuer range and card length, each digit count a phone may have, the never-issued SSN
parts, the IPv4 addresses that identify nobody, and how far back a label or cue is seen.
"""

from __future__ import annotations

import pytest

from appliance.privacy.number_rules import card_ok, card_spans
from appliance.privacy.redaction import Redactor

STANDARD = Redactor("standard")


def found(text: str) -> list[tuple[str, str]]:
    return [(f.category, text[f.start : f.end]) for f in STANDARD.find(text)]


def luhn(body: str) -> str:
    """`body` with its Luhn check digit appended."""
    total = 0
    for index, char in enumerate(reversed(body)):
        digit = int(char) * (2 if index % 2 == 0 else 1)
        total += digit - 9 if digit > 9 else digit
    return body + str(-total % 10)


def card(prefix: str, length: int) -> str:
    return luhn(prefix + "0" * (length - len(prefix) - 1))


# (prefix, length) of every issuer range's lowest and highest prefix and every length it has.
CARDS = [
    *((p, n) for p in ("4",) for n in (13, 16, 19)),
    *((p, 16) for p in ("51", "55", "2221", "2720")),
    ("34", 15),
    ("37", 15),
    *((p, n) for p in ("300", "305", "36", "38", "39") for n in (14, 16, 19)),
    *((p, n) for p in ("3528", "3589", "2200", "2204") for n in (16, 17, 18, 19)),
    *((p, n) for p in ("50", "56", "69") for n in range(13, 20)),
]


@pytest.mark.parametrize(("prefix", "length"), CARDS)
def test_every_issuer_range_and_length_is_a_card(prefix: str, length: int) -> None:
    assert card_ok(card(prefix, length))


@pytest.mark.parametrize(
    ("prefix", "length"),
    [
        ("4", 14),
        ("4", 15),
        ("51", 15),
        ("51", 17),
        ("34", 16),
        ("300", 15),
        ("3528", 15),
        ("50", 12),
        ("50", 20),
        ("69", 20),
        ("2220", 16),  # just below Mastercard's 2-series
        ("2721", 16),  # just above it
        ("306", 14),  # just above Diners' 300-305
        ("3527", 16),
        ("3590", 16),
        ("2205", 16),
        ("1", 16),
        ("70", 16),
    ],
)
def test_outside_the_ranges_or_lengths_is_not_a_card(prefix: str, length: int) -> None:
    assert not card_ok(card(prefix, length))


def test_a_card_needs_its_luhn_digit_and_ascii_digits() -> None:
    good = card("4", 16)
    assert not card_ok(good[:-1] + str((int(good[-1]) + 1) % 10))
    assert not card_ok("\u0664" + good[1:])  # an Arabic-Indic four


_DISCOVER_19 = card("6011", 19)
NINETEEN = " ".join(_DISCOVER_19[i : i + 4] for i in range(0, 19, 4))


@pytest.mark.parametrize(
    ("text", "cards"),
    [
        ("4111 1111 1111 1111", ["4111 1111 1111 1111"]),
        ("4111-1111-1111-1111", ["4111-1111-1111-1111"]),
        ("4111111111111111", ["4111111111111111"]),
        ("3782 822463 10005", ["3782 822463 10005"]),  # Amex 4-6-5
        ("3056 930902 5904", ["3056 930902 5904"]),  # Diners 4-6-4
        (NINETEEN, [NINETEEN]),  # 4-4-4-4-3
        ("4111 1111 1111 1111 123", ["4111 1111 1111 1111"]),  # a CVV after it stays out
        ("4111 1111-1111 1111", []),  # two kinds of separator
        ("4111 1111 1111-1111", []),
        ("12 4111 1111 1111 1111", ["4111 1111 1111 1111"]),  # a short group before it
        ("4000 0000 00006", []),  # a 13-digit Visa printed 4-4-5
        ("3528 0000 0000 00007", []),  # a 17-digit JCB printed 4-4-4-5
        ("3528 0000 0000 000 007", []),  # an 18-digit JCB printed 4-4-4-3-3
        ("41 11 11 11 11 11 11 11", []),  # not a printed card layout
        ("ean 4111 1111 1111 1111", []),
    ],
)
def test_cards_in_text(text: str, cards: list[str]) -> None:
    start = next(i for i, char in enumerate(text) if char.isdigit())
    assert [text[s:e] for s, e in card_spans(text, start, len(text))] == cards


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # International: 9 to 15 digits after +, 11 to 17 after 00 (with separators).
        ("x +49 30 12345 y", [("PHONE", "+49 30 12345")]),
        ("x +49 30 1234 y", []),
        ("x +49 30 12345678901 y", [("PHONE", "+49 30 12345678901")]),
        ("x +49 30 123456789012 y", []),
        ("x 0049 30 12 34 5 y", [("PHONE", "0049 30 12 34 5")]),
        ("x 0049 30 12 34 y", []),
        ("x 0049 30 12 34 567 890 1 y", [("PHONE", "0049 30 12 34 567 890 1")]),
        ("x 0049 30 12 34 567 890 12 y", []),
        ("x 0049301234567 y", []),  # 00 without separators is just a number
        # The trunk "(0)" once is not a digit of the number; a second one is.
        ("x +49 (0) 30 12345678901 y", [("PHONE", "+49 (0) 30 12345678901")]),
        ("x +49 (0) 30 (0) 1234567890 y", [("PHONE", "+49 (0) 30 (0) 1234567890")]),
        ("x +49 (0) 30 (0) 12345678901 y", []),
        # North American: 10 or 11 digits.
        ("x 415 555 2671 y", [("PHONE", "415 555 2671")]),
        ("x 1 415 555 2671 y", [("PHONE", "1 415 555 2671")]),
        ("x (415) 555-2671 y", [("PHONE", "(415) 555-2671")]),
        ("x 415 555 267 y", []),
        # Trunk prefix 0: 9 to 12 digits.
        ("x 030 12345 y", []),
        ("x 030 123456 y", [("PHONE", "030 123456")]),
        ("x 030 123456789 y", [("PHONE", "030 123456789")]),
        ("x 030 1234567890 y", []),
        # After a phone word: 7 to 15 digits.
        ("Tel: 1234567", [("PHONE", "1234567")]),
        ("Tel: 123456", []),
        ("Tel: 123456789012345", [("PHONE", "123456789012345")]),
        ("Tel: 1234567890123456", []),
    ],
)
def test_phone_numbers(text: str, expected: list[tuple[str, str]]) -> None:
    assert found(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x 123-45-6789 y", [("NATIONAL_ID", "123-45-6789")]),
        ("x 665-45-6789 y", [("NATIONAL_ID", "665-45-6789")]),
        ("x 899-45-6789 y", [("NATIONAL_ID", "899-45-6789")]),
        ("x 000-45-6789 y", []),  # never issued: area 000, 666, 9xx, group 00, serial 0000
        ("x 666-45-6789 y", []),
        ("x 900-45-6789 y", []),
        ("x 123-00-6789 y", []),
        ("x 123-45-0000 y", []),
        ("ssn: 12345", [("NATIONAL_ID", "12345")]),  # an id after its name: 5+ digits
        ("ssn: 1234", []),
        ("id card number: A12345", [("NATIONAL_ID", "A12345")]),
        ("id card number: A1234", []),
        ("AB123456C", [("NATIONAL_ID", "AB123456C")]),
        ("AB 12 34 56 C", [("NATIONAL_ID", "AB 12 34 56 C")]),
        *((f"{p}123456C", []) for p in ("BG", "GB", "NK", "KN", "TN", "NT", "ZZ")),
    ],
)
def test_national_ids(text: str, expected: list[tuple[str, str]]) -> None:
    assert found(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x 192.168.1.20 y", [("IP", "192.168.1.20")]),
        ("x 255.1.1.1 y", [("IP", "255.1.1.1")]),
        ("x 1.2.3.255 y", [("IP", "1.2.3.255")]),
        ("x 1.0.0.0 y", [("IP", "1.0.0.0")]),
        ("x 255.255.255.254 y", [("IP", "255.255.255.254")]),
        ("x 256.1.1.1 y", []),
        ("x 1.2.3.256 y", []),
        ("x 01.2.3.4 y", []),  # a leading zero: not how an address is written
        ("x 0.1.2.3 y", []),  # "any", loopback and broadcast identify nobody
        ("x 127.1.2.3 y", []),
        ("x 255.255.255.255 y", []),
        ("version 1.2.3.4", []),
        ("Chrome/120.0.0.0", []),
    ],
)
def test_ipv4_addresses(text: str, expected: list[tuple[str, str]]) -> None:
    assert found(text) == expected


@pytest.mark.parametrize(
    ("label", "value", "category"),
    [
        ("invoice", "+49 30 1234567", "PHONE"),
        ("order", "123-45-6789", "NATIONAL_ID"),
        ("ean", "4111 1111 1111 1111", "CARD"),
    ],
)
def test_a_label_is_seen_32_characters_back(label: str, value: str, category: str) -> None:
    near = label + " " * (32 - len(label)) + value  # the label ends 32 before the value
    far = label + " " * (33 - len(label)) + value
    assert found(near) == []
    assert found(far) == [(category, value)]


def test_a_version_cue_is_seen_24_characters_back() -> None:
    assert found("revision" + " " * 16 + "1.2.3.4") == []
    assert found("revision" + " " * 17 + "1.2.3.4") == [("IP", "1.2.3.4")]
