"""Several resident models on the real daemon: one worker process each, a memory budget,
keep-alive, load/unload/ps, and a crash that takes one model down only.

The two real models are the default one (SmolLM2-135M-Instruct) and Gemma 3 270M; the tiny
test model (and copies of it under other names) is used where only the pool's bookkeeping
matters. The tests assert what the API and the processes show, never how fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from appliance.llm import huge_pages
from appliance.llm.registry import ModelRegistry
from tests.harness import (
    Daemon,
    free_port,
    install_tiny_model,
    pid_alive,
    running_daemon,
    short_tempdir,
)
from tests.real_model import install_gemma, install_smollm2

# Tiny models each count about 71 MB against the budget (most of it the worker process
# itself): 100 MB holds one, 150 MB two.
ONE_TINY = "100mb"
TWO_TINY = "150mb"


@asynccontextmanager
async def daemon_with(
    models: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> AsyncIterator[Daemon]:
    """A daemon whose models dir holds `models` (name -> an install function)."""
    state_dir = short_tempdir()
    for name, install in models.items():
        install(state_dir / "models", name)
    async with running_daemon(env or {}, with_model=False, state_dir=state_dir) as daemon:
        try:
            yield daemon
        except BaseException:
            lines = daemon.log_path.read_text().splitlines()[-40:]
            print("daemon log (last 40 lines):", *lines, sep="\n")
            raise


def tiny(seed: int) -> Any:
    return lambda models_dir, name: install_tiny_model(models_dir, name, seed=seed)


async def resident(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    answer = await client.get("/api/v1/models/resident")
    assert answer.status_code == 200, answer.text
    return {model["name"]: model for model in answer.json()["models"]}


async def llm(client: httpx.AsyncClient) -> dict[str, Any]:
    figures: dict[str, Any] = (await client.get("/api/v1/health/metrics")).json()["llm"]
    return figures


async def services(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    listed = (await client.get("/api/v1/health/services")).json()["services"]
    return {service["name"]: service for service in listed}


async def complete(client: httpx.AsyncClient, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": "the", "max_tokens": 3, **extra}
    return await client.post("/v1/completions", json=body)


async def test_two_resident_models_alternate_without_loading_and_stream_together() -> None:
    def smollm2(models_dir: Path, name: str) -> None:
        install_smollm2(models_dir, name)
        # Without its shipped repeat penalty it answers this question at length.
        ModelRegistry(models_dir).set_defaults(name, {"repeat_penalty": None})

    env = {"APPLIANCE_PRELOAD": "smollm2,gemma"}
    with trio.fail_after(240):
        async with (
            daemon_with({"smollm2": smollm2, "gemma": install_gemma}, env) as daemon,
            daemon.client(timeout=None) as client,
        ):
            before = await resident(client)
            assert set(before) == {"smollm2", "gemma"}
            assert all(model["keep_alive"] == "forever" for model in before.values())
            loads = (await llm(client))["model_loads"]
            for _ in range(3):
                for name in ("smollm2", "gemma"):
                    answer = await complete(client, name, max_tokens=2)
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["model"] == name
            after = await resident(client)
            # No request loaded anything: the same processes, each loaded once.
            assert (await llm(client))["model_loads"] == loads == 2
            for name in ("smollm2", "gemma"):
                assert after[name]["loads"] == 1
                assert after[name]["pid"] == before[name]["pid"]

            # Two streams, one per model, at the same time: each makes progress while the
            # other runs (one model at a time would finish one stream before the other).
            # Both count on (SmolLM2 asked to, Gemma, a base model, continuing the count), long
            # enough that neither ends before the other has started.
            arrivals: list[tuple[float, str]] = []

            async def stream(name: str, path: str, body: dict[str, Any]) -> None:
                async with client.stream("POST", path, json=body) as sse:
                    assert sse.status_code == 200
                    async for line in sse.aiter_lines():
                        if line.startswith("data: {") and (
                            '"content":"' in line or '"text":"' in line
                        ):
                            arrivals.append((trio.current_time(), name))

            question = [{"role": "user", "content": "Count from 1 to 500, separated by commas."}]
            # Long enough that a first token delayed by the other model's start still comes
            # while the other streams (these small models write 100 tokens in about a second).
            common = {"max_tokens": 400, "temperature": 0, "stream": True}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    stream,
                    "smollm2",
                    "/v1/chat/completions",
                    {"model": "smollm2", "messages": question, **common},
                )
                nursery.start_soon(
                    stream,
                    "gemma",
                    "/v1/completions",
                    {"model": "gemma", "prompt": "Count from 1 to 500: 1, 2, 3,", **common},
                )
            last = {name: max(t for t, n in arrivals if n == name) for name in ("smollm2", "gemma")}
            for name, other in (("smollm2", "gemma"), ("gemma", "smollm2")):
                during = [t for t, n in arrivals if n == name and t < last[other]]
                assert len(during) >= 10, (name, arrivals)

            # What each counts against the budget holds against its worker's real RSS.
            figures = await resident(client)
            for name, model in figures.items():
                assert model["rss_bytes"] > 0
                ratio = model["estimated_bytes"] / model["rss_bytes"]
                assert 0.9 <= ratio <= 2.5, (name, model)
            metrics = await llm(client)
            assert (
                metrics["memory_used_bytes"]
                >= sum(max(m["estimated_bytes"], m["rss_bytes"]) for m in figures.values()) * 0.9
            )


async def test_keep_alive_0_unloads_after_the_request_and_a_wrong_one_is_named() -> None:
    env = {"APPLIANCE_PRELOAD": "false"}
    with trio.fail_after(90):
        async with daemon_with({"tiny": tiny(0)}, env) as daemon, daemon.client() as client:
            assert await resident(client) == {}
            kept = await complete(client, "tiny")
            assert kept.status_code == 200, kept.text
            assert set(await resident(client)) == {"tiny"}
            assert (await resident(client))["tiny"]["keep_alive"] == "5m"
            gone = await complete(client, "tiny", keep_alive=0)
            assert gone.status_code == 200, gone.text
            while await resident(client):  # noqa: ASYNC110 - the pool unloads it at once
                await trio.sleep(0.02)
            assert (await llm(client))["model_unloads"] == 1
            chat = await client.post(
                "/api/v1/chat/send", json={"message": "hi", "max_tokens": 3, "keep_alive": "-1"}
            )
            assert chat.status_code == 200, chat.text
            assert (await resident(client))["tiny"]["keep_alive"] == "forever"
            assert (await resident(client))["tiny"]["expires_in_seconds"] is None
            # /v1 answers a refused field 400, as OpenAI does; the chat API 422.
            for path, body, status in (
                ("/v1/completions", {"model": "tiny", "prompt": "a", "keep_alive": "soon"}, 400),
                ("/api/v1/chat/send", {"message": "a", "keep_alive": [1]}, 422),
            ):
                refused = await client.post(path, json=body)
                assert refused.status_code == status, refused.text
                assert refused.json()["error"]["param"] == "keep_alive"


async def test_an_idle_model_is_unloaded_when_its_keep_alive_runs_out() -> None:
    env = {"APPLIANCE_PRELOAD": "false", "APPLIANCE_KEEP_ALIVE": "1s"}
    with trio.fail_after(90):
        async with daemon_with({"tiny": tiny(0)}, env) as daemon, daemon.client() as client:
            answer = await complete(client, "tiny")
            assert answer.status_code == 200, answer.text
            shown = (await resident(client))["tiny"]
            assert shown["keep_alive"] == "1s"
            assert shown["expires_in_seconds"] is not None and shown["expires_in_seconds"] <= 1
            while await resident(client):  # noqa: ASYNC110
                await trio.sleep(0.05)
            lines = [line.get("message", "") for line in daemon.log_lines()]
            assert any("model tiny unloaded: idle for 1s" in line for line in lines)


async def test_a_budget_smaller_than_two_models_unloads_the_older_idle_one() -> None:
    models = {"one": tiny(1), "two": tiny(2), "three": tiny(3)}
    env = {"APPLIANCE_PRELOAD": "false", "APPLIANCE_MODEL_MEMORY": ONE_TINY}
    with trio.fail_after(90):
        async with daemon_with(models, env) as daemon, daemon.client() as client:
            assert (await complete(client, "one")).status_code == 200
            assert set(await resident(client)) == {"one"}
            assert (await complete(client, "two")).status_code == 200
            assert set(await resident(client)) == {"two"}
            lines = [line.get("message", "") for line in daemon.log_lines()]
            assert any(
                "model one unloaded: to make room for two (APPLIANCE_MODEL_MEMORY)" in line
                for line in lines
            )
            figures = await llm(client)
            assert figures["memory_used_bytes"] <= figures["memory_budget_bytes"]


async def test_the_least_recently_used_idle_model_makes_room() -> None:
    models = {"one": tiny(1), "two": tiny(2), "three": tiny(3)}
    env = {"APPLIANCE_PRELOAD": "false", "APPLIANCE_MODEL_MEMORY": TWO_TINY}
    with trio.fail_after(90):
        async with daemon_with(models, env) as daemon, daemon.client() as client:
            for name in ("one", "two", "one"):
                assert (await complete(client, name)).status_code == 200
            assert set(await resident(client)) == {"one", "two"}
            # "two" is now the least recently used.
            assert (await complete(client, "three")).status_code == 200
            assert set(await resident(client)) == {"one", "three"}


async def test_a_model_bigger_than_the_budget_is_refused_naming_both_figures() -> None:
    env = {"APPLIANCE_PRELOAD": "false", "APPLIANCE_MODEL_MEMORY": ONE_TINY}
    with trio.fail_after(90):
        async with (
            daemon_with({"tiny": tiny(0), "smollm2": install_smollm2}, env) as daemon,
            daemon.client() as client,
        ):
            assert (await complete(client, "tiny")).status_code == 200
            for answer in (
                await complete(client, "smollm2"),
                await client.post("/api/v1/models/smollm2/load"),
            ):
                assert answer.status_code == 507, answer.text
                error = answer.json()["error"]
                assert error["code"] == "model_too_large"
                assert "model smollm2 needs about" in error["message"]
                assert "the memory budget is 100 MB (APPLIANCE_MODEL_MEMORY)" in error["message"]
            # The refusal unloaded nothing.
            assert set(await resident(client)) == {"tiny"}


async def test_kill9_of_one_models_worker_leaves_the_other_serving() -> None:
    env = {"APPLIANCE_PRELOAD": "one,two"}
    with trio.fail_after(90):
        async with (
            daemon_with({"one": tiny(1), "two": tiny(2)}, env) as daemon,
            daemon.client() as client,
        ):
            before = await services(client)
            victim = before["worker:one"]["pid"]
            os.kill(victim, signal.SIGKILL)
            # The other model answers at once, from the same process as before.
            answer = await complete(client, "two")
            assert answer.status_code == 200, answer.text
            while (await services(client))["worker:one"]["pid"] in (None, victim):  # noqa: ASYNC110
                await trio.sleep(0.05)
            after = await services(client)
            assert after["worker:one"]["restarts"] == 1
            assert "SIGKILL" in after["worker:one"]["last_error"]
            assert after["worker:two"]["restarts"] == 0
            assert after["worker:two"]["pid"] == before["worker:two"]["pid"]
            assert not pid_alive(victim)
            assert (await complete(client, "one")).status_code == 200
            assert (await llm(client))["worker_crashes"] == 1


def _cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "models", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_load_unload_and_ps_through_the_api_and_the_cli() -> None:
    # The CLI finds the daemon at APPLIANCE_BIND: a port of its own, not 0.
    env = {"APPLIANCE_PRELOAD": "false", "APPLIANCE_BIND": f"127.0.0.1:{free_port()}"}
    with trio.fail_after(120):
        async with (
            daemon_with({"one": tiny(1), "two": tiny(2)}, env) as daemon,
            daemon.client() as client,
        ):
            loaded = await client.post("/api/v1/models/one/load", json={"keep_alive": "-1"})
            assert loaded.status_code == 200, loaded.text
            assert loaded.json()["keep_alive"] == "forever"
            assert loaded.json()["pid"] > 0
            done = await trio.to_thread.run_sync(
                _cli, daemon.env, "load", "two", "--keep-alive", "10m"
            )
            assert done.returncode == 0, done.stderr
            assert "two loaded" in done.stdout and "keep-alive 10m" in done.stdout
            ps = await trio.to_thread.run_sync(_cli, daemon.env, "ps")
            assert ps.returncode == 0, ps.stderr
            lines = ps.stdout.splitlines()
            assert lines[0].split()[:4] == ["NAME", "STATE", "PID", "MEMORY"]
            assert {line.split()[0] for line in lines[1:3]} == {"one", "two"}
            assert "APPLIANCE_MODEL_MEMORY" in lines[-1]
            as_json = json.loads(
                (await trio.to_thread.run_sync(_cli, daemon.env, "ps", "--json")).stdout
            )
            assert {m["name"] for m in as_json["models"]} == {"one", "two"}

            # Busy: the unload waits for the running request (202), then happens.
            async with client.stream(
                "POST",
                "/v1/completions",
                json={"model": "one", "prompt": "the", "max_tokens": 400, "stream": True},
            ) as sse:
                await sse.aiter_lines().__anext__()
                busy = await client.post("/api/v1/models/one/unload")
                assert busy.status_code in (200, 202), busy.text
            while "one" in await resident(client):  # noqa: ASYNC110
                await trio.sleep(0.05)
            done = await trio.to_thread.run_sync(_cli, daemon.env, "unload", "two")
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == "two unloaded"
            assert await resident(client) == {}
            missing = await client.post("/api/v1/models/two/unload")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_resident"
            unknown = await client.post("/api/v1/models/nope/load")
            assert unknown.status_code == 404
            assert "installed: one, two" in unknown.json()["error"]["message"]
            failed = await trio.to_thread.run_sync(_cli, daemon.env, "unload", "two")
            assert failed.returncode == 1
            assert "not resident" in failed.stderr
            user = await daemon.create_key("someone")
            for method, path in (
                ("POST", "/api/v1/models/one/load"),
                ("GET", "/api/v1/models/resident"),
            ):
                refused = await client.request(
                    method, path, headers={"Authorization": f"Bearer {user}"}
                )
                assert refused.status_code == 403


async def test_preloaded_models_are_resident_at_ready_and_reported() -> None:
    env = {"APPLIANCE_PRELOAD": "one,two"}
    with trio.fail_after(90):
        async with (
            daemon_with({"one": tiny(1), "two": tiny(2)}, env) as daemon,
            daemon.client() as client,
        ):
            ready = (await client.get("/api/v1/health/ready")).json()
            models = next(check for check in ready["checks"] if check["name"] == "models")
            assert models["state"] == "ok"
            assert "resident: one (" in models["detail"] and "two (" in models["detail"]
            async with httpx.AsyncClient(base_url=daemon.url) as anonymous:
                general = (await anonymous.get("/api/v1/health/ready")).json()
            shown = next(check for check in general["checks"] if check["name"] == "models")
            assert "one" not in shown["detail"]
            figures = await llm(client)
            assert {m["name"] for m in figures["resident"]} == {"one", "two"}
            text = (await client.get("/api/v1/health/metrics?format=prometheus")).text
            assert "appliance_llm_resident_models 2.0" in text
            assert 'appliance_llm_model_memory_bytes{kind="estimated",model="one"}' in text
            assert 'appliance_process_rss_bytes{process="worker:two"}' in text
            listed = (await client.get("/api/v1/models")).json()
            assert all(model["loaded"] for model in listed["models"])


async def test_a_workers_weights_are_read_into_huge_pages_not_mapped_from_the_file() -> None:
    if huge_pages.kernel_mode() not in ("always", "madvise"):
        pytest.skip("the kernel gives no transparent huge pages here")
    with trio.fail_after(120):
        async with (
            daemon_with({"smollm2": install_smollm2}) as daemon,
            daemon.client(timeout=None) as client,
        ):
            answer = await complete(client, "smollm2", max_tokens=4)
            assert answer.status_code == 200, answer.text
            pid = (await resident(client))["smollm2"]["pid"]
            maps = await trio.Path(f"/proc/{pid}/maps").read_text()
            assert ".gguf" not in maps, "the GGUF file is still mapped"
            rollup = await trio.Path(f"/proc/{pid}/smaps_rollup").read_text()
            huge_kb = int(rollup.split("AnonHugePages:", 1)[1].split()[0])
            # SmolLM2's weights are 98 MB, and with the KV cache and buffers about 220 MB lie
            # in huge pages; at least half the weights' worth, where fragmented memory may
            # leave the kernel short of huge pages (none at all without the change).
            assert huge_kb * 1024 >= 49_000_000, rollup
