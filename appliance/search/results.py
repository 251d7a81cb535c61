"""Search results as untrusted text: what a provider answered, made safe to show and to
put into a prompt.

A result's title, URL and snippet come from the web through a provider: each is cut to a
size, stripped of control and formatting characters (bidirectional overrides, zero-width
characters) and of markup, and a URL that is not plain http(s) is dropped with its result.
Nothing here fetches a URL or follows a link: results are text, never instructions.
"""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Annotated, Final
from urllib.parse import urlsplit

import msgspec

MAX_TITLE_CHARS: Final = 200
MAX_SNIPPET_CHARS: Final = 400
MAX_URL_CHARS: Final = 2048
_TAG: Final = re.compile(r"<[^<>]{0,200}>")


class Source(msgspec.Struct, frozen=True):
    """A numbered search result: the context the answer was given, as `[number]`."""

    number: Annotated[int, msgspec.Meta(ge=1, description="the result's number in the prompt")]
    title: str
    url: str
    snippet: str


def clean_text(text: object, limit: int) -> str:
    """One line of untrusted text: entities decoded, tags and control or formatting
    characters removed, whitespace collapsed, at most `limit` characters."""
    if not isinstance(text, str):
        return ""
    # Bounded before any work: a provider may send megabytes in one field.
    text = html.unescape(text[: limit * 8])
    text = _TAG.sub("", text)
    kept = "".join(
        " " if character.isspace() else character
        for character in text
        if character.isspace() or unicodedata.category(character)[0] != "C"
    )
    text = " ".join(kept.split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def clean_url(url: object) -> str | None:
    """An http(s) URL with a host, printable and of bounded length; None otherwise (the
    result is then left out: a source must say where it came from)."""
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS or not url.isprintable():
        return None
    if any(c.isspace() for c in url):
        return None
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return url


def sources_from(raw: list[tuple[object, object, object]], count: int) -> list[Source]:
    """At most `count` numbered sources from (title, url, snippet) triples, in order,
    leaving out those without a usable URL and repeats of a URL."""
    sources: list[Source] = []
    seen: set[str] = set()
    for title, url, snippet in raw:
        if len(sources) >= count:
            break
        clean = clean_url(url)
        if clean is None or clean in seen:
            continue
        seen.add(clean)
        sources.append(
            Source(
                number=len(sources) + 1,
                title=clean_text(title, MAX_TITLE_CHARS) or clean,
                url=clean,
                snippet=clean_text(snippet, MAX_SNIPPET_CHARS),
            )
        )
    return sources
