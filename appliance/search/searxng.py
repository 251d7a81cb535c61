"""SearXNG's JSON API: `GET <APPLIANCE_SEARCH_URL>/search?q=...&format=json`.

A self-hosted metasearch engine (e.g. on the LAN) that needs no key. Its answer holds
`results`, each with `url`, `title` and `content` (the snippet), best first; other fields
(answers, infoboxes, suggestions) are not used. An instance answers 403 to `format=json`
until `json` is listed under `search.formats` in its settings.yml.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from appliance import __version__
from appliance.search.provider import Provider, ProviderRequest, Triple, Unreadable

SEARCH_PATH: Final = "/search"


class _Result(msgspec.Struct):
    url: Any = None
    title: Any = None
    content: Any = None


class _Answer(msgspec.Struct):
    results: list[_Result]


_DECODER: Final = msgspec.json.Decoder(_Answer)


class SearxngProvider(Provider):
    name = "searxng"

    def request(self, query: str, count: int) -> ProviderRequest:
        # SearXNG has no result count parameter: it answers one page (about 20).
        base = self.config.url.rstrip("/")
        url = base if base.endswith(SEARCH_PATH) else base + SEARCH_PATH
        return ProviderRequest(
            url,
            {"q": query, "format": "json", "pageno": "1", "safesearch": "1"},
            {"Accept": "application/json", "User-Agent": f"appliance/{__version__}"},
        )

    def results(self, body: bytes) -> list[Triple]:
        try:
            answer = _DECODER.decode(body)
        except (msgspec.DecodeError, RecursionError):
            raise Unreadable("a body that is not SearXNG's JSON (no list of results)") from None
        return [(r.title, r.url, r.content) for r in answer.results]

    def refusal_hint(self, status: int) -> str:
        if status == 403:
            return (
                "SearXNG refuses format=json unless its settings.yml lists json under "
                "search.formats; add it and restart SearXNG"
            )
        return ""
