"""Web search for a request: who may search, what is sent, what it costs, what comes back.

`search_for_chat` serves `POST /api/v1/chat/send`'s `search` field; `tool_search` runs the
built-in `web_search` tool for a key and returns the tool message's text. Both refuse with
403 when SEARCH_ENABLED is off (nothing is contacted) or the key is not on
APPLIANCE_SEARCH_ALLOW, count the search against SEARCH_BUDGET_DAILY (429), and send only
the one redacted message, cut to APPLIANCE_SEARCH_QUERY_CHARS.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Final, Literal

import msgspec

from appliance.auth.apikeys import ApiKey
from appliance.auth.budgets import SearchBudgetExceeded
from appliance.http.app import Runtime
from appliance.http.errors import ApiError
from appliance.http.privacy import redact_off_loop
from appliance.search.config import KEY_PREFIX
from appliance.search.context import NOTHING_FOUND, numbered
from appliance.search.errors import SearchError
from appliance.search.query import search_query, world_question
from appliance.search.results import Source
from appliance.search.service import WebSearch

SearchMode = Annotated[
    Literal["off", "auto", "always"],
    msgspec.Meta(
        description="`always` searches the web for the message and answers from the "
        "results; `auto` lets a local model decide (it may call web_search) and, for the "
        "remote model, searches when the message looks like a question about the world; "
        "`auto` answers without sources if the search fails; 403 while SEARCH_ENABLED=false"
    ),
]
SEARCH_PARAM: Final = "search"


class SearchReport(msgspec.Struct, omit_defaults=True):
    """What the search of this answer did (present unless `search` was off)."""

    mode: Literal["auto", "always"]
    searched: bool
    provider: str | None = None
    results: int = 0
    # Why `auto` searched or not, or why the answer has no sources.
    note: str | None = None


class ChatSearch(msgspec.Struct):
    """The sources for the prompt and the report for the response."""

    sources: list[Source]
    report: SearchReport


def searcher(state: Runtime, key: ApiKey, param: str = SEARCH_PARAM) -> WebSearch:
    """The search client for `key`: 403 naming the setting when search is off or the key
    may not search."""
    search = state.search
    if search is None:
        raise ApiError(
            403,
            "search_disabled",
            "web search is off on this appliance (SEARCH_ENABLED=false): nothing is sent "
            "anywhere; ask without search, or have the operator turn it on",
            param=param,
        )
    allowed = search.config.allow
    if key.scope not in allowed and not {KEY_PREFIX + key.name, KEY_PREFIX + key.id} & set(allowed):
        raise ApiError(
            403,
            "search_not_allowed",
            f"API key {key.name!r} may not search the web; the operator allows it in "
            "APPLIANCE_SEARCH_ALLOW (scopes or key:<name>)",
            param=param,
        )
    return search


async def _query(state: Runtime, search: WebSearch, message: str) -> str:
    redacted = await redact_off_loop(state.redactor, message)
    return search_query(redacted.text, search.config.query_chars)


async def _count(state: Runtime, search: WebSearch, key: ApiKey) -> None:
    try:
        await state.budgets.count_search(key.id, search.config.budget_daily or None)
    except SearchBudgetExceeded as exc:
        wait = max(1, int((exc.resets - datetime.datetime.now(datetime.UTC)).total_seconds()))
        raise ApiError(
            429, "search_budget_exhausted", str(exc), headers={"Retry-After": str(wait)}
        ) from None


def _as_api_error(error: SearchError) -> ApiError:
    return ApiError(error.status, error.code, error.message, param=SEARCH_PARAM)


async def search_for_chat(
    state: Runtime,
    key: ApiKey,
    message: str,
    mode: Literal["auto", "always"],
    reason: str | None = None,
) -> ChatSearch:
    """The search a chat message asks for. `always` fails with the provider's 502/504;
    `auto` answers without sources then, and says why in the report. `reason` is why
    `auto` searches when the model decided it; without one, `world_question` decides."""
    search = searcher(state, key)
    name = search.provider.name
    if mode == "auto" and reason is None:
        reason = world_question(message)
        if reason is None:
            return ChatSearch(
                [],
                SearchReport(
                    mode,
                    False,
                    note="not searched: the message does not look like a question about the world",
                ),
            )
    query = await _query(state, search, message)
    if not query:
        if mode == "always":
            raise ApiError(
                422,
                "search_query_empty",
                "nothing of the message is left to search for once personal data is "
                "redacted; ask with words a search engine can use",
                param="message",
            )
        return ChatSearch(
            [],
            SearchReport(mode, False, note="not searched: nothing is left once redacted"),
        )
    await _count(state, search, key)
    try:
        sources = await search.search(query)
    except SearchError as error:
        if mode == "always":
            raise _as_api_error(error) from None
        return ChatSearch(
            [],
            SearchReport(
                mode,
                False,
                provider=name,
                note=f"answered without sources: {error.message}",
            ),
        )
    note = f"searched: {reason}" if reason else None
    return ChatSearch(sources, SearchReport(mode, True, name, len(sources), note))


async def tool_search(state: Runtime, key: ApiKey, query: str, param: str = "tools") -> str:
    """The text of a `web_search` tool message: numbered results for `query` (redacted and
    cut like a chat message), or what went wrong. 403/429 are raised (the request cannot
    search at all); a failing provider is told to the model in the tool message, so that
    it can answer without results."""
    search = searcher(state, key, param)
    sent = await _query(state, search, query)
    if not sent:
        return "The search was not run: nothing is left of the query once redacted."
    await _count(state, search, key)
    try:
        sources = await search.search(sent)
    except SearchError as error:
        return f"The web search failed: {error.message}. Answer without it and say so."
    return numbered(sources) if sources else NOTHING_FOUND
