"""Web search from chat on the real daemon (tiny model), against a SearXNG stand-in on
loopback that records what it received (tests/searxng.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from tests.harness import Daemon, install_tiny_model, running_daemon, short_tempdir
from tests.searxng import SearxngStandIn, searxng_standin
from tests.test_remote_api import forwarding_pair

PLANTED = ("alice.smith@example.com", "+1 415 555 0100", "4111 1111 1111 1111")
QUESTION = (
    "What is the tallest mountain in Europe? Mail the answer to alice.smith@example.com "
    "or call +1 415 555 0100; my card is 4111 1111 1111 1111."
)
SEND = "/api/v1/chat/send"


def _sse_events(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = "message", ""
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = line[len("data: ") :]
        events.append((name, json.loads(data)))
    return events


def _search_env(standin: SearxngStandIn, **extra: str) -> dict[str, str]:
    return {
        "SEARCH_ENABLED": "true",
        "APPLIANCE_SEARCH_URL": standin.url,
        "APPLIANCE_SEARCH_TIMEOUT": "2",
        **extra,
    }


@asynccontextmanager
async def searching_daemon(
    state_dir: Path | None = None, **extra: str
) -> AsyncIterator[tuple[Daemon, SearxngStandIn]]:
    state_dir = state_dir or short_tempdir()
    if not (state_dir / "models").exists():
        # Room for the numbered results in the prompt (the tiny model's default is 512).
        install_tiny_model(state_dir / "models", context_length=4096)
    async with (
        searxng_standin() as standin,
        running_daemon(_search_env(standin, **extra), state_dir=state_dir) as daemon,
    ):
        yield daemon, standin


def _expected_sources(standin: SearxngStandIn, count: int = 5) -> list[dict[str, Any]]:
    return [
        {"number": i + 1, "title": r["title"], "url": r["url"], "snippet": r["content"]}
        for i, r in enumerate(standin.results[:count])
    ]


async def test_always_sends_the_redacted_message_and_answers_with_stored_sources() -> None:
    state_dir = short_tempdir()
    with trio.fail_after(150):
        # DEBUG: not even the most verbose log level shows a query.
        async with (
            searching_daemon(state_dir, APPLIANCE_LOG_LEVEL="DEBUG") as (daemon, standin),
            daemon.client() as client,
        ):
            plain = await client.post(
                SEND, json={"message": QUESTION, "max_tokens": 4, "temperature": 0}
            )
            assert plain.status_code == 200, plain.text
            assert "sources" not in plain.json() and "search" not in plain.json()
            assert standin.received == []

            answer = await client.post(
                SEND,
                json={"message": QUESTION, "max_tokens": 4, "temperature": 0, "search": "always"},
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            [got] = standin.received
            # What left the box: the question, without the planted personal data (the Host
            # header left out: its random port may hold any digits).
            sent = b"\r\n".join(
                line for line in got.raw.split(b"\r\n") if not line.lower().startswith(b"host:")
            )
            for planted in (*PLANTED, "alice", "555", "4111"):
                assert planted not in got.q and planted.encode() not in sent
            assert got.q.startswith("What is the tallest mountain in Europe?")
            assert len(got.q) <= 200
            assert body["sources"] == _expected_sources(standin)
            assert body["search"] == {
                "mode": "always",
                "searched": True,
                "provider": "searxng",
                "results": 5,
            }
            # The results went into the prompt.
            assert body["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"] + 50

            streamed = await client.post(
                SEND,
                json={
                    "message": QUESTION,
                    "max_tokens": 4,
                    "stream": True,
                    "search": "always",
                    "conversation_id": body["conversation_id"],
                },
            )
            assert streamed.status_code == 200, streamed.text
            [done] = [data for name, data in _sse_events(streamed.text) if name == "done"]
            assert done["sources"] == _expected_sources(standin)
            assert done["search"]["searched"] is True
            # Only the new message is searched for, never the conversation's history.
            assert [r.q for r in standin.received] == [got.q, got.q]
            request_id = answer.headers["X-Request-ID"]
            conversation = body["conversation_id"]

        # Every search is logged with its request id, the provider, a hash of the query
        # and the count; the query itself is nowhere in the log.
        lines = daemon.log_lines()
        searches = [line for line in lines if "search via searxng" in line.get("message", "")]
        assert len(searches) == 2
        assert searches[0]["request_id"] == request_id
        assert "5 results" in searches[0]["message"] and "query hash" in searches[0]["message"]
        log_text = daemon.log_path.read_text()
        assert "tallest mountain" not in log_text and got.q not in log_text

        # The stored conversation keeps the sources (sealed like any message), across a
        # restart of the daemon.
        async with searching_daemon(state_dir) as (again, _), again.client() as client:
            stored = (await client.get(f"/api/v1/conversations/{conversation}")).json()
    messages = stored["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["sources"] == _expected_sources(standin)
    assert messages[3]["sources"] == _expected_sources(standin)
    assert "sources" not in messages[0] and "sources" not in messages[2]
    # Stored redacted, as every question is.
    assert "alice.smith" not in messages[0]["content"]


# With the tiny model, greedy decoding calls web_search for this message, and sampling
# with seed 1 replies instead (fixed weights and seeds: the same on every run).
GOLD = "What is the price of gold today?"
CALLS: dict[str, Any] = {"message": GOLD, "max_tokens": 8, "temperature": 0}
REPLIES: dict[str, Any] = {"message": GOLD, "max_tokens": 8, "temperature": 1.0, "seed": 1}


async def test_auto_lets_a_local_model_decide_and_says_so() -> None:
    with trio.fail_after(120):
        async with (
            searching_daemon(APPLIANCE_SEARCH_RESULTS="2") as (daemon, standin),
            daemon.client() as client,
        ):
            for stream in (False, True):
                asked = await client.post(SEND, json={**CALLS, "search": "auto", "stream": stream})
                assert asked.status_code == 200, asked.text
                body = asked.json() if not stream else _done(asked.text)
                assert body["search"] == {
                    "mode": "auto",
                    "searched": True,
                    "provider": "searxng",
                    "results": 2,
                    "note": "searched: the model called web_search",
                }
                assert body["sources"] == _expected_sources(standin, 2)
            # The query is the user's message, not words the model chose.
            assert [r.q for r in standin.received] == [GOLD, GOLD]

            for stream in (False, True):
                replied = await client.post(
                    SEND, json={**REPLIES, "search": "auto", "stream": stream}
                )
                assert replied.status_code == 200, replied.text
                body = replied.json() if not stream else _done(replied.text)
                assert "sources" not in body
                assert body["search"] == {
                    "mode": "auto",
                    "searched": False,
                    "note": "not searched: the model answered without calling web_search",
                }
                assert body["usage"]["completion_tokens"] >= 1
            assert len(standin.received) == 2
            # The reply is the answer, stored like any other.
            conversation = _done(replied.text)
            stored = await client.get(f"/api/v1/conversations/{conversation['conversation_id']}")
            assert [m["role"] for m in stored.json()["messages"]] == ["user", "assistant"]

            wrong = await client.post(SEND, json={"message": "x", "search": "sometimes"})
            assert wrong.status_code in (400, 422) and "search" in wrong.text


def _done(text: str) -> dict[str, Any]:
    [done] = [data for name, data in _sse_events(text) if name == "done"]
    assert isinstance(done, dict)
    return done


async def test_auto_with_the_remote_model_searches_questions_about_the_world() -> None:
    """The remote model has no tool calling here: `auto` decides by the message."""
    with trio.fail_after(180):
        async with searxng_standin() as standin:
            settings = _search_env(standin, APPLIANCE_SEARCH_RESULTS="1")
            async with (
                forwarding_pair(**settings) as (local, _, relay),
                local.client(timeout=30) as client,
            ):
                ask = {"model": "remote:tiny", "max_tokens": 3, "search": "auto"}
                asked = await client.post(
                    SEND, json={**ask, "message": "Who won the world cup in 2018?"}
                )
                assert asked.status_code == 200, asked.text
                report = asked.json()["search"]
                assert report["searched"] is True
                assert report["note"].startswith("searched: the message")
                assert asked.json()["sources"] == _expected_sources(standin, 1)
                assert len(standin.received) == 1
                # The numbered result went to the remote model with the question.
                assert b"[1] Result 1 title" in bytes(relay.sent)

                task = await client.post(
                    SEND, json={**ask, "message": "Rewrite this so it sounds kind: go away"}
                )
                assert task.status_code == 200, task.text
                assert "sources" not in task.json()
                assert task.json()["search"] == {
                    "mode": "auto",
                    "searched": False,
                    "note": "not searched: the message does not look like a question about "
                    "the world",
                }
                assert len(standin.received) == 1


async def test_failing_providers_are_502_or_504_and_auto_answers_without_sources() -> None:
    question = GOLD
    with trio.fail_after(180):
        async with (
            searching_daemon(APPLIANCE_SEARCH_TIMEOUT="1") as (daemon, standin),
            daemon.client(timeout=30) as client,
        ):
            standin.mode = "slow"
            slow = await client.post(SEND, json={"message": question, "search": "always"})
            assert slow.status_code == 504, slow.text
            error = slow.json()["error"]
            assert error["code"] == "search_timeout" and error["param"] == "search"
            assert "searxng" in error["message"]
            assert "APPLIANCE_SEARCH_TIMEOUT" in error["message"]

            went_on = await client.post(
                SEND, json={"message": question, "search": "auto", "max_tokens": 3}
            )
            assert went_on.status_code == 200, went_on.text
            body = went_on.json()
            assert "sources" not in body and body["message"]["content"] is not None
            assert body["search"]["searched"] is False
            assert body["search"]["note"].startswith("answered without sources: ")
            assert "did not answer within 1 s" in body["search"]["note"]

            streamed = await client.post(
                SEND,
                json={"message": question, "search": "auto", "max_tokens": 3, "stream": True},
            )
            [done] = [d for n, d in _sse_events(streamed.text) if n == "done"]
            assert "sources" not in done and done["search"]["searched"] is False

            for mode, expected in (("garbage", "not a search answer"), ("huge", "KiB")):
                standin.mode = mode
                refused = await client.post(SEND, json={"message": question, "search": "always"})
                assert refused.status_code == 502, refused.text
                error = refused.json()["error"]
                assert error["code"] == "search_malformed" and expected in error["message"]
                assert "searxng" in error["message"]
                assert "Traceback" not in refused.text

            standin.mode, standin.status = "status", 403
            refused = await client.post(SEND, json={"message": question, "search": "always"})
            assert refused.status_code == 502 and "settings.yml" in refused.text

            # Nothing of it stuck: the next search works, the daemon is healthy.
            standin.mode = "results"
            fine = await client.post(
                SEND, json={"message": question, "search": "always", "max_tokens": 3}
            )
            assert fine.status_code == 200, fine.text
            assert len(fine.json()["sources"]) == 5
            services = (await client.get("/api/v1/health/services")).json()["services"]
            search = next(s for s in services if s["name"] == "search")
            assert search["healthy"] is True and search["restarts"] == 0


async def test_daily_search_budget_and_allow_list() -> None:
    with trio.fail_after(120):
        async with searching_daemon(
            SEARCH_BUDGET_DAILY="2", APPLIANCE_SEARCH_ALLOW="admin, key:kiosk"
        ) as (daemon, standin):
            kiosk = await daemon.create_key("kiosk")
            alice = await daemon.create_key("alice")
            ask = {"message": "Who wrote Hamlet?", "search": "always", "max_tokens": 2}
            async with daemon.client(kiosk) as client:
                for _ in range(2):
                    assert (await client.post(SEND, json=ask)).status_code == 200
                over = await client.post(SEND, json=ask)
                assert over.status_code == 429, over.text
                error = over.json()["error"]
                assert error["code"] == "search_budget_exhausted"
                assert "SEARCH_BUDGET_DAILY" in error["message"] and "2 of 2" in error["message"]
                assert int(over.headers["Retry-After"]) >= 1
                # Without search the key still chats.
                unsearched = {**ask, "search": "off"}
                assert (await client.post(SEND, json=unsearched)).status_code == 200
            assert len(standin.received) == 2

            async with daemon.client(alice) as client:
                refused = await client.post(SEND, json=ask)
                assert refused.status_code == 403, refused.text
                error = refused.json()["error"]
                assert error["code"] == "search_not_allowed"
                assert "APPLIANCE_SEARCH_ALLOW" in error["message"]
            # The budget is per key: the admin key has its own.
            async with daemon.client() as client:
                assert (await client.post(SEND, json=ask)).status_code == 200
            assert len(standin.received) == 3


async def test_disabled_search_is_403_and_sends_nothing() -> None:
    with trio.fail_after(120):
        async with searxng_standin() as standin:
            # The provider's URL is configured, but the switch is off.
            env = {"APPLIANCE_SEARCH_URL": standin.url}
            async with running_daemon(env) as daemon, daemon.client() as client:
                for mode in ("always", "auto"):
                    refused = await client.post(
                        SEND, json={"message": "Who wrote Hamlet?", "search": mode}
                    )
                    assert refused.status_code == 403, refused.text
                    error = refused.json()["error"]
                    assert error["code"] == "search_disabled" and error["param"] == "search"
                    assert "SEARCH_ENABLED=false" in error["message"]
                off = await client.post(
                    SEND, json={"message": "Who wrote Hamlet?", "search": "off", "max_tokens": 2}
                )
                assert off.status_code == 200
                services = (await client.get("/api/v1/health/services")).json()["services"]
                assert "search" not in [s["name"] for s in services]
            assert standin.received == []
