"""Strict requests on /v1, as OpenAI's: every field the server does not know, every value
out of range and every field that cannot apply here is a 400 `invalid_request_error`
naming it (`param`), never a 422 and never silently dropped. The official `openai`
client sees them as `openai.BadRequestError`. The fields that may be ignored (`user`,
`metadata`, `store`, `service_tier`) are accepted.
"""

from __future__ import annotations

import json
from typing import Any, Final

import llama_cpp
import openai
import trio

from tests.harness import running_daemon

CHAT: Final[dict[str, Any]] = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "the"}],
    "max_tokens": 2,
}
COMPLETION: Final[dict[str, Any]] = {"model": "tiny", "prompt": "the", "max_tokens": 2}
WEATHER: Final[dict[str, Any]] = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

# (path, body, param): a request each, and the field its 400 must name.
REFUSED: Final[list[tuple[str, dict[str, Any], str]]] = [
    # Unknown fields, a typo first: OpenAI answers 400.
    ("/v1/chat/completions", {**CHAT, "temprature": 0.2}, "temprature"),
    ("/v1/completions", {**COMPLETION, "max_token": 3}, "max_token"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "hi", "nmae": "x"}]},
        "messages[0].nmae",
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "stream_options": {"include_usge": True}},
        "stream_options.include_usge",
    ),
    (
        "/v1/embeddings",
        {"model": "tiny", "input": "the", "encodingformat": "float"},
        "encodingformat",
    ),
    # Validation errors: 400, not 422.
    ("/v1/chat/completions", {**CHAT, "temperature": 3}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, "response_format.type"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
        "messages[0].role",
    ),
    ("/v1/completions", {**COMPLETION, "logprobs": 30}, "logprobs"),
    (
        "/v1/embeddings",
        {"model": "tiny", "input": "the", "encoding_format": "hex"},
        "encoding_format",
    ),
    ("/v1/embeddings", {"model": "tiny", "input": [1, "a"]}, "input[0]"),
    ("/v1/embeddings", {"model": "tiny", "input": []}, "input"),
    # Fields OpenAI defines that cannot apply here: refused by name.
    ("/v1/chat/completions", {**CHAT, "n": 2}, "n"),
    ("/v1/completions", {**COMPLETION, "n": 3}, "n"),
    ("/v1/chat/completions", {**CHAT, "audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
    ("/v1/chat/completions", {**CHAT, "modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions"),
    (
        "/v1/chat/completions",
        {
            **CHAT,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                    ],
                }
            ],
        },
        "messages[0].content[1].type",
    ),
    ("/v1/completions", {**COMPLETION, "echo": True}, "echo"),
    ("/v1/completions", {**COMPLETION, "best_of": 2}, "best_of"),
    ("/v1/completions", {**COMPLETION, "suffix": "end"}, "suffix"),
    ("/v1/embeddings", {"model": "tiny", "input": "the", "dimensions": 8}, "dimensions"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    # Tools that cannot be honoured.
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),
    (
        "/v1/chat/completions",
        {
            **CHAT,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        "tool_choice",
    ),
    ("/v1/chat/completions", {**CHAT, "tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    (
        "/v1/chat/completions",
        {
            **CHAT,
            "messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "20 C"}],
        },
        "messages[1].tool_call_id",
    ),
    ("/v1/chat/completions", {**CHAT, "tools": [WEATHER], "logprobs": True}, "logprobs"),
    # Schema features the grammar cannot express: named, not dropped.
    (
        "/v1/chat/completions",
        {
            **CHAT,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "n",
                    "schema": {
                        "type": "object",
                        "properties": {"n": {"type": "integer", "multipleOf": 3}},
                    },
                },
            },
        },
        "response_format.json_schema.schema.properties.n.multipleOf",
    ),
    (
        "/v1/chat/completions",
        {
            **CHAT,
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "tag",
                        "parameters": {"type": "array", "uniqueItems": True},
                    },
                }
            ],
        },
        "tools[0].function.parameters.uniqueItems",
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "grammar": "root ::= ", "response_format": {"type": "json_object"}},
        "grammar",
    ),
]


async def test_unknown_invalid_and_inapplicable_fields_are_400_naming_them() -> None:
    with trio.fail_after(180):
        async with running_daemon() as daemon, daemon.client() as client:
            for path, body, param in REFUSED:
                answer = await client.post(path, json=body)
                assert answer.status_code == 400, (param, answer.status_code, answer.text)
                error = answer.json()["error"]
                assert error["type"] == "invalid_request_error", (param, error)
                assert error["param"] == param, (param, error)
                assert "Traceback" not in answer.text
            # The fields OpenAI clients send that mean nothing here are accepted.
            ignored = {
                "user": "u-1",
                "metadata": {"a": "b"},
                "store": False,
                "service_tier": "auto",
            }
            for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
                answer = await client.post(path, json={**body, **ignored})
                assert answer.status_code == 200, answer.text
            # Nulls are what clients send for "not set".
            nulls = {"temperature": None, "top_p": None, "n": None, "stop": None, "seed": None}
            answer = await client.post("/v1/chat/completions", json={**CHAT, **nulls})
            assert answer.status_code == 200, answer.text
            # A token the model does not have, and a grammar llama.cpp refuses.
            answer = await client.post(
                "/v1/completions", json={**COMPLETION, "logit_bias": {"99999999": -100}}
            )
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["code"] == "invalid_logit_bias"
            for grammar in ("root ::= ( ", 'answer ::= "yes"'):
                answer = await client.post(
                    "/v1/completions", json={**COMPLETION, "grammar": grammar}
                )
                assert answer.status_code == 400, answer.text
                assert answer.json()["error"]["code"] == "invalid_grammar"
            # The client's mistake is answered, not logged as an error of the box.
            errors = [line for line in daemon.log_lines() if line.get("level") == "ERROR"]
            assert not errors, errors[:3]
            # The daemon is still ready.
            assert (await client.get("/api/v1/health/ready")).status_code == 200

            def with_client() -> list[str]:
                sdk = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.api_key)
                caught = []
                for extra in ({"temprature": 0.1}, {"n": 2}):
                    try:
                        sdk.chat.completions.create(
                            model="tiny",
                            messages=[{"role": "user", "content": "the"}],
                            max_tokens=2,
                            extra_body=extra,
                        )
                    except openai.BadRequestError as exc:
                        body: Any = exc.body
                        caught.append(body["param"])
                return caught

            assert await trio.to_thread.run_sync(with_client) == ["temprature", "n"]


async def test_models_by_id_and_capabilities() -> None:
    with trio.fail_after(120):
        async with running_daemon() as daemon, daemon.client() as client:
            listed = (await client.get("/v1/models")).json()["data"]
            assert [m["id"] for m in listed] == ["tiny"]
            assert set(listed[0]["capabilities"]) == {
                "chat",
                "completions",
                "embeddings",
                "tools",
                "structured_output",
            }
            one = await client.get("/v1/models/tiny")
            assert one.status_code == 200
            assert one.json() == listed[0]
            missing = await client.get("/v1/models/nope")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "model_not_found"

            def retrieve() -> str:
                sdk = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.api_key)
                return sdk.models.retrieve("tiny").id

            assert await trio.to_thread.run_sync(retrieve) == "tiny"


async def test_completions_stream_usage_when_asked() -> None:
    with trio.fail_after(120):
        async with running_daemon() as daemon, daemon.client() as client:
            body = {**COMPLETION, "max_tokens": 4, "stream": True, "temperature": 0}
            plain = await client.post("/v1/completions", json=body)
            asked = await client.post(
                "/v1/completions", json={**body, "stream_options": {"include_usage": True}}
            )
            assert '"usage"' not in plain.text
            lines = [
                line.removeprefix("data: ")
                for line in asked.text.splitlines()
                if line.startswith("data: ")
            ]
            assert lines[-1] == "[DONE]"
            last = json.loads(lines[-2])
            assert last["choices"] == []
            assert last["usage"]["completion_tokens"] == 4
            assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 4


def _token_id(path: str, piece: str) -> int:
    """The id of the tiny model's token whose piece is `piece` (▁ for a space)."""
    from llama_cpp._internals import LlamaModel

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = LlamaModel(path_model=path, params=params, verbose=False)
    try:
        wanted = piece.replace(" ", "\u2581")
        return next(i for i in range(model.n_vocab()) if model.token_get_text(i) == wanted)
    finally:
        model.close()


def _data(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line.removeprefix("data: "))
        for line in text.splitlines()
        if line.startswith("data: {")
    ]


async def test_sampling_fields_through_the_api_streamed_and_not() -> None:
    greedy = {"model": "tiny", "prompt": "the water", "max_tokens": 12, "temperature": 0}
    with trio.fail_after(120):
        async with running_daemon() as daemon, daemon.client() as client:
            sid = _token_id(str(daemon.state_dir / "models" / "tiny.gguf"), " sid")

            async def text(**extra: Any) -> str:
                answer = await client.post("/v1/completions", json={**greedy, **extra})
                assert answer.status_code == 200, answer.text
                return str(answer.json()["choices"][0]["text"])

            free = await text()
            assert " sid" in free
            assert " sid" not in await text(logit_bias={str(sid): -100})
            assert await text(frequency_penalty=2.0) != free
            assert await text(presence_penalty=2.0) != free
            assert await text(grammar='root ::= "yes" | "no"') in ("yes", "no")

            # Completions' log probabilities, whole and streamed.
            whole = (await client.post("/v1/completions", json={**greedy, "logprobs": 3})).json()
            shaped = whole["choices"][0]["logprobs"]
            assert len(shaped["tokens"]) == whole["usage"]["completion_tokens"] == 12
            assert all(len(top) <= 3 for top in shaped["top_logprobs"])
            assert shaped["text_offset"][0] == 0 and shaped["token_logprobs"][0] <= 0
            streamed = await client.post(
                "/v1/completions", json={**greedy, "logprobs": 3, "stream": True}
            )
            tokens = [
                token
                for chunk in _data(streamed.text)
                if chunk["choices"] and chunk["choices"][0]["logprobs"]
                for token in chunk["choices"][0]["logprobs"]["tokens"]
            ]
            assert tokens == shaped["tokens"]

            # Chat's, whole and streamed: the same greedy tokens.
            chat = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "the water"}],
                "max_tokens": 8,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 2,
            }
            answer = (await client.post("/v1/chat/completions", json=chat)).json()
            content = answer["choices"][0]["logprobs"]["content"]
            assert len(content) == answer["usage"]["completion_tokens"]
            for entry in content:
                assert len(entry["top_logprobs"]) == 2
                assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]
                assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
            streamed = await client.post("/v1/chat/completions", json={**chat, "stream": True})
            pieces = [
                entry["token"]
                for chunk in _data(streamed.text)
                if chunk["choices"] and chunk["choices"][0]["logprobs"]
                for entry in chunk["choices"][0]["logprobs"]["content"]
            ]
            assert pieces == [entry["token"] for entry in content]
