"""Secret detection: private keys (PEM), self-identifying tokens (issuer prefixes, JWTs),
Authorization headers, values after a password/token/key name, and random-looking tokens
told apart from identifiers by entropy and structure."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Final

from appliance.privacy.scanning import PRIORITY, Candidate, Span, SpanScan, cued, word_before

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


def auth_header_scan() -> SpanScan:
    """Bearer and Basic credentials whose value mixes 2+ character classes."""
    return cued(AUTH_HEADER, ("bearer", "basic"), lambda t, s, e: _classes(t[s:e]) >= 2, "value")
