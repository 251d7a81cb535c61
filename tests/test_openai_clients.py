"""The real clients agent frameworks use, against the real daemon with the default model
(SmolLM2-135M-Instruct): the `openai` client (structured output with `parse`, tools with
tool_choice required and auto, a full tool round trip, streamed tool calls assembled by
the client, embeddings, models), `langchain-openai` (`with_structured_output` in both
modes, `bind_tools`) and `litellm` (`response_format` and `tools`).

The model is small: the tests check behaviour (the answer's shape, its validity against
the schema, the calls' names and arguments), never the quality of what it says.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import jsonschema
import openai
import pydantic
import trio

from tests.harness import Daemon, running_daemon, short_tempdir
from tests.real_model import install_smollm2

T = TypeVar("T")
MODEL: Final = "smollm2"
WEATHER_PARAMETERS: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "the city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
WEATHER_TOOL: Final[dict[str, Any]] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
QUESTION: Final = "What is the weather in Paris now?"


class Person(pydantic.BaseModel):
    # Bounded lengths: a small model may otherwise repeat list items until max_tokens.
    name: str = pydantic.Field(max_length=40)
    age: int = pydantic.Field(ge=0, le=120)
    hobbies: list[str] = pydantic.Field(max_length=3)


@asynccontextmanager
async def smol_daemon() -> AsyncIterator[Daemon]:
    state = short_tempdir()
    install_smollm2(state / "models", MODEL)
    env = {"APPLIANCE_DEFAULT_MODEL": MODEL, "APPLIANCE_PARALLEL": "4"}
    async with running_daemon(env, state_dir=state) as daemon:
        yield daemon


async def in_thread(call: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(call)


def sdk(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.api_key, timeout=300)


# Greedy decoding: the same answer on every run (a sampled one may, say, repeat a call
# until max_tokens cuts it: valid, but finish_reason "length").
GREEDY: Final = 0.0


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))  # both have length 1


def _weather_call(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    arguments: dict[str, Any] = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    return arguments


async def test_openai_client_structured_output_tools_embeddings_and_models() -> None:
    with trio.fail_after(900):
        async with smol_daemon() as daemon:
            client = sdk(daemon)
            ask = [{"role": "user", "content": "Describe a person who likes sports."}]

            # chat.completions.parse with a Pydantic model (json_schema, strict).
            parsed = await in_thread(
                lambda: client.chat.completions.parse(
                    model=MODEL,
                    messages=ask,
                    response_format=Person,
                    max_tokens=200,
                    temperature=GREEDY,
                )
            )
            person = parsed.choices[0].message.parsed
            assert isinstance(person, Person)
            # Cut by max_tokens, the answer still parses and validates.
            cut = await in_thread(
                lambda: client.chat.completions.create(
                    model=MODEL,
                    messages=ask,
                    max_tokens=4,
                    response_format={
                        "type": "json_schema",
                        "json_schema": {
                            "name": "person",
                            "schema": Person.model_json_schema(),
                            "strict": True,
                        },
                    },
                )
            )
            assert cut.choices[0].finish_reason == "length"
            Person.model_validate_json(cut.choices[0].message.content or "")
            # json_object: any JSON object.
            anything = await in_thread(
                lambda: client.chat.completions.create(
                    model=MODEL,
                    messages=ask,
                    max_tokens=60,
                    response_format={"type": "json_object"},
                )
            )
            assert isinstance(json.loads(anything.choices[0].message.content or ""), dict)

            # tools, tool_choice required: a call whose arguments follow the schema.
            question = [{"role": "user", "content": QUESTION}]
            required = await in_thread(
                lambda: client.chat.completions.create(
                    model=MODEL,
                    messages=question,
                    tools=[WEATHER_TOOL],
                    tool_choice="required",
                    max_tokens=80,
                    temperature=GREEDY,
                )
            )
            choice = required.choices[0]
            assert choice.finish_reason == "tool_calls"
            assert choice.message.content is None
            calls = choice.message.tool_calls or []
            assert calls and all(_weather_call(call) for call in calls)

            # tool_choice auto: a call or a reply, each well formed.
            auto = await in_thread(
                lambda: client.chat.completions.create(
                    model=MODEL,
                    messages=question,
                    tools=[WEATHER_TOOL],
                    tool_choice="auto",
                    max_tokens=80,
                    temperature=GREEDY,
                )
            )
            message = auto.choices[0].message
            if message.tool_calls:
                assert auto.choices[0].finish_reason == "tool_calls"
                _weather_call(message.tool_calls[0])
            else:
                assert isinstance(message.content, str) and message.content

            # A full round trip: the call, its result as a tool message, the final answer.
            history: list[Any] = [
                *question,
                choice.message,
                {
                    "role": "tool",
                    "tool_call_id": calls[0].id,
                    "content": json.dumps({"temperature": 21, "unit": "celsius"}),
                },
            ]
            final = await in_thread(
                lambda: client.chat.completions.create(
                    model=MODEL,
                    messages=history,
                    tools=[WEATHER_TOOL],
                    tool_choice="none",
                    max_tokens=60,
                    temperature=GREEDY,
                )
            )
            assert final.choices[0].message.tool_calls is None
            assert final.choices[0].message.content
            assert final.choices[0].finish_reason in ("stop", "length")

            # Streamed tool calls, assembled as clients do (id and name, then arguments).
            def streamed() -> tuple[dict[int, dict[str, str]], list[str | None]]:
                assembled: dict[int, dict[str, str]] = {}
                reasons: list[str | None] = []
                stream = client.chat.completions.create(
                    model=MODEL,
                    messages=question,
                    tools=[WEATHER_TOOL],
                    tool_choice={"type": "function", "function": {"name": "get_weather"}},
                    max_tokens=80,
                    temperature=GREEDY,
                    stream=True,
                )
                for chunk in stream:
                    for part in chunk.choices:
                        reasons.append(part.finish_reason)
                        for delta in part.delta.tool_calls or []:
                            entry = assembled.setdefault(
                                delta.index, {"id": "", "name": "", "arguments": ""}
                            )
                            if delta.id:
                                entry["id"] = delta.id
                            if delta.function and delta.function.name:
                                entry["name"] = delta.function.name
                            if delta.function and delta.function.arguments:
                                entry["arguments"] += delta.function.arguments
                return assembled, reasons

            # Streamed with tool_choice auto: a reply comes as it grows, not at the end.
            def streamed_auto() -> tuple[list[str], bool]:
                pieces: list[str] = []
                called = False
                for chunk in client.chat.completions.create(
                    model=MODEL,
                    messages=question,
                    tools=[WEATHER_TOOL],
                    max_tokens=80,
                    temperature=GREEDY,
                    stream=True,
                ):
                    for part in chunk.choices:
                        called = called or bool(part.delta.tool_calls)
                        if part.delta.content:
                            pieces.append(part.delta.content)
                return pieces, called

            pieces, called = await in_thread(streamed_auto)
            if not called:
                # (Not compared with the answer above: a cached prompt prefix may round
                # differently and change a greedy answer.)
                assert len(pieces) > 3 and "".join(pieces).strip()

            assembled, reasons = await in_thread(streamed)
            assert reasons[-1] == "tool_calls"
            assert assembled and all(c["name"] == "get_weather" for c in assembled.values())
            for entry in assembled.values():
                assert entry["id"].startswith("call_")
                jsonschema.validate(json.loads(entry["arguments"]), WEATHER_PARAMETERS)

            # Embeddings (the client asks for base64 and decodes it) and models.
            texts = ["the cat sat on the mat", "a dog ran in the park", "the cat sat on the mat"]
            embedded = await in_thread(lambda: client.embeddings.create(model=MODEL, input=texts))
            vectors = [item.embedding for item in embedded.data]
            assert [item.index for item in embedded.data] == [0, 1, 2]
            assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 16
            for vector in vectors:
                assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-4)
            # The same text, the same vector (to float rounding); another text, another.
            assert _cosine(vectors[0], vectors[2]) > 0.9999 > _cosine(vectors[0], vectors[1])
            assert embedded.usage.prompt_tokens > 0
            floats = await in_thread(
                lambda: client.embeddings.create(
                    model=MODEL, input=texts[0], encoding_format="float"
                )
            )
            assert _cosine(floats.data[0].embedding, vectors[0]) > 0.9999
            retrieved = await in_thread(lambda: client.models.retrieve(MODEL))
            assert retrieved.id == MODEL


def _langchain(daemon: Daemon) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=MODEL,
        base_url=daemon.url + "/v1",
        api_key=daemon.api_key,
        max_tokens=200,
        temperature=GREEDY,
        timeout=300,
    )


async def test_langchain_structured_output_and_bind_tools() -> None:
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str, unit: str) -> str:
        """The weather now in a city, in celsius or fahrenheit."""
        return f"21 {unit} in {city}"

    with trio.fail_after(900):
        async with smol_daemon() as daemon:
            chat = _langchain(daemon)
            for method in ("json_schema", "function_calling"):
                structured = chat.with_structured_output(Person, method=method)
                person = await in_thread(
                    lambda s=structured: s.invoke("Describe a person who likes chess.")
                )
                assert isinstance(person, Person), method
            bound = chat.bind_tools([get_weather], tool_choice="get_weather")
            answer = await in_thread(lambda: bound.invoke(QUESTION))
            assert answer.tool_calls and answer.tool_calls[0]["name"] == "get_weather"
            assert set(answer.tool_calls[0]["args"]) == {"city", "unit"}
            # The call's result goes back and the model answers in text.
            from langchain_core.messages import HumanMessage, ToolMessage

            result = ToolMessage("21 celsius", tool_call_id=answer.tool_calls[0]["id"])
            history = [HumanMessage(QUESTION), answer, result]
            final = await in_thread(lambda: chat.bind_tools([get_weather]).invoke(history))
            assert final.content or final.tool_calls


async def test_litellm_response_format_and_tools() -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    with trio.fail_after(900):
        async with smol_daemon() as daemon:
            common = {
                "model": f"openai/{MODEL}",
                "api_base": daemon.url + "/v1",
                "api_key": daemon.api_key,
                "max_tokens": 200,
                "temperature": GREEDY,
                "timeout": 300,
            }
            formatted = await in_thread(
                lambda: litellm.completion(
                    messages=[{"role": "user", "content": "Describe a person."}],
                    response_format=Person,
                    **common,
                )
            )
            Person.model_validate_json(formatted.choices[0].message.content)
            called = await in_thread(
                lambda: litellm.completion(
                    messages=[{"role": "user", "content": QUESTION}],
                    tools=[WEATHER_TOOL],
                    tool_choice="required",
                    **common,
                )
            )
            assert called.choices[0].finish_reason == "tool_calls"
            _weather_call(called.choices[0].message.tool_calls[0])
