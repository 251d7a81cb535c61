"""Per-model defaults: set with `appliance models set` and the admin API, kept in the
manifest, shown by `models list`, applied when a request does not say otherwise; and the
default model, which ships with defaults under which it answers and stops.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final

import openai
import trio

from appliance.llm.model_defaults import SMOLLM2_SHA256
from tests.harness import running_daemon, short_tempdir
from tests.real_model import install_smollm2

# What `make run` calls the default model (and names in APPLIANCE_DEFAULT_MODEL).
DEFAULT_MODEL: Final = "smollm2-135m-instruct"
QUESTIONS: Final = (
    "What is the capital of France?",
    "Name three colors.",
    "What is 2 + 2?",
    "Who wrote Romeo and Juliet?",
)


def _cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "models", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def repeated_sentence(text: str) -> str | None:
    """A sentence (or line) the text holds three times or more, if any."""
    pieces = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+|,\s*", text) if len(p.strip()) > 3]
    counts = Counter(pieces)
    worst = max(counts.items(), key=lambda item: item[1], default=("", 0))
    return worst[0] if worst[1] >= 3 else None


async def test_defaults_are_set_listed_and_applied_unless_the_request_says_otherwise() -> None:
    with trio.fail_after(120):
        async with running_daemon() as daemon, daemon.client() as client:
            body = {"model": "tiny", "prompt": "the cat", "max_tokens": 12, "seed": 5}
            explicit = await client.post("/v1/completions", json={**body, "temperature": 0})
            set_ = await trio.to_thread.run_sync(
                _cli, daemon.env, "set", "tiny", "temperature=0", "system=Answer in one word."
            )
            assert set_.returncode == 0, set_.stderr
            assert set_.stdout.strip() == 'tiny: system="Answer in one word." temperature=0.0'
            # The daemon reads the manifest again within a second.
            await trio.sleep(1.1)
            implicit = await client.post("/v1/completions", json=body)
            assert implicit.json()["choices"][0]["text"] == explicit.json()["choices"][0]["text"]
            hot = await client.post("/v1/completions", json={**body, "temperature": 2})
            assert hot.json()["choices"][0]["text"] != explicit.json()["choices"][0]["text"]

            # The system prompt goes first when the conversation has none of its own.
            bare = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
            with_default = await client.post("/v1/chat/completions", json={**bare, "max_tokens": 2})
            own = {
                "model": "tiny",
                "max_tokens": 2,
                "messages": [
                    {"role": "system", "content": "x"},
                    {"role": "user", "content": "hi"},
                ],
            }
            with_own = await client.post("/v1/chat/completions", json=own)
            assert (
                with_default.json()["usage"]["prompt_tokens"]
                > with_own.json()["usage"]["prompt_tokens"]
            )

            listed = await trio.to_thread.run_sync(_cli, daemon.env, "list")
            assert 'system="Answer in one word." temperature=0.0' in listed.stdout
            as_json = json.loads(
                (await trio.to_thread.run_sync(_cli, daemon.env, "list", "--json")).stdout
            )
            assert as_json[0]["defaults"] == {"system": "Answer in one word.", "temperature": 0.0}

            # The admin API: set some, clear one, refuse what is wrong, naming it.
            patched = await client.patch(
                "/api/v1/models/tiny/defaults",
                json={"top_k": 10, "stop": ["\n\n"], "system": None},
            )
            assert patched.status_code == 200, patched.text
            assert patched.json()["defaults"] == {"temperature": 0.0, "top_k": 10, "stop": ["\n\n"]}
            models = (await client.get("/api/v1/models")).json()["models"]
            assert models[0]["defaults"] == patched.json()["defaults"]
            for wrong, named in (
                ({"temperature": 5}, "temperature"),
                ({"temprature": 0.1}, "temprature"),
                ({"stop": []}, "stop"),
            ):
                refused = await client.patch("/api/v1/models/tiny/defaults", json=wrong)
                assert refused.status_code == 422, refused.text
                assert named in refused.json()["error"]["message"]
            missing = await client.patch("/api/v1/models/nope/defaults", json={"top_k": 1})
            assert missing.status_code == 404
            typo = await trio.to_thread.run_sync(_cli, daemon.env, "set", "tiny", "temprature=1")
            assert typo.returncode == 1
            assert "unknown default 'temprature'" in typo.stderr


async def test_the_default_model_answers_and_stops_through_the_openai_client() -> None:
    state_dir = short_tempdir()
    install_smollm2(state_dir / "models", DEFAULT_MODEL)
    env = {"APPLIANCE_DEFAULT_MODEL": DEFAULT_MODEL}
    with trio.fail_after(300):
        async with (
            running_daemon(env, with_model=False, state_dir=state_dir) as daemon,
            daemon.client() as client,
        ):
            listed = (await client.get("/api/v1/models")).json()["models"]
            assert listed[0]["sha256"] == SMOLLM2_SHA256
            assert listed[0]["defaults"]["repeat_penalty"] > 1
            async with openai.AsyncOpenAI(
                base_url=daemon.url + "/v1", api_key=daemon.api_key, max_retries=0, timeout=120
            ) as oai:
                answers: list[tuple[str, Any]] = []
                # Greedy: without the defaults it shipped with, the first of these repeats
                # "la femme au martyre" to the token limit.
                greedy = await oai.chat.completions.create(
                    model=DEFAULT_MODEL,
                    messages=[{"role": "user", "content": QUESTIONS[0]}],
                    max_tokens=300,
                    temperature=0,
                )
                answers.append((QUESTIONS[0], greedy))
                for question in QUESTIONS:
                    for seed in (1, 2):
                        answer = await oai.chat.completions.create(
                            model=DEFAULT_MODEL,
                            messages=[{"role": "user", "content": question}],
                            max_tokens=300,
                            seed=seed,
                        )
                        answers.append((question, answer))
            for question, answer in answers:
                choice = answer.choices[0]
                text = choice.message.content or ""
                assert choice.finish_reason == "stop", (question, text)
                assert answer.usage is not None
                assert answer.usage.completion_tokens < 200, (question, text)
                assert text.strip(), question
                assert repeated_sentence(text) is None, (question, text)
