"""The web search client: one provider, its connection, its limits, its log lines.

`WebSearch` is a supervised service (name "search", not critical) that owns one
`httpx.AsyncClient` for as long as it runs; creating the client opens no connection, so
nothing leaves the box until `search` is called, and then only to APPLIANCE_SEARCH_URL's
host: no proxy from the environment, no redirect followed, no result URL fetched. A
search is bounded by APPLIANCE_SEARCH_TIMEOUT as a whole (504) and its answer by
MAX_RESPONSE_BYTES while it is read (502, the rest unread). Every search is logged with
the provider, a keyed hash of the query and the result count; never the query itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import httpx
import trio

from appliance.outbound import HttpClientService, loopback
from appliance.search.config import SearchConfig
from appliance.search.errors import (
    SearchError,
    malformed,
    status_error,
    timeout_error,
    too_large,
    transport_error,
)
from appliance.search.provider import Provider, Unreadable
from appliance.search.providers import provider_for
from appliance.search.results import Source, sources_from

LOGGER = logging.getLogger("appliance.search")

# A page of search results is tens of kilobytes; a provider answering more is refused.
MAX_RESPONSE_BYTES: Final = 1024 * 1024
CLOSE_SECONDS: Final = 2.0

HashText = Callable[[str], str]


class WebSearch(HttpClientService):
    """Searches through the configured provider. Run it as a service (`await
    nursery.start(search.run)` returns it once ready) or use it as an async context
    manager. `hash_text` is the keyed hash that logs show instead of a query."""

    name = "search"
    critical = False

    def __init__(self, config: SearchConfig, hash_text: HashText) -> None:
        self.config: Final = config
        self.provider: Final[Provider] = provider_for(config)
        self._hash = hash_text
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> WebSearch:
        if self._client is not None:
            raise RuntimeError("this WebSearch is already open")
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.config.timeout),
            trust_env=False,
            follow_redirects=False,
            # Plain bytes, so that the size limit counts what is really read.
            headers={"Accept-Encoding": "identity"},
        )
        if self.config.url.startswith("http://") and not loopback(self.config.host):
            LOGGER.warning(
                "APPLIANCE_SEARCH_URL uses plain http to %s: the (redacted) queries cross the "
                "network unencrypted",
                self.config.host,
            )
        return self

    def query_hash(self, query: str) -> str:
        return self._hash(query)

    async def search(self, query: str, count: int | None = None) -> list[Source]:
        """Up to `count` (default APPLIANCE_SEARCH_RESULTS) cleaned, numbered results for
        an already redacted query; SearchError naming the provider otherwise."""
        count = count or self.config.results
        began = trio.current_time()
        name = self.provider.name
        try:
            with trio.move_on_after(self.config.timeout):
                sources = await self._search(query, count)
                LOGGER.info(
                    "search via %s: query hash %s, %d results in %.1f ms",
                    name,
                    self._hash(query),
                    len(sources),
                    (trio.current_time() - began) * 1000,
                )
                return sources
            raise timeout_error(name, self.config.timeout)
        except SearchError as error:
            LOGGER.warning(
                "search via %s failed: %d %s; query hash %s, after %.1f ms",
                name,
                error.status,
                error.code,
                self._hash(query),
                (trio.current_time() - began) * 1000,
            )
            raise

    async def _search(self, query: str, count: int) -> list[Source]:
        client = self._client
        name = self.provider.name
        if client is None:
            raise SearchError(
                503,
                "search_unavailable",
                "the search client is not running (service 'search' is starting or "
                "restarting); retry shortly",
            )
        url, params, headers = self.provider.request(query, count)
        request = client.build_request("GET", url, params=params, headers=headers)
        try:
            response = await client.send(request, stream=True)
        except httpx.TimeoutException:
            raise timeout_error(name, self.config.timeout) from None
        except httpx.HTTPError as exc:
            raise transport_error(name, exc, self.config.host) from None
        try:
            if not response.is_success:
                raise status_error(
                    name, response.status_code, self.provider.refusal_hint(response.status_code)
                )
            body = await self._read(response)
        finally:
            with trio.move_on_after(CLOSE_SECONDS) as scope:
                scope.shield = True
                await response.aclose()
        try:
            triples = self.provider.results(body)
        except Unreadable as exc:
            raise malformed(name, str(exc)) from None
        return sources_from(triples, count)

    async def _read(self, response: httpx.Response) -> bytes:
        """The body, refused as soon as it passes MAX_RESPONSE_BYTES (the rest unread)."""
        name = self.provider.name
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
            raise too_large(name, MAX_RESPONSE_BYTES)
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise too_large(name, MAX_RESPONSE_BYTES)
        except httpx.TimeoutException:
            raise timeout_error(name, self.config.timeout) from None
        except httpx.HTTPError as exc:
            raise transport_error(name, exc, self.config.host) from None
        return bytes(body)
