"""The generic tool format (appliance.llm.tools): what the grammar allows for each
tool_choice, how a history with calls and results is written for any chat template, and
how an answer is read back into calls or a reply."""

from __future__ import annotations

import json

import jsonschema
import pytest

from appliance.llm.grammar import schema_to_grammar
from appliance.llm.protocol import ChatMessage
from appliance.llm.tools import (
    Call,
    Function,
    ReplyStream,
    Turn,
    answer_schema,
    read_answer,
    render,
)

WEATHER = Function(
    "get_weather",
    "weather of a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TIME = Function("get_time", None, {"type": "object", "properties": {}})
CALL = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
REPLY = {"response": "hello"}


@pytest.mark.parametrize(
    ("choice", "parallel", "valid", "invalid"),
    [
        ("auto", True, [CALL, REPLY], [{"tool_calls": []}, {"response": 3}]),
        ("required", True, [CALL], [REPLY]),
        (
            "get_time",
            True,
            [{"tool_calls": [{"name": "get_time", "arguments": {}}]}],
            [CALL, REPLY],
        ),
        ("required", False, [CALL], [{"tool_calls": CALL["tool_calls"] * 2}]),
        (
            "auto",
            True,
            [],
            [{"tool_calls": [{"name": "get_weather", "arguments": {"town": "Paris"}}]}],
        ),
    ],
)
def test_the_answer_schema_follows_tool_choice(
    choice: str, parallel: bool, valid: list[object], invalid: list[object]
) -> None:
    schema = answer_schema([WEATHER, TIME], choice, parallel=parallel)
    schema_to_grammar(schema)  # expressible
    for answer in valid:
        jsonschema.validate(answer, schema)
    for answer in invalid:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(answer, schema)


def test_a_history_with_calls_and_results_is_plain_chat() -> None:
    turns = [
        Turn("system", "be brief"),
        Turn("user", "weather and time in Paris?"),
        Turn(
            "assistant",
            "",
            (Call("c1", "get_weather", '{"city": "Paris"}'), Call("c2", "get_time", "{}")),
        ),
        Turn("tool", "21 C", call_id="c1"),
        Turn("tool", "10:00", call_id="c2"),
        Turn("assistant", "21 C at 10:00"),
    ]
    messages = render(turns, "TOOLS")
    assert [m.role for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0] == ChatMessage("system", "be brief\n\nTOOLS")
    assert json.loads(messages[2].content) == {
        "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Paris"}},
            {"name": "get_time", "arguments": {}},
        ]
    }
    results = json.loads(messages[3].content)["tool_results"]
    assert [(r["tool_call_id"], r["name"], r["content"]) for r in results] == [
        ("c1", "get_weather", "21 C"),
        ("c2", "get_time", "10:00"),
    ]
    assert render([Turn("user", "hi")], None) == [ChatMessage("user", "hi")]


def test_answers_are_read_into_calls_or_a_reply() -> None:
    twice = {"tool_calls": CALL["tool_calls"] * 2}
    assert read_answer(json.dumps(twice), json_reply=False).calls == [
        ("get_weather", '{"city": "Paris"}')
    ]
    assert read_answer(json.dumps(REPLY), json_reply=False).content == "hello"
    structured = read_answer(json.dumps({"response": {"a": 1}}), json_reply=True)
    assert json.loads(structured.content or "") == {"a": 1}
    # Not whole JSON (a stop string cut it): the text is the reply as it is.
    assert read_answer('{"response": "hel', json_reply=False).content == '{"response": "hel'


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_a_reply_streams_as_its_string_grows(ensure_ascii: bool) -> None:
    said = 'Hé said "hi"\\ then \U0001f600 and\nmore'
    text = json.dumps({"response": said}, ensure_ascii=ensure_ascii)
    stream = ReplyStream()
    given = [stream.feed(char) for char in text]
    assert "".join(given) == said == stream.sent
    # Text came out before the answer ended, a piece at a time.
    assert given.index(said[0]) < len(text) // 2
    calls = ReplyStream()
    assert not any(calls.feed(char) for char in json.dumps(CALL))
    assert calls.replying is False and calls.text == json.dumps(CALL)
