"""Chat, conversations and the OpenAI-compatible API on the real daemon with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import trio

from tests.harness import install_tiny_model, running_daemon, short_tempdir


def _sse_events(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = "message", ""
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = line[len("data: ") :]
        events.append((name, data if data == "[DONE]" else json.loads(data)))
    return events


async def test_chat_send_stores_both_sides_and_follow_ups_use_history() -> None:
    with trio.fail_after(60):
        async with running_daemon() as daemon, daemon.client() as client:
            first = await client.post(
                "/api/v1/chat/send", json={"message": "the water is", "max_tokens": 8}
            )
            assert first.status_code == 200, first.text
            body = first.json()
            conversation_id = body["conversation_id"]
            assert body["model"] == "tiny"
            assert body["message"]["role"] == "assistant"
            assert body["usage"]["completion_tokens"] >= 1
            assert body["finish_reason"] in ("length", "stop")

            second = await client.post(
                "/api/v1/chat/send",
                json={"message": "and blue", "max_tokens": 4, "conversation_id": conversation_id},
            )
            assert second.status_code == 200
            # The follow-up's prompt holds the first exchange too.
            assert second.json()["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]

            stored = (await client.get(f"/api/v1/conversations/{conversation_id}")).json()
            assert stored["message_count"] == 4
            assert [m["role"] for m in stored["messages"]] == [
                "user",
                "assistant",
                "user",
                "assistant",
            ]
            assert stored["messages"][0]["content"] == "the water is"
            assert stored["messages"][1]["content"] == body["message"]["content"]
            assert stored["title"] == "the water is"


async def test_streamed_chat_send_and_conversation_crud() -> None:
    with trio.fail_after(60):
        async with running_daemon() as daemon, daemon.client() as client:
            ids = []
            for text in ("first question", "second question"):
                response = await client.post(
                    "/api/v1/chat/send", json={"message": text, "max_tokens": 6, "stream": True}
                )
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                events = _sse_events(response.text)
                tokens = [data["text"] for name, data in events if name == "token"]
                done = [data for name, data in events if name == "done"]
                assert tokens and len(done) == 1
                ids.append(done[0]["conversation_id"])
                stored = (await client.get(f"/api/v1/conversations/{ids[-1]}")).json()
                assert stored["messages"][1]["content"] == "".join(tokens)

            listing = (await client.get("/api/v1/conversations")).json()
            assert listing["total"] == 2
            assert [c["id"] for c in listing["conversations"]] == list(reversed(ids))
            page = (
                await client.get("/api/v1/conversations", params={"limit": 1, "offset": 1})
            ).json()
            assert [c["id"] for c in page["conversations"]] == [ids[0]]
            bad_page = await client.get("/api/v1/conversations", params={"limit": 1000})
            assert bad_page.status_code == 400

            deleted = await client.delete(f"/api/v1/conversations/{ids[0]}")
            assert deleted.json() == {"deleted": ids[0], "messages_removed": 2}
            assert (await client.get(f"/api/v1/conversations/{ids[0]}")).status_code == 404
            assert (await client.delete(f"/api/v1/conversations/{ids[0]}")).status_code == 404
            assert (await client.get("/api/v1/conversations")).json()["total"] == 1
            missing = await client.post(
                "/api/v1/chat/send", json={"message": "hi", "conversation_id": "../../etc"}
            )
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "conversation_not_found"


def _openai_calls(base_url: str, api_key: str) -> dict[str, Any]:
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    results: dict[str, Any] = {}
    results["models"] = [m.id for m in client.models.list()]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the water"}], max_tokens=6
    )
    results["chat"] = chat
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "the"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    results["chunks"] = list(stream)
    results["completion"] = client.completions.create(model="tiny", prompt="the", max_tokens=5)
    results["completion_stream"] = list(
        client.completions.create(model="tiny", prompt="the", max_tokens=5, stream=True)
    )
    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    except openai.NotFoundError as exc:
        results["unknown_model"] = exc
    return results


async def test_official_openai_client_streaming_and_not() -> None:
    with trio.fail_after(60):
        async with running_daemon() as daemon:
            results = await trio.to_thread.run_sync(
                _openai_calls, daemon.url + "/v1", daemon.api_key
            )
    assert results["models"] == ["tiny"]
    chat = results["chat"]
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.usage.completion_tokens >= 1
    chunks = results["chunks"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert results["completion"].choices[0].text
    assert "".join(c.choices[0].text for c in results["completion_stream"])
    error = results["unknown_model"]
    assert error.status_code == 404
    assert error.body["code"] == "model_not_found"
    assert "no-such-model" in error.body["message"]


async def _post(client: httpx.AsyncClient, path: str, **kwargs: Any) -> httpx.Response:
    return await client.post(path, **kwargs)


async def test_bad_input_gets_clear_errors_and_nothing_breaks() -> None:
    with trio.fail_after(60):
        async with running_daemon() as daemon, daemon.client() as client:
            cases = [
                ("/api/v1/chat/send", {"content": b"{not json"}, 400, "invalid_json"),
                ("/api/v1/chat/send", {"content": b'{"message": "\xff\xfe"}'}, 400, "invalid_json"),
                ("/api/v1/chat/send", {"content": b""}, 400, "empty_body"),
                ("/api/v1/chat/send", {"json": {"text": "hi"}}, 422, "invalid_field"),
                ("/api/v1/chat/send", {"json": {"message": ""}}, 422, "invalid_field"),
                (
                    "/api/v1/chat/send",
                    {"json": {"message": "x", "max_tokens": -5}},
                    422,
                    "invalid_field",
                ),
                (
                    "/api/v1/chat/send",
                    {"json": {"message": "x", "max_tokens": 10**9}},
                    422,
                    "invalid_field",
                ),
                (
                    "/api/v1/chat/send",
                    {"json": {"message": "x", "temperature": 9}},
                    422,
                    "invalid_field",
                ),
                (
                    "/api/v1/chat/send",
                    {"json": {"message": "x", "model": "nope"}},
                    404,
                    "model_not_found",
                ),
                (
                    "/api/v1/chat/send",
                    {"json": {"message": "x", "model": "../etc/passwd"}},
                    404,
                    "model_not_found",
                ),
                (
                    "/v1/chat/completions",
                    {
                        "json": {
                            "model": "tiny",
                            "messages": [{"role": "user", "content": "x"}],
                            "n": 2,
                        }
                    },
                    # /v1 answers as OpenAI does: 400 for every invalid field.
                    400,
                    "invalid_field",
                ),
                (
                    "/v1/chat/completions",
                    {"json": {"model": "tiny", "messages": []}},
                    400,
                    "invalid_field",
                ),
                (
                    "/v1/completions",
                    {"json": {"model": "tiny", "prompt": ["a", "b"]}},
                    400,
                    "invalid_field",
                ),
                # Far longer than the tiny model's 512-token context.
                (
                    "/api/v1/chat/send",
                    {"json": {"message": "the water is blue " * 400}},
                    400,
                    "context_length_exceeded",
                ),
            ]
            for path, kwargs, status, code in cases:
                response = await _post(client, path, **kwargs)
                assert response.status_code == status, (path, kwargs, response.text)
                error = response.json()["error"]
                assert error["code"] == code, (kwargs, error)
                assert error["message"]
                assert "Traceback" not in response.text and "/tmp" not in response.text
            huge = await _post(
                client, "/api/v1/chat/send", json={"message": "x", "max_tokens": 10**9}
            )
            assert "APPLIANCE_MAX_TOKENS" in huge.json()["error"]["message"]
            field = await _post(client, "/api/v1/chat/send", json={"text": "hi"})
            assert "text" in field.json()["error"]["message"]
            assert "message" in field.json()["error"]["message"]
            # A streamed request that cannot start gets its real status, not a 200 stream.
            too_long = await _post(
                client, "/api/v1/chat/send", json={"message": "blue " * 2000, "stream": True}
            )
            assert too_long.status_code == 400
            ok = await _post(client, "/api/v1/chat/send", json={"message": "the", "max_tokens": 3})
            assert ok.status_code == 200
            assert (await client.get("/api/v1/health/ready")).status_code == 200
            services = (await client.get("/api/v1/health/services")).json()["services"]
            assert all(s["restarts"] == 0 for s in services)


def _malformed_corpus(directory: Path, valid: bytes) -> list[str]:
    """Hostile files dropped straight into the models dir; none may reach llama.cpp."""
    files = {
        "four-bytes": b"GGUF",
        "bad-magic": b"GGML" + valid[4:],
        "bad-version": valid[:4] + (99).to_bytes(4, "little") + valid[8:],
        "huge-counts": valid[:8] + (2**62).to_bytes(8, "little") + valid[16:],
        "truncated": valid[: len(valid) // 2],
        "empty": b"",
    }
    for name, data in files.items():
        (directory / f"{name}.gguf").write_bytes(data)
    return sorted(files)


async def test_malformed_models_are_refused_and_the_daemon_stays_ready() -> None:
    state_models: Path | None = None
    with trio.fail_after(60):
        async with running_daemon() as daemon, daemon.client() as client:
            state_models = daemon.state_dir / "models"
            valid = (state_models / "tiny.gguf").read_bytes()
            names = _malformed_corpus(state_models, valid)
            # Same bytes as a valid model but an architecture llama.cpp does not know:
            # it passes the header check and fails to load in the worker.
            (state_models / "alien.gguf").write_bytes(valid.replace(b"llama", b"lxama"))

            listed = {m["name"]: m for m in (await client.get("/api/v1/models")).json()["models"]}
            for name in names:
                assert listed[name]["state"] == "failed", name
                assert listed[name]["reason"], name
            assert listed["tiny"]["state"] == "ok"
            openai_ids = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
            assert "four-bytes" not in openai_ids

            refused = await client.post(
                "/api/v1/chat/send", json={"message": "x", "model": "bad-magic"}
            )
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "model_unavailable"

            alien = await client.post("/api/v1/chat/send", json={"message": "x", "model": "alien"})
            assert alien.status_code == 503, alien.text
            again = {m["name"]: m for m in (await client.get("/api/v1/models")).json()["models"]}
            assert again["alien"]["state"] == "failed"
            assert "load" in again["alien"]["reason"]
            # Marked failed: asking again does not try to load it again.
            assert (
                await client.post("/api/v1/chat/send", json={"message": "x", "model": "alien"})
            ).json()["error"]["code"] == "model_unavailable"

            ok = await client.post("/api/v1/chat/send", json={"message": "the", "max_tokens": 3})
            assert ok.status_code == 200
            assert (await client.get("/api/v1/health/ready")).status_code == 200


async def test_llm_figures_in_metrics() -> None:
    with trio.fail_after(60):
        async with running_daemon() as daemon, daemon.client() as client:
            await client.post("/api/v1/chat/send", json={"message": "the", "max_tokens": 5})
            llm = (await client.get("/api/v1/health/metrics")).json()["llm"]
            assert llm["loaded_model"] == "tiny"
            assert llm["completed"] == 1
            assert llm["tokens_generated"] >= 1
            assert llm["queue_depth"] == 0
            assert llm["time_to_first_token_seconds"]["p50"] is not None
            text = (await client.get("/api/v1/health/metrics?format=prometheus")).text
            assert "appliance_llm_queue_depth 0.0" in text
            assert "appliance_llm_completed 1.0" in text
            assert 'appliance_process_rss_bytes{process="worker:tiny"}' in text


async def test_without_models_ready_says_how_to_add_one() -> None:
    with trio.fail_after(60):
        async with running_daemon(with_model=False) as daemon, daemon.client() as client:
            ready = await client.get("/api/v1/health/ready")
            assert ready.status_code == 503
            models = next(c for c in ready.json()["checks"] if c["name"] == "models")
            assert "appliance models import" in models["detail"]
            chat = await client.post("/api/v1/chat/send", json={"message": "x"})
            assert chat.status_code == 503
            assert chat.json()["error"]["code"] == "no_model"
            # A model copied in while running is picked up at once.
            install_tiny_model(daemon.state_dir / "models")
            chat = await client.post("/api/v1/chat/send", json={"message": "the", "max_tokens": 2})
            assert chat.status_code == 200


async def test_chat_templates_from_the_model_run_sandboxed() -> None:
    state = short_tempdir()
    install_tiny_model(
        state / "models",
        name="templated",
        chat_template="{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "assistant:",
    )
    install_tiny_model(
        state / "models",
        name="hostile",
        chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}",
    )
    with trio.fail_after(60):
        async with (
            running_daemon({"APPLIANCE_DEFAULT_MODEL": "templated"}, state_dir=state) as daemon,
            daemon.client() as client,
        ):
            ok = await client.post("/api/v1/chat/send", json={"message": "the", "max_tokens": 3})
            assert ok.status_code == 200, ok.text
            listed = {m["name"]: m for m in (await client.get("/api/v1/models")).json()["models"]}
            assert listed["templated"]["has_chat_template"] is True
            hostile = await client.post(
                "/api/v1/chat/send", json={"message": "x", "model": "hostile", "max_tokens": 3}
            )
            assert hostile.status_code == 422, hostile.text
            assert hostile.json()["error"]["code"] == "template_error"
            assert "unsafe" in hostile.json()["error"]["message"]
            services = (await client.get("/api/v1/health/services")).json()["services"]
            assert all(s["restarts"] == 0 for s in services)
