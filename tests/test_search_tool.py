"""The built-in `web_search` tool through the `openai` client, on the daemon with
SmolLM2-135M-Instruct and the SearXNG stand-in (tests/searxng.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import openai
import pytest
import trio

from tests.harness import Daemon, running_daemon, short_tempdir
from tests.real_model import install_smollm2
from tests.searxng import SearxngStandIn, searxng_standin

T = TypeVar("T")
MODEL: Final = "smol"
# Clients list the tool by name; the server has its own definition of it.
WEB_SEARCH: Final[dict[str, Any]] = {
    "type": "function",
    "function": {"name": "web_search", "description": "search the web"},
}
GET_TIME: Final[dict[str, Any]] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
FORCED: Final[dict[str, Any]] = {"type": "function", "function": {"name": "web_search"}}
QUESTION: Final = (
    "Who wrote the play Hamlet? Send the answer to alice.smith@example.com, phone +1 415 555 0100."
)


@asynccontextmanager
async def smol_daemon(**env: str) -> AsyncIterator[tuple[Daemon, SearxngStandIn]]:
    state = short_tempdir()
    install_smollm2(state / "models", MODEL)
    async with searxng_standin() as standin:
        settings = {"APPLIANCE_DEFAULT_MODEL": MODEL, **env}
        settings = {k: v.replace("{standin}", standin.url) for k, v in settings.items()}
        async with running_daemon(settings, state_dir=state) as daemon:
            yield daemon, standin


async def in_thread(call: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(call)


def sdk(daemon: Daemon, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=daemon.url + "/v1", api_key=key or daemon.api_key, timeout=300, max_retries=0
    )


def _ask(client: openai.OpenAI, **fields: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        **{"max_tokens": 40, "temperature": 0, **fields},
    )


async def test_web_search_tool_is_run_by_the_server() -> None:
    with trio.fail_after(600):
        async with smol_daemon(SEARCH_ENABLED="true", APPLIANCE_SEARCH_URL="{standin}") as (
            daemon,
            standin,
        ):
            client = sdk(daemon)
            answer = await in_thread(lambda: _ask(client, tools=[WEB_SEARCH], tool_choice=FORCED))
            # The model called the tool; the server searched and asked it again: the
            # client gets the answer, not the call.
            [got] = standin.received
            assert got.q and "alice" not in got.q and "555" not in got.q
            assert b"alice.smith" not in got.raw
            message = answer.choices[0].message
            assert not message.tool_calls
            assert message.content
            assert answer.choices[0].finish_reason in ("stop", "length")

            streamed = await in_thread(
                lambda: list(_ask(client, tools=[WEB_SEARCH], tool_choice=FORCED, stream=True))
            )
            assert len(standin.received) == 2
            text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            assert text
            assert not any(c.choices[0].delta.tool_calls for c in streamed if c.choices)

            # With a tool of the client's beside it, the client gets its own calls only.
            mixed = await in_thread(
                lambda: _ask(client, tools=[WEB_SEARCH, GET_TIME], tool_choice=FORCED)
            )
            assert len(standin.received) == 3
            for call in mixed.choices[0].message.tool_calls or []:
                assert call.function.name == "get_time"
                json.loads(call.function.arguments)

            # tool_choice "none": listed, never called, nothing searched.
            quiet = await in_thread(lambda: _ask(client, tools=[WEB_SEARCH], tool_choice="none"))
            assert quiet.choices[0].message.content and len(standin.received) == 3

            # Only the search provider was contacted: no result link was fetched.
            assert {r.path for r in standin.received} == {"/search"}


async def test_web_search_tool_refused_by_name_when_off_or_not_allowed() -> None:
    with trio.fail_after(300):
        async with smol_daemon(APPLIANCE_SEARCH_URL="{standin}") as (daemon, standin):
            with pytest.raises(openai.PermissionDeniedError) as caught:
                await in_thread(lambda: _ask(sdk(daemon), tools=[WEB_SEARCH]))
            error = caught.value.body
            assert isinstance(error, dict) and error["code"] == "search_disabled"
            assert "SEARCH_ENABLED" in error["message"] and error["param"] == "tools"
            # Other tools work as before.
            other = await in_thread(lambda: _ask(sdk(daemon), tools=[GET_TIME], max_tokens=8))
            assert other.choices
        assert standin.received == []

        async with smol_daemon(
            SEARCH_ENABLED="true",
            APPLIANCE_SEARCH_URL="{standin}",
            APPLIANCE_SEARCH_ALLOW="admin",
        ) as (daemon, standin):
            user = await daemon.create_key("alice")
            with pytest.raises(openai.PermissionDeniedError) as caught:
                await in_thread(lambda: _ask(sdk(daemon, user), tools=[WEB_SEARCH]))
            error = caught.value.body
            assert isinstance(error, dict) and error["code"] == "search_not_allowed"
            assert "APPLIANCE_SEARCH_ALLOW" in error["message"]
        assert standin.received == []
