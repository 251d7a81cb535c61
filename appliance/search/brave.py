"""The Brave Search API: `GET <APPLIANCE_SEARCH_URL>?q=...&count=N` with the key in
`X-Subscription-Token` (APPLIANCE_SEARCH_API_KEY), e.g.
https://api.search.brave.com/res/v1/web/search.

The key goes in that header of requests to APPLIANCE_SEARCH_URL only: redirects are not
followed and no result is ever fetched, so it reaches no other host. Its answer holds
`web.results`, each with `title`, `url` and `description` (the snippet, with <strong>
markup that the result cleaning removes).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from appliance import __version__
from appliance.search.provider import Provider, ProviderRequest, Triple, Unreadable

# The most results the API gives for one request.
MAX_COUNT: Final = 20


class _Result(msgspec.Struct):
    url: Any = None
    title: Any = None
    description: Any = None


class _Web(msgspec.Struct):
    results: list[_Result] = []


class _Answer(msgspec.Struct):
    # An answer without web results (nothing found) has no `web` object.
    web: _Web = msgspec.field(default_factory=_Web)


_DECODER: Final = msgspec.json.Decoder(_Answer)


class BraveProvider(Provider):
    name = "brave"

    def request(self, query: str, count: int) -> ProviderRequest:
        return ProviderRequest(
            self.config.url,
            {"q": query, "count": str(min(count, MAX_COUNT)), "safesearch": "moderate"},
            {
                "Accept": "application/json",
                "User-Agent": f"appliance/{__version__}",
                "X-Subscription-Token": self.config.api_key,
            },
        )

    def results(self, body: bytes) -> list[Triple]:
        try:
            answer = _DECODER.decode(body)
        except (msgspec.DecodeError, RecursionError):
            raise Unreadable("a body that is not Brave's search JSON") from None
        return [(r.title, r.url, r.description) for r in answer.web.results]

    def refusal_hint(self, status: int) -> str:
        if status in (401, 403):
            return "Brave refused the key; check APPLIANCE_SEARCH_API_KEY"
        return ""
