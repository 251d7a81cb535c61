"""The standard detectors by exact span: what is redacted, to the character, and what is not.

The corpus tests judge recall and false positives with a tolerance; these pin single cases,
so that one more miss or one more false positive fails a test: IBANs ending where their
country's length says, IPv6 plausibility and loopback rules and the scan back to an
address's start, e-mail local parts, and credentials in URLs.
"""

from __future__ import annotations

import pytest

from appliance.privacy.detectors import email_scan, iban_scan, ipv6_ok, ipv6_scan
from appliance.privacy.redaction import Redactor

STANDARD = Redactor("standard")


def spans(scan_factory: object, text: str) -> list[str]:
    assert callable(scan_factory)
    return [text[start:end] for start, end in scan_factory()(text)]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("Pay to DE89 3704 0044 0532 0130 00 today", ["DE89 3704 0044 0532 0130 00"]),
        ("DE89370400440532013000 is mine", ["DE89370400440532013000"]),
        (
            "DE89370400440532013000 GB82WEST12345698765432",
            ["DE89370400440532013000", "GB82WEST12345698765432"],
        ),
        (
            "GB82 WEST 1234 5698 7654 32 and DE89370400440532013000",
            ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000"],
        ),
        ("de89 3704 0044 0532 0130 00", ["de89 3704 0044 0532 0130 00"]),
        ("DE89-3704-0044-0532-0130-00.", ["DE89-3704-0044-0532-0130-00"]),
        ("DE89370400440532013000X", []),  # longer than a German IBAN
        ("DE89370400440532013000X more", []),
        ("XDE89370400440532013000", []),  # inside a word
        ("ZZ89370400440532013000", []),  # no such country
        ("DE88370400440532013000", []),  # wrong check digits
        ("DE8937040044053201300", []),  # one character short
    ],
)
def test_ibans(text: str, found: list[str]) -> None:
    assert spans(iban_scan, text) == found


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("server at 2001:db8::1 responded", ["2001:db8::1"]),
        ("fe80::1", ["fe80::1"]),
        ("ab:cd::ef", ["ab:cd::ef"]),
        ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", ["2001:0db8:85a3:0000:0000:8a2e:0370:7334"]),
        ("[2001:db8::7]:80", ["2001:db8::7"]),
        ("fe80::1%eth0", ["fe80::1"]),
        ("fe80::1 and fe80::2", ["fe80::1", "fe80::2"]),
        # Where the scan back from the first colon pair finds the address's start.
        ("::82cb is up", ["::82cb"]),
        ("id: ::2025", ["::2025"]),
        ("x:6b1b:: y", ["6b1b::"]),
        ("b2::3155::bf", ["3155::bf"]),
        ("host 2:c4e9:8::c:45c", ["2:c4e9:8::c:45c"]),
        (":001b::4f:9", ["001b::4f:9"]),
        ("::1", []),  # loopback
        ("::", []),  # unspecified
        ("1::2", []),  # a slice in code
        ("ab::cd", []),
        ("1:2:3", []),
        ("12345:db8::1", []),  # the run starts inside a longer word
        ("x2001:db8::1", []),
        ("2001:db8::1:", []),
    ],
)
def test_ipv6_addresses(text: str, found: list[str]) -> None:
    assert spans(ipv6_scan, text) == found


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("fe80::1", True),  # a full group
        ("abcd::1", True),
        ("a:b::c", True),  # three groups
        ("2001:db8:0:0:0:0:0:2", True),
        ("abc::1", False),  # two short groups: code, not an address
        ("::2", False),
        ("::1", False),
        ("0:0:0:0:0:0:0:1", False),  # loopback written out
        ("0:0:0:0:0:0:0:0", False),
        ("::", False),
        ("1:2:3", False),  # not an address at all
        ("g::1", False),
    ],
)
def test_ipv6_plausibility(value: str, ok: bool) -> None:
    assert ipv6_ok(value) is ok


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("mail bob.smith@example.co.uk now", ["bob.smith@example.co.uk"]),
        ("first.last+tag@sub.example.org.", ["first.last+tag@sub.example.org"]),
        ("a" * 64 + "@example.com", ["a" * 64 + "@example.com"]),
        ("a" * 65 + "@example.com", []),  # a local part has 64 characters at most
        ("x@y@example.com", ["y@example.com"]),
        ("to: ann@example.com, bob@example.org", ["ann@example.com", "bob@example.org"]),
        ("@team: ann@example.com", ["ann@example.com"]),  # an '@' at the very start
        ("ssh://git@github.com/x", []),
        ("git@github.com:org/repo.git", []),
        ("@example.com", []),
        ("me@localhost", []),
    ],
)
def test_email_addresses(text: str, found: list[str]) -> None:
    assert spans(email_scan, text) == found


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("https://user:pa55@example.com/x", ["user:pa55"]),
        ("ftp://a:b@h", ["a:b"]),
        ("see https://:secret@example.com", [":secret"]),
        ("abcdefghijklmnop://u:p@host", ["u:p"]),  # a scheme of 16 characters
        ("abcdefghijklmnopq://u:p@host", []),  # 17 is not a scheme
        ("x://u:p@host", []),  # nor is 1
        ("ssh://git@host/x", []),  # a user without a password
    ],
)
def test_credentials_in_urls(text: str, found: list[str]) -> None:
    assert [
        text[f.start : f.end] for f in STANDARD.find(text) if f.category == "URL_CREDENTIALS"
    ] == found


def test_each_standard_detector_names_its_category() -> None:
    text = (
        "IBAN DE89370400440532013000, host fe80::1, mail ann@example.com, https://u:pw@example.com"
    )
    found = [(f.category, text[f.start : f.end]) for f in STANDARD.find(text)]
    assert found == [
        ("IBAN", "DE89370400440532013000"),
        ("IP", "fe80::1"),
        ("EMAIL", "ann@example.com"),
        ("URL_CREDENTIALS", "u:pw"),
    ]


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        # The cue words are found in any case.
        ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123", "abcdefghijklmnopqrstuvwxyz0123"),
        ("authorization: bearer abcdefghijklmnopqrstuvwxyz0123", "abcdefghijklmnopqrstuvwxyz0123"),
        ("PASSWORD=hunter2xyz!", "hunter2xyz!"),
        ("password=hunter2xyz!", "hunter2xyz!"),
    ],
)
def test_cued_secrets_in_any_case(text: str, secret: str) -> None:
    assert [(f.category, text[f.start : f.end]) for f in STANDARD.find(text)] == [
        ("SECRET", secret)
    ]
