"""Check digits of the numbers the redactor validates: Luhn (cards), ISO 13616 mod 97
(IBANs, with the registry length of each country), the French NIR key, the Spanish DNI/NIE
letter and the Italian codice fiscale letter. Pure functions of the compact value."""

from __future__ import annotations

from types import MappingProxyType
from typing import Final


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
