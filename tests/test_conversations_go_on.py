"""Long conversations and used-up budgets, on the real daemon with the tiny model.

Past the model's context a conversation goes on with its oldest turns left out of the
prompt (and says how many); the stored conversation keeps every turn. The request that
crosses a token budget gets what was generated up to the budget, and is charged for that.
A user key that names an unknown model is told only of the models it may use.
"""

from __future__ import annotations

import json
from typing import Any, Final

import trio

from tests.harness import running_daemon

CONTEXT: Final = 256
ANSWER: Final = 16
# About 50 tokens of the tiny model's vocabulary: five turns fill the context.
TURN_TEXT: Final = "the water is blue and the sky is blue " * 5


def _sse(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = "message", ""
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
        events.append((name, data if data == "[DONE]" else json.loads(data)))
    return events


async def test_past_the_context_older_turns_are_left_out_and_all_are_stored() -> None:
    env = {"APPLIANCE_CONTEXT_SIZE": str(CONTEXT)}
    with trio.fail_after(120):
        async with running_daemon(env) as daemon, daemon.client(timeout=30) as client:
            conversation_id = None
            left_out: list[int] = []
            sent: list[str] = []
            for turn in range(10):
                message = f"turn {turn}: {TURN_TEXT}"
                body: dict[str, Any] = {
                    "message": message,
                    "max_tokens": ANSWER,
                    "temperature": 0,
                    "system": "you are brief",
                }
                if conversation_id:
                    body["conversation_id"] = conversation_id
                answer = await client.post("/api/v1/chat/send", json=body)
                assert answer.status_code == 200, (turn, answer.text)
                reply = answer.json()
                conversation_id = reply["conversation_id"]
                sent += [message, reply["message"]["content"]]
                left_out.append(reply.get("turns_left_out", 0))
                # The prompt always leaves the answer its room.
                assert reply["usage"]["prompt_tokens"] + ANSWER <= CONTEXT
            assert left_out[0] == 0
            assert left_out[-1] > 0
            assert left_out == sorted(left_out)  # more is left out as the talk goes on

            stored = (await client.get(f"/api/v1/conversations/{conversation_id}")).json()
            assert stored["message_count"] == 20
            assert [m["content"] for m in stored["messages"]] == sent

            # Streamed, the `done` event says it too.
            streamed = await client.post(
                "/api/v1/chat/send",
                json={
                    "message": TURN_TEXT,
                    "max_tokens": ANSWER,
                    "conversation_id": conversation_id,
                    "stream": True,
                },
            )
            done = [data for name, data in _sse(streamed.text) if name == "done"]
            assert done and done[0]["turns_left_out"] > 0, streamed.text

            # The OpenAI API leaves out the oldest of the messages it is sent, the same way.
            messages: list[dict[str, str]] = [{"role": "system", "content": "be brief"}]
            for n in range(8):
                messages += [
                    {"role": "user", "content": f"question {n}: {TURN_TEXT}"},
                    {"role": "assistant", "content": f"answer {n}: {TURN_TEXT}"},
                ]
            messages.append({"role": "user", "content": "and now?"})
            request = {"model": "tiny", "messages": messages, "max_tokens": ANSWER}
            completion = await client.post("/v1/chat/completions", json=request)
            assert completion.status_code == 200, completion.text
            turns = completion.json()["turns_left_out"]
            assert 0 < turns < 17 and turns % 2 == 0  # whole exchanges, starting at a question
            chunks = _sse(
                (await client.post("/v1/chat/completions", json={**request, "stream": True})).text
            )
            last = [data for _, data in chunks if data != "[DONE]" and data["choices"]]
            assert last[-1]["choices"][0]["finish_reason"] == "length"
            assert last[-1]["turns_left_out"] == turns
            short = await client.post(
                "/v1/chat/completions",
                json={"model": "tiny", "messages": messages[-1:], "max_tokens": ANSWER},
            )
            assert "turns_left_out" not in short.json()  # OpenAI's shape when nothing is

            # One message that cannot fit by itself is still a clear 400.
            alone = await client.post(
                "/api/v1/chat/send",
                json={"message": TURN_TEXT * 20, "conversation_id": conversation_id},
            )
            assert alone.status_code == 400, alone.text
            error = alone.json()["error"]
            assert error["code"] == "context_length_exceeded"
            assert "Shorten the message" in error["message"]


async def test_the_request_that_crosses_a_budget_gets_its_answer_and_pays_for_it() -> None:
    with trio.fail_after(120):
        async with running_daemon() as daemon:
            for path in ("/api/v1/chat/send", "/v1/chat/completions", "/v1/completions"):
                key = await daemon.create_key(f"small{path.replace('/', '-')}", tokens_per_day=60)
                body: dict[str, Any] = {"max_tokens": 400, "temperature": 0}
                if path == "/api/v1/chat/send":
                    body["message"] = "hi"
                elif path == "/v1/chat/completions":
                    body |= {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
                else:
                    body |= {"model": "tiny", "prompt": "hi"}
                async with daemon.client(key=key) as client:
                    answer = await client.post(path, json=body)
                    assert answer.status_code == 200, (path, answer.text)
                    reply = answer.json()
                    finish = reply.get("finish_reason") or reply["choices"][0]["finish_reason"]
                    assert finish == "length"
                    assert "local token budget of this key ran out" in reply["budget_exhausted"]
                    assert 0 < reply["usage"]["completion_tokens"] < 400
                    # Charged what the answer used, nothing for what was thrown away.
                    usage = (await client.get("/api/v1/usage")).json()["local"]
                    assert usage["day"] == reply["usage"]["total_tokens"], (path, usage)
                    if path == "/api/v1/chat/send":
                        conversation = reply["conversation_id"]
                        stored = (await client.get(f"/api/v1/conversations/{conversation}")).json()
                        assert stored["messages"][1]["content"] == reply["message"]["content"]
                    # The budget is used: the next request is refused, naming it.
                    refused = await client.post(path, json=body)
                    assert refused.status_code == 429
                    assert refused.json()["error"]["code"] == "budget_exhausted"

            # Streamed, the last chunk says so.
            key = await daemon.create_key("small-stream", tokens_per_day=60)
            async with daemon.client(key=key) as client:
                streamed = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "tiny",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 400,
                        "stream": True,
                    },
                )
            chunks = [data for _, data in _sse(streamed.text) if data != "[DONE]"]
            assert all("error" not in chunk for chunk in chunks), streamed.text
            last = [chunk for chunk in chunks if chunk["choices"]][-1]
            assert last["choices"][0]["finish_reason"] == "length"
            assert "local token budget of this key ran out" in last["budget_exhausted"]


async def test_a_user_key_is_told_only_of_the_models_it_may_use() -> None:
    with trio.fail_after(60):
        async with running_daemon() as daemon:
            (daemon.state_dir / "models" / "broken.gguf").write_bytes(b"GGML" + bytes(64))
            user = await daemon.create_key("user")
            async with daemon.client(key=user) as client:
                unknown = await client.post(
                    "/api/v1/chat/send", json={"message": "x", "model": "nope"}
                )
                failed = await client.post(
                    "/v1/chat/completions",
                    json={"model": "broken", "messages": [{"role": "user", "content": "x"}]},
                )
            assert unknown.status_code == 404
            message = unknown.json()["error"]["message"]
            assert "'nope'" in message and "may use: tiny" in message
            assert "broken" not in message
            assert failed.status_code == 503
            message = failed.json()["error"]["message"]
            assert "may use: tiny" in message
            assert "magic" not in message and "verify" not in message
            for answer in (unknown, failed):
                assert str(daemon.state_dir) not in answer.text
            # An admin key sees every installed model, as GET /api/v1/models shows them.
            async with daemon.client() as admin:
                seen = await admin.post("/api/v1/chat/send", json={"message": "x", "model": "nope"})
            assert seen.status_code == 404
            assert "broken" in seen.json()["error"]["message"]
