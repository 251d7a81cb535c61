"""`search: "auto"` on chat/send with a local model: the model decides through the
`web_search` tool.

The model first sees the conversation with one tool, `web_search`, in the generic tool
format (appliance.llm.tools), under its grammar: it either calls the tool or replies. A
call means "search for the user's latest message": the query is still that message,
redacted (never words the model chose from the conversation), and the answer is then
generated with the results as context. A reply is the answer: it is given as it came,
without a second generation. The remote model has no tool calling here; for it, and for
any model when this is not used, `auto` decides by `world_question`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Final

from appliance.http.context import Runtime
from appliance.http.generation import Events, collect, generate
from appliance.llm.grammar import schema_to_grammar
from appliance.llm.protocol import ChatMessage, Done, Sampling, SamplingOptions, Token
from appliance.llm.tools import Function, Turn, answer_schema, instructions, read_answer, render

WEB_SEARCH: Final = "web_search"
_TOOL: Final = Function(
    WEB_SEARCH,
    "Search the web for the user's latest message (run by the server). Call it when the "
    "answer needs facts about the world: current events, figures, people, places, or "
    "anything you may not know for sure. Reply directly to greetings, tasks on given text "
    "and questions about this conversation.",
    {"type": "object", "properties": {}},
)
_GRAMMAR: Final = schema_to_grammar(answer_schema([_TOOL], "auto", parallel=False))
_INSTRUCTIONS: Final = instructions([_TOOL], "auto", parallel=False)
CALLED: Final = "the model called web_search"


async def model_decides(
    state: Runtime,
    model: str,
    messages: list[ChatMessage],
    *,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
) -> Events | None:
    """None when the model called `web_search`; otherwise its reply, as the events of a
    generation (already generated and charged) to answer with."""
    turns = [Turn(message.role, message.content) for message in messages]
    events = await generate(
        state,
        model,
        messages=render(turns, _INSTRUCTIONS),
        sampling=Sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            options=SamplingOptions(grammar=_GRAMMAR, close_json=True),
        ),
    )
    text, done = await collect(events)
    answer = read_answer(text, json_reply=False)
    if any(name == WEB_SEARCH for name, _ in answer.calls):
        return None
    return Events(_replay(answer.content or "", done), state.settings.request_timeout)


async def _replay(reply: str, done: Done) -> AsyncGenerator[Token | Done, None]:
    if reply:
        yield Token(done.id, reply)
    yield done
