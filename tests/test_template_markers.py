"""No answer of any model carries a chat template's markers.

The default model (SmolLM2, ChatML) ends at its end-of-turn token and at any turn marker of
its template; Gemma 3 270M is a base model without a template, and gets the documented
fallback format whose `###` role lines are stop sequences (docs/models.md); the tiny test
model is random, so it shows that whatever a model writes, a marker never reaches the
client. Each model is asked through chat/send, /v1/chat/completions (streamed and not).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import httpx
import pytest
import trio

from appliance.llm.batching import open_model
from appliance.llm.chat_prompt import FALLBACK_STOP, fallback_prompt, template_markers
from appliance.llm.protocol import ChatMessage
from tests.harness import Daemon, install_tiny_model, running_daemon, short_tempdir
from tests.real_model import install_gemma, install_smollm2, smollm2_path

# ChatML's, Gemma's and the fallback format's.
MARKERS: Final = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "###",
)
QUESTIONS: Final = (
    "Name three colors.",
    "What is the capital of France?",
    "Write a short greeting.",
)


@asynccontextmanager
async def three_models() -> AsyncIterator[Daemon]:
    state_dir = short_tempdir()
    models = state_dir / "models"
    install_smollm2(models, "smollm2")
    install_gemma(models, "gemma")
    install_tiny_model(models, "tiny")
    env = {"APPLIANCE_PRELOAD": "smollm2,gemma,tiny"}
    async with running_daemon(env, with_model=False, state_dir=state_dir) as daemon:
        yield daemon


def assert_clean(model: str, text: str) -> None:
    for marker in MARKERS:
        assert marker not in text, (model, marker, text)


async def streamed(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    parts = []
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as sse:
        assert sse.status_code == 200
        async for line in sse.aiter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


async def test_no_answer_of_any_model_carries_template_markers() -> None:
    with trio.fail_after(400):
        async with three_models() as daemon, daemon.client(timeout=None) as client:
            for model in ("smollm2", "gemma", "tiny"):
                for question in QUESTIONS:
                    for temperature in (0, 0.8):
                        body = {
                            "model": model,
                            "messages": [{"role": "user", "content": question}],
                            "max_tokens": 60,
                            "temperature": temperature,
                            "seed": 3,
                        }
                        answer = await client.post("/v1/chat/completions", json=body)
                        assert answer.status_code == 200, answer.text
                        assert_clean(model, answer.json()["choices"][0]["message"]["content"])
                    assert_clean(model, await streamed(client, body))
                    sent = await client.post(
                        "/api/v1/chat/send",
                        json={"message": question, "model": model, "max_tokens": 60},
                    )
                    assert sent.status_code == 200, sent.text
                    assert_clean(model, sent.json()["message"]["content"])
                # A conversation that goes on: the earlier answer is in the prompt again.
                follow = await client.post(
                    "/api/v1/chat/send",
                    json={
                        "message": "And one more?",
                        "model": model,
                        "max_tokens": 60,
                        "conversation_id": sent.json()["conversation_id"],
                    },
                )
                assert follow.status_code == 200, follow.text
                assert_clean(model, follow.json()["message"]["content"])


def test_the_fallback_format_and_its_stops() -> None:
    prompt = fallback_prompt([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])
    assert prompt == "### System:\nBe brief.\n### User:\nHi\n### Assistant:\n"
    # Every role line of the format begins with what stops an answer.
    assert FALLBACK_STOP == ["###"]


@pytest.mark.parametrize("model", ["smollm2"])
def test_the_chat_templates_turn_markers_end_an_answer(model: str) -> None:
    loaded, context = open_model(
        str(smollm2_path()), n_ctx=256, n_threads=1, n_gpu_layers=0, parallel=1, n_batch=64
    )
    try:
        template = loaded.metadata()["tokenizer.chat_template"]
        markers = template_markers(loaded, template)
    finally:
        context.close()
        loaded.close()
    assert markers == {"<|im_end|>": 2, "<|im_start|>": 1}, model
