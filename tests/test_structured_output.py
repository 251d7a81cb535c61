"""Structured output holds for any schema, under continuous batching: 50 generated JSON
schemas (nested objects, arrays, enums, required and optional fields, integers and
numbers with bounds) asked of the default model (SmolLM2) through 4 concurrent streams;
every answer parses and validates against its schema (`jsonschema`), also those that
max_tokens cut (they are closed so that they still parse).
"""

from __future__ import annotations

import json
import random
from typing import Any, Final

import jsonschema
import trio

from tests.harness import running_daemon, short_tempdir
from tests.real_model import install_smollm2

SCHEMAS: Final = 50
STREAMS: Final = 4
WORDS: Final = [
    "name",
    "city",
    "color",
    "score",
    "count",
    "title",
    "owner",
    "items",
    "price",
    "level",
    "tags",
    "notes",
    "kind",
    "size",
    "rank",
]
TOPICS: Final = ["a book", "a city", "a recipe", "a football team", "a planet", "a shop"]


def generate_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A random object schema: each property a string (bounded), an enum, a bounded
    integer or number, a boolean, an array of scalars or, above depth 2, an object."""
    names = rng.sample(WORDS, rng.randint(1, 4))
    properties = {name: _value(rng, depth) for name in names}
    required = [name for name in names if rng.random() < 0.7]
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    kinds = ["string", "enum", "integer", "number", "boolean", "array"]
    if depth < 2:
        kinds.append("object")
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(3, 24)}
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["red", "green", "blue", "small", "big"], 3)}
    if kind in ("integer", "number"):
        low = rng.randint(-50, 50)
        bounds: dict[str, Any] = {"type": kind}
        choice = rng.random()
        if choice < 0.4:
            bounds |= {"minimum": low, "maximum": low + rng.randint(0, 500)}
        elif choice < 0.6:
            bounds |= {"exclusiveMinimum": low}
        elif choice < 0.8:
            bounds |= {"maximum": low}
        return bounds
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        item = rng.choice([{"type": "string", "maxLength": 12}, {"type": "integer"}])
        return {"type": "array", "items": item, "minItems": 1, "maxItems": rng.randint(1, 4)}
    return generate_schema(rng, depth + 1)


async def _answer(client: Any, index: int, schema: dict[str, Any]) -> str:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": f"Describe {TOPICS[index % len(TOPICS)]}."}],
        "max_tokens": 160,
        "seed": index,
        "stream": True,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": f"s{index}", "schema": schema, "strict": True},
        },
    }
    parts: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
        assert answer.status_code == 200, await answer.aread()
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk["choices"]:
                parts.append(choice["delta"].get("content", ""))
    return "".join(parts)


async def test_fifty_generated_schemas_all_validate_under_four_streams() -> None:
    rng = random.Random(2121)
    schemas = [generate_schema(rng) for _ in range(SCHEMAS)]
    state = short_tempdir()
    install_smollm2(state / "models", "smollm2")
    env = {"APPLIANCE_DEFAULT_MODEL": "smollm2", "APPLIANCE_PARALLEL": str(STREAMS)}
    answers: dict[int, str] = {}
    with trio.fail_after(1800):
        async with (
            running_daemon(env, state_dir=state) as daemon,
            daemon.client(timeout=600) as client,
        ):
            limiter = trio.CapacityLimiter(STREAMS)

            async def one(index: int) -> None:
                async with limiter:
                    answers[index] = await _answer(client, index, schemas[index])

            async with trio.open_nursery() as nursery:
                for index in range(SCHEMAS):
                    nursery.start_soon(one, index)
    invalid = []
    for index, schema in enumerate(schemas):
        try:
            jsonschema.validate(json.loads(answers[index]), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            invalid.append((index, answers[index], str(exc)[:200]))
    assert not invalid, invalid
