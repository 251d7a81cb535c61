"""What agent frameworks send, on the default model (SmolLM2-135M-Instruct), in one run:

- structured output: decode tok/s of a `json_schema` answer against the same prompt
  unconstrained (the system message that tells the model the schema included), both
  streamed through the API (goal: at least 0.85x); also as tokens per second of the
  worker's CPU time, which other jobs on a busy box do not change;
- embeddings: inputs/s for 256 short texts through POST /v1/embeddings against
  llama-cpp-python's `Llama.embed` called directly on the same file, mean pooling, the same
  threads (goal: at least 0.9x);
- tool calls: time to a complete `tool_calls` message against a plain reply of the same
  length (tool_choice required, greedy; the plain reply is asked for that many tokens).

Runners take turns (alternating order, one request each); figures are medians of rounds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import psutil
from harness import REPO, Daemon, note, result, short_tempdir

from appliance.http.openai_plan import SCHEMA_HINT

NAME: Final = "openai"
MODEL: Final = "smollm2"
THREADS: Final = len(os.sched_getaffinity(0)) or 1
DAEMON_ENV: Final = {
    "APPLIANCE_DEFAULT_MODEL": MODEL,
    "APPLIANCE_THREADS": str(THREADS),
    "APPLIANCE_MAX_STREAMS_PER_KEY": "0",
}
JSON_GOAL: Final = 0.85
EMBED_GOAL: Final = 0.9
EMBED_TEXTS: Final = [
    f"note {i}: the meeting moved to room {i % 17} at {i % 12 + 1} pm" for i in range(256)
]
MAX_TOKENS: Final = 96
PROMPT: Final = "Write a long story about a lighthouse keeper and the sea."
STORY_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
}
WEATHER_TOOL: Final[dict[str, Any]] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
TIMEOUT: Final = 600.0


def _install(models_dir: Path) -> Path:
    spec = importlib.util.spec_from_file_location("real_model", REPO / "tests" / "real_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    target: Path = module.install_smollm2(models_dir, MODEL)
    return target


def _cpu(worker: psutil.Process) -> float:
    times = worker.cpu_times()
    return float(times.user + times.system)


def _decode_rate(
    client: httpx.Client,
    extra: dict[str, Any],
    worker: psutil.Process,
    system: str | None = None,
) -> tuple[float, float, int]:
    """Streamed tok/s after the first token, tokens per second of the worker's CPU time
    over the same span (what other jobs on a busy box do not change), and the answer's
    tokens."""
    messages = [{"role": "system", "content": system}] if system else []
    body = {
        "model": MODEL,
        "messages": [*messages, {"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    stamps: list[float] = []
    tokens = 0
    cpu_at_first = 0.0
    with client.stream("POST", "/v1/chat/completions", json=body) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
                if len(stamps) == 1:
                    cpu_at_first = _cpu(worker)
    cpu = _cpu(worker) - cpu_at_first
    # Chunks carry one token each, except where UTF-8 or a stop prefix held one back.
    seconds = stamps[-1] - stamps[0]
    rate = (tokens - 1) / seconds if seconds > 0 else 0.0
    return rate, (tokens - 1) / cpu if cpu > 0 else 0.0, tokens


def _structured(
    client: httpx.Client, rounds: int, worker: psutil.Process
) -> Iterator[dict[str, Any]]:
    schema = {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY_SCHEMA}}
    free: list[float] = []
    constrained: list[float] = []
    free_cpu: list[float] = []
    constrained_cpu: list[float] = []
    lengths: list[int] = []
    for index in range(rounds):
        order = [False, True] if index % 2 == 0 else [True, False]
        for with_schema in order:
            # The same prompt: the schema's request gets the system message that tells the
            # model the schema; the free one is sent that message itself.
            if with_schema:
                rate, per_cpu, tokens = _decode_rate(client, {"response_format": schema}, worker)
            else:
                hint = SCHEMA_HINT + json.dumps(STORY_SCHEMA)
                rate, per_cpu, tokens = _decode_rate(client, {}, worker, system=hint)
            (constrained if with_schema else free).append(rate)
            (constrained_cpu if with_schema else free_cpu).append(per_cpu)
            lengths.append(tokens)
    fast, slow = statistics.median(constrained), statistics.median(free)
    ratio = fast / slow
    note(f"json_schema {fast:.1f} tok/s, free {slow:.1f} tok/s")
    yield result(NAME, "json_schema_decode_tps", statistics.median(constrained), "tok/s")
    yield result(NAME, "free_decode_tps", statistics.median(free), "tok/s")
    yield result(
        NAME,
        "json_schema_vs_free",
        ratio,
        "x",
        goal=JSON_GOAL,
        met=ratio >= JSON_GOAL,
        tokens=lengths,
    )
    cpu_ratio = statistics.median(constrained_cpu) / statistics.median(free_cpu)
    yield result(
        NAME,
        "json_schema_vs_free_per_worker_cpu_second",
        cpu_ratio,
        "x",
        goal=JSON_GOAL,
        met=cpu_ratio >= JSON_GOAL,
    )


class _Direct:
    """llama-cpp-python's Llama.embed on the same file, in this process."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        self.llama = llama_cpp.Llama(
            str(path),
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            # llama-cpp-python's defaults for the batch (512 tokens a decode).
            n_ctx=2048,
            n_threads=THREADS,
            n_threads_batch=THREADS,
            verbose=False,
        )

    def embed(self) -> float:
        started = time.perf_counter()
        self.llama.embed(EMBED_TEXTS)
        return len(EMBED_TEXTS) / (time.perf_counter() - started)


def _api_embed(client: httpx.Client) -> float:
    started = time.perf_counter()
    answer = client.post("/v1/embeddings", json={"model": MODEL, "input": EMBED_TEXTS})
    answer.raise_for_status()
    assert len(answer.json()["data"]) == len(EMBED_TEXTS)
    return len(EMBED_TEXTS) / (time.perf_counter() - started)


def _embeddings(client: httpx.Client, path: Path, rounds: int) -> Iterator[dict[str, Any]]:
    direct = _Direct(path)
    direct.embed()  # warm
    _api_embed(client)
    ours: list[float] = []
    theirs: list[float] = []
    for index in range(rounds):
        if index % 2 == 0:
            ours.append(_api_embed(client))
            theirs.append(direct.embed())
        else:
            theirs.append(direct.embed())
            ours.append(_api_embed(client))
    direct.llama.close()
    mine, reference = statistics.median(ours), statistics.median(theirs)
    ratio = mine / reference
    note(f"embeddings: API {mine:.0f}/s, Llama.embed {reference:.0f}/s")
    yield result(NAME, "embeddings_inputs_per_s", statistics.median(ours), "inputs/s")
    yield result(NAME, "llama_embed_inputs_per_s", statistics.median(theirs), "inputs/s")
    yield result(
        NAME, "embeddings_vs_llama_embed", ratio, "x", goal=EMBED_GOAL, met=ratio >= EMBED_GOAL
    )


def _timed(client: httpx.Client, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    answer = client.post("/v1/chat/completions", json=body)
    answer.raise_for_status()
    return time.perf_counter() - started, answer.json()


def _tool_calls(client: httpx.Client, rounds: int) -> Iterator[dict[str, Any]]:
    question = [{"role": "user", "content": "What will the weather be in Lisbon in 3 days?"}]
    common = {"model": MODEL, "messages": question, "temperature": 0}
    calling = {
        **common,
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 64,
    }
    tool_times: list[float] = []
    plain_times: list[float] = []
    for _ in range(rounds):
        seconds, body = _timed(client, calling)
        assert body["choices"][0]["finish_reason"] == "tool_calls", body
        tool_times.append(seconds)
        length = body["usage"]["completion_tokens"]
        seconds, plain = _timed(client, {**common, "max_tokens": length})
        # The same length: a reply that ended early is timed per token, scaled up.
        plain_tokens = max(1, plain["usage"]["completion_tokens"])
        plain_times.append(seconds * length / plain_tokens)
    tool_ms = statistics.median(tool_times) * 1000
    plain_ms = statistics.median(plain_times) * 1000
    note(f"tool call {tool_ms:.0f} ms, plain reply of the same length {plain_ms:.0f} ms")
    yield result(NAME, "tool_call_ms", tool_ms, "ms")
    yield result(NAME, "plain_reply_same_length_ms", plain_ms, "ms")
    yield result(NAME, "tool_call_overhead", tool_ms / plain_ms, "x")


def _worker(client: httpx.Client) -> psutil.Process:
    services = client.get("/api/v1/health/services").json()["services"]
    return psutil.Process(next(s["pid"] for s in services if s["name"] == "worker"))


def run(quick: bool) -> Iterator[dict[str, Any]]:
    rounds = 3 if quick else 7
    with short_tempdir() as state:
        path = _install(state / "models")
        with Daemon(state, "WARNING", env=DAEMON_ENV) as daemon:
            daemon.start()
            daemon.wait_ready(120)
            with httpx.Client(
                base_url=daemon.base_url, headers=daemon.auth(), timeout=TIMEOUT
            ) as client:
                worker = _worker(client)
                _decode_rate(client, {}, worker)  # warm
                yield from _structured(client, rounds, worker)
                yield from _embeddings(client, path, rounds)
                yield from _tool_calls(client, rounds)
