"""Tool calls for every model: a generic JSON format, constrained by a grammar.

As llama.cpp's server does for chat templates without tool support, the model is told the
tools in a system message and its answer is constrained to one JSON object: either
`{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}` (each call's `arguments`
following that function's `parameters` schema) or `{"response": ...}`, a reply to the
user. `tool_choice` narrows the grammar: `required` leaves out the reply, a named
function leaves out the other functions. Earlier calls and their results are written
into the conversation in the same format, so that any chat template (even one that only
knows user and assistant turns) renders them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from appliance.llm.protocol import ChatMessage

# The schema of a function that declares no parameters: an object, anything in it.
NO_PARAMETERS: Final[dict[str, Any]] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Call:
    """A call the model made (or one from the history): `arguments` is JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Turn:
    """A message of an OpenAI conversation, tool fields included."""

    role: str
    content: str
    calls: tuple[Call, ...] = ()
    call_id: str | None = None


def answer_schema(
    functions: list[Function],
    choice: str,
    *,
    parallel: bool,
    response: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The schema of the model's answer. `choice` is "auto", "required" or a function's
    name; `response` is the schema of a reply (a string unless response_format says)."""
    chosen = [f for f in functions if choice in ("auto", "required") or f.name == choice]
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f.name},
                "arguments": f.parameters or NO_PARAMETERS,
            },
            "required": ["name", "arguments"],
        }
        for f in chosen
    ]
    one_call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    call_list: dict[str, Any] = {"type": "array", "items": one_call, "minItems": 1}
    if not parallel:
        call_list["maxItems"] = 1
    calling = {
        "type": "object",
        "properties": {"tool_calls": call_list},
        "required": ["tool_calls"],
    }
    if choice != "auto":
        return calling
    replying = {
        "type": "object",
        "properties": {"response": response or {"type": "string"}},
        "required": ["response"],
    }
    return {"anyOf": [calling, replying]}


def instructions(functions: list[Function], choice: str, *, parallel: bool) -> str:
    """What the system message tells the model of the tools and of the answer's format."""
    listed = [
        {"name": f.name, "description": f.description or "", "parameters": f.parameters}
        for f in functions
        if choice in ("auto", "required") or f.name == choice
    ]
    many = "one or more calls" if parallel else "one call"
    lines = [
        "You can call these tools (functions):",
        json.dumps(listed, ensure_ascii=False),
        "",
        "Answer with one JSON object. To call tools, with "
        f"{many}: "
        '{"tool_calls": [{"name": "<function name>", "arguments": {<its arguments>}}]}',
    ]
    if choice == "auto":
        lines.append('To reply to the user instead: {"response": "<your reply>"}')
    else:
        lines.append("You must call a tool now.")
    return "\n".join(lines)


def render(turns: list[Turn], tool_text: str | None) -> list[ChatMessage]:
    """The conversation as plain chat messages: `tool_text` (the tools and the format)
    joins the system message; calls and results become JSON in that format; results that
    follow each other share one user turn (templates that need alternating turns)."""
    messages: list[ChatMessage] = []
    if tool_text is not None:
        system = [t for t in turns if t.role == "system"]
        if system:
            joined = "\n\n".join([system[0].content, tool_text])
            turns = [Turn("system", joined), *[t for t in turns if t is not system[0]]]
        else:
            turns = [Turn("system", tool_text), *turns]
    names = {call.id: call.name for turn in turns for call in turn.calls}
    results: list[dict[str, Any]] = []
    for turn in turns:
        if turn.role == "tool":
            results.append(
                {
                    "tool_call_id": turn.call_id,
                    "name": names.get(turn.call_id or "", ""),
                    "content": turn.content,
                }
            )
            continue
        if results:
            messages.append(_results_message(results))
            results = []
        if turn.role == "assistant" and turn.calls:
            body: dict[str, Any] = {"tool_calls": [_call_json(call) for call in turn.calls]}
            if turn.content:
                body["content"] = turn.content
            messages.append(ChatMessage("assistant", json.dumps(body, ensure_ascii=False)))
        else:
            messages.append(ChatMessage(turn.role, turn.content))
    if results:
        messages.append(_results_message(results))
    return messages


def _results_message(results: list[dict[str, Any]]) -> ChatMessage:
    return ChatMessage("user", json.dumps({"tool_results": results}, ensure_ascii=False))


def _call_json(call: Call) -> dict[str, Any]:
    try:
        arguments: Any = json.loads(call.arguments)
    except ValueError:
        arguments = call.arguments
    return {"name": call.name, "arguments": arguments}


@dataclass(frozen=True)
class Answer:
    """The model's answer, read: a reply (`content`) or calls."""

    content: str | None
    calls: list[tuple[str, str]]  # (name, arguments as JSON text)


def read_answer(text: str, *, json_reply: bool) -> Answer:
    """The calls or the reply in an answer in the generic format. An answer that is not
    whole JSON (cut by a stop string, or past the closing limit) is the reply as it is.
    `json_reply`: the reply is JSON itself (response_format), kept as JSON text."""
    try:
        body = json.loads(text)
    except ValueError:
        return Answer(text, [])
    if not isinstance(body, dict):
        return Answer(text, [])
    calls = body.get("tool_calls")
    if isinstance(calls, list) and calls:
        read: list[tuple[str, str]] = []
        for call in calls:
            if not isinstance(call, dict):
                continue
            arguments = json.dumps(call.get("arguments", {}), ensure_ascii=False)
            entry = (str(call.get("name", "")), arguments)
            # A small model may repeat a call word for word: once is what it asks for.
            if entry not in read:
                read.append(entry)
        return Answer(None, read)
    reply = body.get("response", "")
    if isinstance(reply, str) and not json_reply:
        return Answer(reply, [])
    return Answer(json.dumps(reply, ensure_ascii=False), [])


_REPLY_START: Final = re.compile(r'\{ ?"response" ?: ?"')


class ReplyStream:
    """The reply of an answer in the generic format, as its tokens arrive: once the
    answer is known to be `{"response": "...`, the string's text is given out as it
    grows (escapes decoded whole), so a streamed reply is not held until the end."""

    def __init__(self) -> None:
        self.text = ""
        self.replying: bool | None = None  # None: not known yet
        self._start = 0  # where the reply's string starts in `text`
        self.sent = ""  # the reply's text given out so far
        self._closed = False

    def feed(self, piece: str) -> str:
        """The reply's text that can be given out now ("" while undecided or a call)."""
        self.text += piece
        if self.replying is None:
            found = _REPLY_START.match(self.text)
            if found:
                self.replying, self._start = True, found.end()
            elif len(self.text) >= len('{ "response" : "') or '"tool_calls"' in self.text:
                self.replying = False
        if not self.replying or self._closed:
            return ""
        raw, self._closed = _whole_escapes(self.text[self._start :])
        try:
            decoded: str = json.loads(f'"{raw}"')
        except ValueError:
            # Not a JSON string after all: the rest comes with the whole answer.
            self._closed = True
            return ""
        fresh = decoded[len(self.sent) :]
        self.sent = decoded
        return fresh


def _whole_escapes(raw: str) -> tuple[str, bool]:
    """The longest start of a JSON string's inside that ends on a whole character (no
    escape cut in two), and whether the string's closing quote came."""
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == '"':
            return raw[:index], True
        if char != "\\":
            index += 1
            continue
        if index + 1 >= len(raw):
            break
        if raw[index + 1] != "u":
            index += 2
            continue
        end = index + 6
        if end > len(raw):
            break
        # A high surrogate needs its low half in the same piece.
        if 0xD800 <= int(raw[index + 2 : end], 16) <= 0xDBFF:
            end += 6
        if end > len(raw):
            break
        index = end
    return raw[:index], False
