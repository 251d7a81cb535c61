"""What a search sends out, and when `auto` searches without a model to decide.

The query is the user's one message, already redacted by the caller at
PRIVACY_REDACT_AGGRESSIVENESS: redaction's placeholders (`[EMAIL]`, `[CARD]`...) mean
nothing to a search engine and are dropped, whitespace is collapsed, and the text is cut
to APPLIANCE_SEARCH_QUERY_CHARS at a word boundary. Nothing else (no history, no system
prompt) goes into it.
"""

from __future__ import annotations

import re
from typing import Final

_PLACEHOLDER: Final = re.compile(r"\[[A-Z][A-Z_]{1,30}\]")
# Questions about the world start like this (in English; other languages end with "?").
_QUESTION_START: Final = re.compile(
    r"^(who|whom|whose|what|when|where|which|why|how|is|are|was|were|will|does|do|did|can|"
    r"could|has|have|should)\b",
    re.IGNORECASE,
)
_LOOKUP_CUE: Final = re.compile(
    r"\b(latest|news|today|tonight|yesterday|tomorrow|this (week|month|year)|current(ly)?|"
    r"recent(ly)?|prices?|weather|forecast|scores?|released?|"
    r"look (it |this |that )?up|search (the web )?for|according to)\b",
    re.IGNORECASE,
)
# Asks about the conversation or the given text, or to write, not about the world.
_NOT_THE_WORLD: Final = re.compile(
    r"\b(you|your|yourself|me|my|i|we|our|this|these|above|previous|following|"
    r"rewrite|summari[sz]e|translate|fix|write|draft|explain (this|the following)|"
    r"code|function|poem|story)\b",
    re.IGNORECASE,
)
# Long messages are documents or tasks, not questions for a search engine.
MAX_QUESTION_CHARS: Final = 400


def search_query(redacted: str, limit: int) -> str:
    """The query for an already redacted message: placeholders out, one line, at most
    `limit` characters (cut at a word boundary when there is one)."""
    text = " ".join(_PLACEHOLDER.sub(" ", redacted).split())
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return cut[:space] if space > limit // 2 else cut


def world_question(message: str) -> str | None:
    """Why `message` looks like a question about the world (so `auto` searches), or None.
    A heuristic for models without tool calling: a short question, or a request to look
    something current up, that is not about the conversation or a text to work on."""
    text = " ".join(message.split())
    if not text or len(text) > MAX_QUESTION_CHARS or "```" in message:
        return None
    lookup = _LOOKUP_CUE.search(text)
    question = text.endswith("?") or _QUESTION_START.match(text) is not None
    if not (question or lookup):
        return None
    personal = _NOT_THE_WORLD.search(text)
    if personal and not lookup:
        return None
    if lookup:
        return f"the message asks about something current ({lookup.group(0).lower()!r})"
    return "the message is a short question that is not about this conversation"
