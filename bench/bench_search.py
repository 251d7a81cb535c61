"""Web search: what a search-backed answer adds over the same answer without search, with
a SearXNG stand-in on loopback that answers at once.

Three requests take turns, one at a time, on one daemon (the same question, temperature 0,
one token of answer):

- `plain`: `POST /api/v1/chat/send` without search;
- `searched`: the same with `search: "always"` (redaction of the query, the round trip to
  the provider, reading and cleaning its results, the search budget counter, the sources
  stored with the answer, and the results' tokens in the prompt);
- `same_prompt`: without search, its `system` set to exactly the context the search adds,
  so that its prompt is the searched one's (checked by their prompt_tokens).

`searched - same_prompt` is the appliance's own cost of a search (goal: 20 ms or less);
`same_prompt - plain` is the evaluation of the extra prompt tokens, which depends on the
model and the machine. Figures are medians of the per-round differences. Each request
carries a number of its own ("Question 7b: ...") and the stand-in's results quote the
query, so that no prompt is found in the worker's prefix cache from an earlier request.
The quick run uses the tiny test model (whose prompt evaluation costs next to nothing);
the full run also measures Gemma 3 270M, the benchmarks' real model.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import httpx
import psutil
from harness import LOOPBACK, REPO, Daemon, install_gemma, note, result, short_tempdir

if str(REPO) not in sys.path:  # tests/ is a package of the repository, not installed
    sys.path.insert(0, str(REPO))

from appliance.privacy.redaction import Redactor
from appliance.search.context import context_message
from appliance.search.query import search_query
from appliance.search.results import sources_from
from tests.searxng import SearxngStandIn
from tests.searxng import result as searxng_result
from tests.tiny_gguf import write_tiny_llama

NAME: Final = "search"
GOAL_MS: Final = 20.0
MESSAGE: Final = "Who wrote the play Hamlet, and when was it first performed?"
KINDS: Final = ("plain", "searched", "same_prompt")
LETTERS: Final = {"plain": "a", "searched": "b", "same_prompt": "c"}
RESULTS: Final = 5
_LOGGED: Final = re.compile(r"search via \w+: query hash \w+, \d+ results in ([0-9.]+) ms")


def _results(query: str) -> list[dict[str, Any]]:
    """Results that quote the query (so each query's context is a prompt of its own)."""
    return [
        searxng_result(
            i,
            title=f"{query[:24]} - result {i}",
            content=f"Result {i} on: {query[:80]}",
            url=f"https://example.org/{hashlib.sha256(query.encode()).hexdigest()[:8]}/{i}",
        )
        for i in range(1, RESULTS + 1)
    ]


def _context(message: str) -> str:
    """The context a search for `message` adds, as the appliance makes it."""
    query = search_query(Redactor("strict").redact(message).text, 200)
    triples: list[tuple[object, object, object]] = [
        (r["title"], r["url"], r["content"]) for r in _results(query)
    ]
    return context_message(sources_from(triples, RESULTS))


class _Answers(BaseHTTPRequestHandler):
    """SearXNG's JSON answer, at once (the stand-in's format, served from a thread)."""

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query).get("q", [""])[0]
        body = SearxngStandIn(results=_results(query)).body(query)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def run(quick: bool) -> Iterator[dict[str, Any]]:
    server = ThreadingHTTPServer((LOOPBACK, 0), _Answers)
    threading.Thread(target=server.serve_forever, name="searxng", daemon=True).start()
    url = f"http://{LOOPBACK}:{server.server_address[1]}"
    try:
        yield from _measure("tiny", url, rounds=60 if quick else 150)
        if not quick:
            yield from _measure("gemma", url, rounds=20)
    finally:
        server.shutdown()
        server.server_close()


def _install(model: str, models: Path) -> None:
    if model == "tiny":
        models.mkdir(parents=True)
        write_tiny_llama(models / "tiny.gguf", context_length=4096)
    else:
        install_gemma(models, model)


def _measure(model: str, url: str, rounds: int) -> Iterator[dict[str, Any]]:
    env = {
        "SEARCH_ENABLED": "true",
        "APPLIANCE_SEARCH_URL": url,
        "SEARCH_BUDGET_DAILY": "0",
        "APPLIANCE_RATE_LIMIT": "0",
        "APPLIANCE_BACKUP_INTERVAL": "0",
        "APPLIANCE_DEFAULT_MODEL": model,
    }
    with short_tempdir() as state:
        _install(model, state / "models")
        with Daemon(state, env=env) as daemon:
            daemon.start()
            daemon.wait_ready(timeout=300)
            with httpx.Client(base_url=daemon.base_url, headers=daemon.auth(), timeout=120) as c:
                assert daemon.process is not None
                samples, cpu, tokens = _rounds(c, psutil.Process(daemon.process.pid), rounds)
            inside = _logged_searches(daemon.log())
    added = [s - p for s, p in zip(samples["searched"], samples["same_prompt"], strict=True)]
    prompt = [p - q for p, q in zip(samples["same_prompt"], samples["plain"], strict=True)]
    own = statistics.median(added)
    cpu_added = [s - p for s, p in zip(cpu["searched"], cpu["same_prompt"], strict=True)]
    note(
        f"{model}: a search adds {own:.1f} ms of its own and "
        f"{tokens['searched'] - tokens['plain']} prompt tokens "
        f"({statistics.median(prompt):.1f} ms to evaluate)"
    )
    common = {"model": model, "rounds": rounds, "results": RESULTS}
    for kind in KINDS:
        yield result(
            NAME,
            f"answer_{kind}_median",
            round(statistics.median(samples[kind]), 2),
            "ms",
            prompt_tokens=tokens[kind],
            **common,
        )
    yield result(
        NAME,
        "search_added_ms",
        round(own, 2),
        "ms",
        goal=f"<= {GOAL_MS:g}",
        meets_goal=own <= GOAL_MS,
        p90=round(_quantile(added, 0.9), 2),
        difference_of_medians=round(
            statistics.median(samples["searched"]) - statistics.median(samples["same_prompt"]), 2
        ),
        **common,
    )
    yield result(
        NAME,
        "search_added_daemon_cpu_ms",
        round(statistics.mean(cpu_added), 2),
        "ms",
        note="mean CPU time of the daemon's main process (HTTP, search, storage; not the "
        "model's worker), counted in clock ticks: less disturbed by other load on the "
        "machine than wall time",
        **common,
    )
    yield result(
        NAME,
        "search_in_daemon_ms",
        round(statistics.median(inside), 2),
        "ms",
        note="the search itself as the daemon logs it: request, answer, parsing, cleaning",
        searches=len(inside),
        **common,
    )
    yield result(
        NAME,
        "extra_prompt_tokens",
        tokens["searched"] - tokens["plain"],
        "tokens",
        evaluation_ms=round(statistics.median(prompt), 2),
        **common,
    )


def _cpu_ms(process: psutil.Process) -> float:
    times = process.cpu_times()
    return (times.user + times.system) * 1000


def _rounds(
    client: httpx.Client, daemon: psutil.Process, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int]]:
    samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
    cpu: dict[str, list[float]] = {kind: [] for kind in KINDS}
    tokens: dict[str, int] = {}
    for round_ in range(rounds + 2):
        # Alternate the order, so no kind always runs right after the same one.
        order = KINDS if round_ % 2 == 0 else KINDS[::-1]
        for kind in order:
            message = f"Question {round_}{LETTERS[kind]}: {MESSAGE}"
            body: dict[str, Any] = {"message": message, "max_tokens": 1, "temperature": 0}
            if kind == "searched":
                body["search"] = "always"
            elif kind == "same_prompt":
                body["system"] = _context(message)
            began, cpu_began = time.perf_counter(), _cpu_ms(daemon)
            answer = client.post("/api/v1/chat/send", json=body)
            elapsed = (time.perf_counter() - began) * 1000
            cpu_used = _cpu_ms(daemon) - cpu_began
            answer.raise_for_status()
            if kind == "searched" and round_ == 0:
                got = context_message(
                    sources_from(
                        [(s["title"], s["url"], s["snippet"]) for s in answer.json()["sources"]],
                        RESULTS,
                    )
                )
                if got != _context(message):
                    raise AssertionError("the context made here is not the appliance's")
            tokens[kind] = answer.json()["usage"]["prompt_tokens"]
            if round_ >= 2:  # the first rounds warm up caches and connections
                samples[kind].append(elapsed)
                cpu[kind].append(cpu_used)
    if abs(tokens["searched"] - tokens["same_prompt"]) > 2:
        raise AssertionError(f"the prompts differ: {json.dumps(tokens)}")
    return samples, cpu, tokens


def _logged_searches(log: str) -> list[float]:
    """The duration of each search in the daemon's log lines."""
    found = []
    for line in log.splitlines():
        match = _LOGGED.search(line)
        if match is not None:
            found.append(float(match.group(1)))
    return found


def _quantile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]
