"""The search settings as plain values (`SearchConfig`), checked before the daemon starts.

A leaf: `appliance.startup_checks` calls it before the daemon starts, and it imports
nothing of the appliance. Every error names the setting and what to do, and none
shows the API key.
"""

from __future__ import annotations

import math
from typing import Final, Literal
from urllib.parse import urlsplit

import msgspec

from appliance.outbound import loopback

Provider = Literal["searxng", "brave"]
PROVIDERS: Final[tuple[Provider, ...]] = ("searxng", "brave")
# Scopes an allow-list entry may name; any other entry is `key:<key name or id>`.
SCOPE_ENTRIES: Final = frozenset({"admin", "user"})
KEY_PREFIX: Final = "key:"
MAX_URL_CHARS: Final = 2048
MAX_API_KEY_CHARS: Final = 512
# What each provider's URL looks like, for the errors that ask for one.
URL_EXAMPLES: Final[dict[str, str]] = {
    "searxng": "http://searxng.lan:8080 (the instance's base URL)",
    "brave": "https://api.search.brave.com/res/v1/web/search",
}


class SearchConfigError(ValueError):
    """The search settings are unusable; one line for the operator."""


class SearchConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how to search. `api_key` is shown by `repr` as its length only."""

    provider: Provider
    url: str
    api_key: str = ""
    results: int = 5
    timeout: float = 5.0
    query_chars: int = 200
    budget_daily: int = 0
    allow: tuple[str, ...] = ("admin", "user")

    def __post_init__(self) -> None:
        check_url(self.url, self.provider)
        if self.provider == "brave" and not self.api_key:
            raise SearchConfigError(
                "APPLIANCE_SEARCH_PROVIDER=brave needs APPLIANCE_SEARCH_API_KEY (the key of "
                "your Brave Search API subscription)"
            )
        if self.provider == "searxng" and self.api_key:
            raise SearchConfigError(
                "APPLIANCE_SEARCH_API_KEY is set, but APPLIANCE_SEARCH_PROVIDER=searxng takes "
                "no key; remove it (or set APPLIANCE_SEARCH_PROVIDER=brave)"
            )
        if self.api_key:
            check_key(self.api_key)
            plain = plaintext_problem(self.url)
            if plain:
                raise SearchConfigError(plain)
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise SearchConfigError(
                f"APPLIANCE_SEARCH_TIMEOUT is {self.timeout}; use seconds above 0 (default 5)"
            )

    def __repr__(self) -> str:
        return (
            f"SearchConfig(provider={self.provider!r}, url={self.url!r}, "
            f"api_key=<{len(self.api_key)} characters>, results={self.results!r}, "
            f"timeout={self.timeout!r}, query_chars={self.query_chars!r}, "
            f"budget_daily={self.budget_daily!r}, allow={self.allow!r})"
        )

    @property
    def host(self) -> str:
        """The one host that searches contact."""
        return urlsplit(self.url).hostname or ""


def check_url(url: str, provider: str) -> None:
    name = "APPLIANCE_SEARCH_URL"
    example = URL_EXAMPLES.get(provider, URL_EXAMPLES["searxng"])
    if not url:
        raise SearchConfigError(
            f"SEARCH_ENABLED=true needs {name}: where the {provider} search provider answers, "
            f"e.g. {example}"
        )
    try:
        parts = urlsplit(url)
        _ = parts.port  # a bad port raises ValueError
    except ValueError:
        parts = None
    if parts is not None and "@" in parts.netloc:
        # Shown without the URL: it holds a password.
        raise SearchConfigError(
            f"{name} holds a user name or password; remove it (a search provider's key goes "
            "into APPLIANCE_SEARCH_API_KEY)"
        )
    if (
        parts is None
        or len(url) > MAX_URL_CHARS
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or not url.isprintable()
    ):
        raise SearchConfigError(
            f"{name} is {url[:200]!r}; use an http:// or https:// URL such as {example}"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise SearchConfigError(
            f"{name} must not carry a query or fragment (?... or #...): the appliance adds the "
            "query itself"
        )


def check_key(key: str) -> None:
    if len(key) > MAX_API_KEY_CHARS or not all("!" <= c <= "~" for c in key):
        raise SearchConfigError(
            "APPLIANCE_SEARCH_API_KEY holds spaces, control or non-ASCII characters or is over "
            f"{MAX_API_KEY_CHARS} characters; it must hold only the key"
        )


def plaintext_problem(url: str) -> str | None:
    """Why an API key may not go to `url`: plain http:// to another machine shows it to the
    network. None when nothing is wrong."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or loopback(host):
        return None
    return (
        f"APPLIANCE_SEARCH_URL is plain http:// to {host[:100]!r}, and the search API key "
        "would cross the network readable; use https://"
    )


def parse_allow(raw: str) -> tuple[str, ...]:
    """The allow-list: scopes (`admin`, `user`) and `key:<name or id>` entries, comma-separated.
    An unknown entry is an error, never ignored."""
    entries: list[str] = []
    for item in raw.split(","):
        entry = item.strip()
        if not entry:
            continue
        key_entry = entry.startswith(KEY_PREFIX) and _key_name(entry[len(KEY_PREFIX) :])
        if not (entry in SCOPE_ENTRIES or key_entry):
            raise SearchConfigError(
                f"APPLIANCE_SEARCH_ALLOW has {entry[:70]!r}; use the scopes admin and user, "
                "or key:<key name or id>, comma-separated (e.g. admin, key:kiosk)"
            )
        entries.append(entry)
    return tuple(entries)


def _key_name(text: str) -> bool:
    return 0 < len(text) <= 64 and all(c.isascii() and (c.isalnum() or c in "._-") for c in text)
