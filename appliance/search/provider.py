"""The search provider interface: how one service is asked, and how its answer is read.

A provider builds one GET request (URL, query parameters, headers) for a query and reads
the raw body of a 2xx answer into (title, url, snippet) triples; everything else (the
connection, the timeout, the size limit, untrusted-text cleaning, logging) is the same for
every provider and lives in `appliance.search.service`. A new provider is one module with
one such class, named in `appliance.search.providers`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

from appliance.search.config import SearchConfig

Triple = tuple[object, object, object]


class ProviderRequest(NamedTuple):
    url: str
    params: dict[str, str]
    headers: dict[str, str]


class Unreadable(ValueError):
    """A 2xx body that is not this provider's answer; the message says what it was."""


class Provider(ABC):
    """One search service. `name` is what errors and logs call it."""

    name: str = "provider"

    def __init__(self, config: SearchConfig) -> None:
        self.config = config

    @abstractmethod
    def request(self, query: str, count: int) -> ProviderRequest:
        """The GET request that asks for `count` results (a provider may give more)."""

    @abstractmethod
    def results(self, body: bytes) -> list[Triple]:
        """The (title, url, snippet) of each result, best first; Unreadable otherwise."""

    def refusal_hint(self, status: int) -> str:
        """What to do about a 401/403 of this provider ('' for the generic advice)."""
        return ""
