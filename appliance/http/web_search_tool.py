"""The built-in `web_search` tool: a function that clients list in `tools`, run by the server.

A client that lists `{"type": "function", "function": {"name": "web_search"}}` in a
`/v1/chat/completions` request gets the server's definition of it (one `query` string)
and a search run by the appliance: when the model calls it, the appliance searches
(redacted, under the key's allow-list entry and search budget), adds the call and its
numbered results to the conversation as a tool turn, and asks the model again; the client
gets that second answer (a reply, or calls of its own tools). The first answer's other
calls are dropped with it: the model makes them again, the results in view. One round of
searches per request, at most MAX_SEARCHES of them. Listing the tool while SEARCH_ENABLED
is off, or with a key not on APPLIANCE_SEARCH_ALLOW, is a 403 naming the setting.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Final

import msgspec

from appliance.http.app import Runtime, current_key
from appliance.http.errors import ApiError
from appliance.http.generation import Events
from appliance.http.openai_plan import ChatPlan
from appliance.http.openai_wire import (
    ChatCompletionRequest,
    FunctionCall,
    FunctionDefinition,
    NamedToolChoice,
    OpenAIMessage,
    Tool,
    ToolCall,
)
from appliance.http.search import searcher, tool_search
from appliance.llm.protocol import Done, Token
from appliance.llm.tools import read_answer

WEB_SEARCH: Final = "web_search"
MAX_SEARCHES: Final = 3
DESCRIPTION: Final = (
    "Search the web (run by the server). Returns numbered results (title, URL, snippet) "
    "to answer from and cite as [1], [2]..."
)
PARAMETERS: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "description": "what to search for, in a few words"}
    },
    "required": ["query"],
}

PlanOf = Callable[[ChatCompletionRequest], ChatPlan]
EventsOf = Callable[[ChatCompletionRequest, ChatPlan], Awaitable[Events]]


def lists_web_search(body: ChatCompletionRequest) -> bool:
    return any(tool.function.name == WEB_SEARCH for tool in body.tools or [])


def server_definition(body: ChatCompletionRequest) -> ChatCompletionRequest:
    """The request with the server's own definition of `web_search` in its tools."""
    ours = Tool("function", FunctionDefinition(WEB_SEARCH, DESCRIPTION, PARAMETERS))
    tools = [ours if t.function.name == WEB_SEARCH else t for t in body.tools or []]
    return msgspec.structs.replace(body, tools=tools)


async def web_search_round(
    state: Runtime,
    body: ChatCompletionRequest,
    plan_of: PlanOf,
    events_of: EventsOf,
) -> tuple[ChatPlan, Events] | None:
    """The plan and events to answer with when the request lists `web_search`, else None.
    The first answer is generated whole; without a call of the tool it is replayed as it
    came, otherwise the searches run and the model is asked again."""
    if not lists_web_search(body):
        return None
    key = current_key()
    searcher(state, key, "tools")  # 403 before any generation
    body = server_definition(body)
    plan = plan_of(body)
    if not plan.tools:  # tool_choice "none": the model cannot call it
        return plan, await events_of(body, plan)
    first = msgspec.structs.replace(body, stream=False, stream_options=None)
    tokens, done = await _generated(await events_of(first, plan))
    answer = read_answer("".join(t.text for t in tokens), json_reply=plan.json_reply)
    searches = [(name, arguments) for name, arguments in answer.calls if name == WEB_SEARCH]
    if not searches:
        return plan, Events(_replay(tokens, done), state.settings.request_timeout)
    calls: list[ToolCall] = []
    results: list[OpenAIMessage] = []
    for _, arguments in searches[:MAX_SEARCHES]:
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        calls.append(ToolCall(call_id, "function", FunctionCall(WEB_SEARCH, arguments)))
        query = _query_of(arguments)
        text = (
            await tool_search(state, key, query)
            if query
            else "The search was not run: its arguments need a non-empty query string."
        )
        results.append(OpenAIMessage(role="tool", content=text, tool_call_id=call_id))
    second = _after_searches(body, OpenAIMessage(role="assistant", tool_calls=calls), results)
    plan = plan_of(second)
    return plan, await events_of(second, plan)


def _after_searches(
    body: ChatCompletionRequest, called: OpenAIMessage, results: list[OpenAIMessage]
) -> ChatCompletionRequest:
    """The request again, with the searches and their results as the last turns and
    without the tool (one round of searches per request)."""
    tools = [t for t in body.tools or [] if t.function.name != WEB_SEARCH] or None
    choice = body.tool_choice
    named = isinstance(choice, NamedToolChoice) and choice.function.name == WEB_SEARCH
    if tools is None or named:
        choice = None
    return msgspec.structs.replace(
        body,
        messages=[*body.messages, called, *results],
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls if tools else None,
    )


def _query_of(arguments: str) -> str:
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return ""
    query = parsed.get("query") if isinstance(parsed, dict) else None
    return query.strip() if isinstance(query, str) else ""


async def _generated(events: Events) -> tuple[list[Token], Done]:
    tokens: list[Token] = []
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, Token):
                tokens.append(event)
            else:
                return tokens, event
    raise ApiError(503, "worker_crashed", "model worker crashed; retry")


async def _replay(tokens: list[Token], done: Done) -> AsyncGenerator[Token | Done, None]:
    """An answer generated already (and charged), as the events of a generation."""
    for token in tokens:
        yield token
    yield done
