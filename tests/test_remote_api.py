"""The remote LLM through our API: one appliance forwards `remote:` requests to a second
appliance (a real OpenAI-compatible server). Between them runs a small TCP relay that
records every byte that leaves the first box and can stall or cut the remote's answer on
cue: it stands for the network, not for a part of this product.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import openai
import trio

from tests.harness import Daemon, running_daemon, short_tempdir

SECRET_WORDS = "mail me at alice.smith@example.com or call +1 415 555 0100"
PRICE_PER_1K = 10.0  # 0.01 a token: budgets in the tests run out after a few requests


@dataclass
class Relay:
    """A loopback TCP relay to `target`: `sent` is what the client sent through it
    (`forwarded` is set each time a JSON body has passed); `hold` keeps the answers back
    until set; `cut_after` closes a connection once that many bytes of answer passed."""

    target: int
    sent: bytearray = field(default_factory=bytearray)
    forwarded: trio.Event = field(default_factory=trio.Event)
    hold: trio.Event | None = None
    cut_after: int | None = None
    port: int = 0

    async def connection(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._upstream, client, server)
            await self._downstream(server, client)
            nursery.cancel_scope.cancel()

    async def _upstream(self, client: trio.SocketStream, server: trio.SocketStream) -> None:
        try:
            while data := await client.receive_some():
                self.sent += data
                await server.send_all(data)
                if data.endswith(b"}"):
                    self.forwarded.set()
        except trio.BrokenResourceError:
            pass

    async def _downstream(self, server: trio.SocketStream, client: trio.SocketStream) -> None:
        passed = 0
        try:
            while data := await server.receive_some():
                if self.hold is not None:
                    await self.hold.wait()
                if self.cut_after is not None and passed + len(data) >= self.cut_after:
                    await client.send_all(data[: max(self.cut_after - passed, 1)])
                    return
                passed += len(data)
                await client.send_all(data)
        except trio.BrokenResourceError:
            pass


@asynccontextmanager
async def relay_to(target_url: str) -> AsyncIterator[Relay]:
    relay = Relay(int(target_url.rsplit(":", 1)[1]))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, relay.connection, 0, host="127.0.0.1")
        )
        relay.port = listeners[0].socket.getsockname()[1]
        yield relay
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def forwarding_pair(**settings: str) -> AsyncIterator[tuple[Daemon, Daemon, Relay]]:
    """(local appliance with the remote LLM on, the remote appliance, the relay between)."""
    async with running_daemon() as remote, relay_to(remote.url) as relay:
        folder = short_tempdir("rk")
        key_file = folder / "remote.key"
        key_file.write_text(await remote.create_key("forwarder") + "\n")
        key_file.chmod(0o600)
        env = {
            "REMOTE_LLM_ENABLED": "true",
            "APPLIANCE_REMOTE_LLM_URL": f"http://127.0.0.1:{relay.port}/v1",
            "APPLIANCE_REMOTE_LLM_MODEL": "tiny",
            "APPLIANCE_REMOTE_LLM_KEY_FILE": str(key_file),
            "APPLIANCE_REMOTE_TIMEOUT": "20",
            "APPLIANCE_REMOTE_PRICE_PER_1K_TOKENS": str(PRICE_PER_1K),
            **settings,
        }
        async with running_daemon(env) as local:
            yield local, remote, relay


def _openai_calls(base_url: str, api_key: str) -> dict[str, Any]:
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    messages = [{"role": "user", "content": SECRET_WORDS}]
    chat = client.chat.completions.create(
        model="remote:tiny", messages=messages, max_tokens=6, temperature=0
    )
    stream = client.chat.completions.create(
        model="remote:tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    return {
        "models": [m.id for m in client.models.list()],
        "chat": chat,
        "chunks": list(stream),
    }


async def test_remote_model_end_to_end_redacted_and_counted() -> None:
    with trio.fail_after(120):
        async with forwarding_pair() as (local, remote, relay):
            user = await local.create_key("alice")
            results = await trio.to_thread.run_sync(
                _openai_calls, local.url + "/v1", user, abandon_on_cancel=True
            )
            assert "remote:tiny" in results["models"] and "tiny" in results["models"]
            chat = results["chat"]
            assert chat.model == "remote:tiny"
            assert 1 <= chat.usage.completion_tokens <= 6
            chunks = results["chunks"]
            # The same greedy answer, streamed through both appliances.
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert streamed == chat.choices[0].message.content
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
            assert chunks[-1].usage == chat.usage

            # What left the box: the remote's model name and key, never the words
            # redaction removes, never the local key.
            wire = bytes(relay.sent)
            assert b'"model":"tiny"' in wire
            assert wire.count(b"[EMAIL]") == 2 and wire.count(b"[PHONE]") == 2
            assert b"alice.smith" not in wire and b"555 0100" not in wire
            assert user.encode() not in wire and local.api_key.encode() not in wire

            async with local.client(key=user) as client:
                # The chat API serves the remote model too and keeps the conversation.
                sent = await client.post(
                    "/api/v1/chat/send",
                    json={"message": "hello there", "model": "remote:tiny", "max_tokens": 4},
                )
                assert sent.status_code == 200, sent.text
                assert sent.json()["model"] == "remote:tiny"
                kept = await client.get(f"/api/v1/conversations/{sent.json()['conversation_id']}")
                assert kept.json()["model"] == "remote:tiny"
                assert len(kept.json()["messages"]) == 2

                # Text completions are not forwarded: the remote is a chat model.
                completion = await client.post(
                    "/v1/completions", json={"model": "remote:tiny", "prompt": "the"}
                )
                assert completion.status_code == 400
                assert "/v1/chat/completions" in completion.json()["error"]["message"]
                other = await client.post(
                    "/v1/chat/completions",
                    json={"model": "remote:gpt-x", "messages": [{"role": "user", "content": "x"}]},
                )
                assert other.status_code == 404
                assert "remote:tiny" in other.json()["error"]["message"]

                usage = (await client.get("/api/v1/usage")).json()
            assert usage["local"]["month"] == 0
            remote_tokens = usage["remote"]["month"]
            assert remote_tokens > 0
            # Spending is counted at the configured price, for the key and the appliance.
            assert usage["remote"]["cost_month"] == round(remote_tokens * PRICE_PER_1K / 1000, 6)
            assert usage["remote_spending"]["month"] >= usage["remote"]["cost_month"]

            # The remote appliance counted the forwarded requests against its own key.
            async with remote.client() as admin:
                listed = await admin.get("/api/v1/health/services")
            assert listed.status_code == 200


async def test_remote_model_gets_response_format_and_refuses_tools_by_name() -> None:
    with trio.fail_after(120):
        async with forwarding_pair() as (local, _, relay), local.client() as client:
            question = [{"role": "user", "content": "the water"}]
            answer = await client.post(
                "/v1/chat/completions",
                json={
                    "model": "remote:tiny",
                    "messages": question,
                    "max_tokens": 12,
                    "temperature": 0,
                    "frequency_penalty": 0.5,
                    "response_format": {"type": "json_object"},
                },
            )
            assert answer.status_code == 200, answer.text
            # The remote (an appliance too) constrained its answer: it parses.
            assert isinstance(json.loads(answer.json()["choices"][0]["message"]["content"]), dict)
            wire = bytes(relay.sent)
            assert b'"response_format":{"type":"json_object"}' in wire
            assert b'"frequency_penalty":0.5' in wire
            tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
            for extra, param in (
                ({"tools": [tool]}, "tools"),
                ({"logprobs": True}, "logprobs"),
                ({"grammar": 'root ::= "a"'}, "grammar"),
                (
                    {
                        "messages": [
                            *question,
                            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
                        ]
                    },
                    "messages",
                ),
            ):
                refused = await client.post(
                    "/v1/chat/completions",
                    json={"model": "remote:tiny", "messages": question, **extra},
                )
                assert refused.status_code == 400, (param, refused.text)
                assert refused.json()["error"]["param"] == param


async def test_token_and_spending_budgets_stop_remote_requests() -> None:
    with trio.fail_after(120):
        async with forwarding_pair(APPLIANCE_REMOTE_BUDGET_MONTHLY="1.0") as (local, _, _):
            # 1.0 at 0.01 a token: about 100 tokens for the whole appliance this month.
            spenders = [await local.create_key(f"spender-{n}") for n in range(2)]
            refusal: dict[str, Any] = {}
            for attempt in range(30):
                async with local.client(key=spenders[attempt % 2]) as client:
                    answer = await client.post(
                        "/v1/chat/completions",
                        json={
                            "model": "remote:tiny",
                            "messages": [{"role": "user", "content": "tell me"}],
                            "max_tokens": 8,
                        },
                    )
                if answer.status_code == 429:
                    refusal = answer.json()["error"]
                    break
                assert answer.status_code == 200, answer.text
            assert refusal["code"] == "budget_exhausted"
            assert "APPLIANCE_REMOTE_BUDGET_MONTHLY" in refusal["message"]
            async with local.client() as admin:
                spent = (await admin.get("/api/v1/usage")).json()["remote_spending"]
            assert spent["budget_monthly"] == 1.0
            # Refused once what is left cannot pay for the smallest request (its estimated
            # prompt + 1 token, about 20 tokens here); over by at most one request's worth
            # (about 60 tokens: the remote counts the prompt after its chat template).
            request = 60 * PRICE_PER_1K / 1000
            assert 1.0 - request / 2 <= spent["month"] <= 1.0 + request
            # Local generation does not spend from the remote budget.
            async with local.client(key=spenders[0]) as client:
                still = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "tiny",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 4,
                    },
                )
            assert still.status_code == 200

        async with forwarding_pair() as (local, _, _):
            small = await local.create_key("small", tokens_per_day=40)
            async with local.client(key=small) as client:
                body = {
                    "model": "remote:tiny",
                    "messages": [{"role": "user", "content": "go on"}],
                    "max_tokens": 200,
                    "temperature": 0,
                }
                # The request that crosses the budget gets what was generated up to it.
                cut = await client.post("/v1/chat/completions", json=body)
                assert cut.status_code == 200, cut.text
                assert cut.json()["choices"][0]["finish_reason"] == "length"
                assert "remote token budget of this key ran out" in cut.json()["budget_exhausted"]
                before = await client.post("/v1/chat/completions", json=body)
                assert before.status_code == 429
                assert (
                    "the daily remote budget of this key is used up"
                    in (before.json()["error"]["message"])
                )
                assert int(before.headers["Retry-After"]) > 0
                usage = (await client.get("/api/v1/usage")).json()
            assert usage["remote"]["tokens_per_day"] == 40
            # At most one request's worth over (the prompt is estimated when reserving).
            assert 0 < usage["remote"]["day"] <= 40 + 40
            assert usage["local"]["day"] == 0


async def test_remote_going_away_mid_stream_and_stalling() -> None:
    with trio.fail_after(120):
        async with forwarding_pair(APPLIANCE_MAX_STREAMS_PER_KEY="1") as (local, _, relay):
            user = await local.create_key("bob")
            body = {
                "model": "remote:tiny",
                "messages": [{"role": "user", "content": "a long story"}],
                "max_tokens": 64,
                "stream": True,
            }
            # Headers and the first events pass, then the connection breaks.
            relay.cut_after = 700
            async with local.client(key=user) as client:
                answer = await client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200
            events = [line for line in answer.text.split("\n\n") if line.strip()]
            assert events[-1].startswith("event: error")
            error = json.loads(events[-1].split("data: ", 1)[1])["error"]
            assert error["code"].startswith("remote_") and "remote" in error["message"]
            assert "[DONE]" not in answer.text
            relay.cut_after = None

            # A stalled remote holds this key's only stream slot: a second stream of the
            # same key is refused, naming the limit; another key is not affected.
            relay.hold = trio.Event()
            async with trio.open_nursery() as nursery:
                held: dict[str, Any] = {}

                async def first() -> None:
                    async with local.client(key=user, timeout=30) as client:
                        held["answer"] = await client.post("/v1/chat/completions", json=body)

                relay.forwarded = trio.Event()
                nursery.start_soon(first)
                # Forwarded and waiting for the remote's answer: the slot is taken.
                await relay.forwarded.wait()
                async with local.client(key=user) as client:
                    second = await client.post(
                        "/v1/chat/completions", json={**body, "model": "tiny"}
                    )
                assert second.status_code == 429
                assert "APPLIANCE_MAX_STREAMS_PER_KEY" in second.json()["error"]["message"]
                other = await local.create_key("carol")
                async with local.client(key=other) as client:
                    third = await client.post(
                        "/v1/chat/completions", json={**body, "model": "tiny"}
                    )
                assert third.status_code == 200 and "[DONE]" in third.text
                relay.hold.set()
            assert held["answer"].status_code == 200 and "[DONE]" in held["answer"].text
            relay.hold = None
            # The slot is free again, and the appliance stayed ready throughout.
            async with local.client(key=user) as client:
                again = await client.post("/v1/chat/completions", json=body)
                ready = await client.get("/api/v1/health/ready")
            assert again.status_code == 200 and "[DONE]" in again.text
            assert ready.status_code == 200


async def test_remote_off_refuses_remote_models_clearly() -> None:
    with trio.fail_after(60):
        async with running_daemon() as daemon, daemon.client() as client:
            answer = await client.post(
                "/v1/chat/completions",
                json={"model": "remote:gpt-4o", "messages": [{"role": "user", "content": "x"}]},
            )
            assert answer.status_code == 403
            error = answer.json()["error"]
            assert error["code"] == "remote_llm_disabled"
            assert "REMOTE_LLM_ENABLED=false" in error["message"]
            listed = (await client.get("/v1/models")).json()["data"]
            assert [m["id"] for m in listed] == ["tiny"]


async def test_remote_settings_are_checked_before_anything_starts(tmp_path: Path) -> None:
    key_file = tmp_path / "remote.key"
    key_file.write_text("sk-test-key\n")
    key_file.chmod(0o644)
    cases = {
        "APPLIANCE_REMOTE_LLM_URL": {},
        "chmod 600": {
            "APPLIANCE_REMOTE_LLM_URL": "https://api.example.com/v1",
            "APPLIANCE_REMOTE_LLM_MODEL": "gpt-4o-mini",
            "APPLIANCE_REMOTE_LLM_KEY_FILE": str(key_file),
        },
    }
    for needle, settings in cases.items():
        state = tmp_path / needle.replace(" ", "-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env.update(
            {
                "REMOTE_LLM_ENABLED": "true",
                "APPLIANCE_STATE_DIR": str(state),
                "APPLIANCE_ENV_FILE": str(tmp_path / "none.env"),
                **settings,
            }
        )
        (tmp_path / "none.env").touch()
        done = await trio.run_process(
            [sys.executable, "-m", "appliance", "serve"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert done.returncode == 1
        assert needle in done.stderr.decode()
        assert "sk-test-key" not in done.stderr.decode()
        assert not state.exists()
