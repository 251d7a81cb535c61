"""Soak test: the real daemon under mixed traffic for a long while, watching its memory.

`make soak` starts `appliance serve` (tests/harness.py, in a temp state dir, with the tiny
test model, or Gemma 3 270M with SOAK_MODEL=gemma) and lets SOAK_CLIENTS clients, each
with a user key of its own, send what real clients send: chat/send (new conversations and
follow-ups, plain and streamed), OpenAI chat completions (plain, streamed, and streamed
with the client hanging up after a few tokens), conversation listing, reading and
deleting, /v1/models; an admin client asks for metrics and makes a backup every minute.

Every SOAK_SAMPLE_SECONDS it prints one JSON line: the RSS of the supervisor, redis-server
and the inference worker, Redis's used_memory, requests done and errors by status. At the
end one summary line per run: requests by kind, errors, and per process the RSS at the end
of warm-up and at the end, the growth and a least-squares slope over the samples after
warm-up, each with a verdict. The exit code is 1 when a process keeps growing, when any
answer was a 5xx (or a transport error, or an error event inside a stream), when a
service restarted, or when the daemon stopped being ready; 0 otherwise.

Settings (environment):
    SOAK_SECONDS=600         how long traffic runs
    SOAK_CLIENTS=4           concurrent user clients (one key and one request at a time each)
    SOAK_SAMPLE_SECONDS=10   time between samples
    SOAK_BACKUP_SECONDS=60   time between backups through the API
    SOAK_PAUSE=0.05          seconds each client waits between its requests
    SOAK_MODEL=tiny          tiny (generated test model) or gemma (var/models/, `make model`)
    SOAK_SKIP=               traffic kinds to leave out, comma-separated (to find what grows)
    SOAK_SLOPE_LIMIT_MB=5    growth allowed after warm-up, MiB per 10 minutes
    SOAK_KEEP_STATE=0        1 keeps the temp state dir (redis, backups) and its .log beside it
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import psutil
import trio

REPO: Final = Path(__file__).resolve().parent.parent
# tests/ is a package of the repository, not installed: the daemon harness lives there.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.harness import Daemon, daemon_log, running_daemon, short_tempdir  # noqa: E402

GEMMA_FILE: Final = REPO / "var" / "models" / "gemma-3-270m-q4_k_m.gguf"
PROCESSES: Final = ("daemon", "redis", "worker")
MIB: Final = 1024 * 1024
# A leak is growth that goes on after warm-up. 5 MiB per 10 minutes is 30 MiB an hour,
# 720 MiB a day: an edge box with 1-2 GiB would be in the OOM killer's hands within days,
# so anything steeper must fail. A healthy process after warm-up moves by allocator noise
# (arenas, caches that reached their size), well under that; below NOISE_MB of total growth
# no verdict of growth is given at all, so that one arena step in a short run is not a leak.
DEFAULT_SLOPE_LIMIT_MB_PER_10_MIN: Final = 5.0
NOISE_MB: Final = 2.0
WARMUP_SHARE: Final = 0.2
WARMUP_MIN_SECONDS: Final = 60.0
# Backups kept by the daemon: the backups dir must not grow with the run.
BACKUP_KEEP: Final = 3
REQUEST_TIMEOUT: Final = 120.0
# Each client keeps this many conversations at most; beyond, it deletes (the oldest first),
# so the stored set (and Redis's memory) stays bounded.
MAX_CONVERSATIONS: Final = 6
MAX_TOKENS: Final = 16


@dataclass(frozen=True)
class Profile:
    """How long a model's requests may be. All running generations share one KV cache of
    n_ctx cells (a full one ends the youngest with a 500 context_full), so with
    APPLIANCE_PARALLEL=4 each request must fit a quarter of it."""

    # Exchanges per conversation, the first included (the history is in every prompt).
    max_turns: int
    # Streams that the client breaks off ask for many tokens, so the generation is still
    # running when the client goes.
    abort_max_tokens: int


PROFILES: Final = {
    # 512 cells; its small vocabulary spells most words byte by byte: a prompt below is
    # about 40 tokens, a 16-token answer about 35 once tokenized again in the history.
    "tiny": Profile(max_turns=2, abort_max_tokens=64),
    # APPLIANCE_CONTEXT_SIZE (4096) cells.
    "gemma": Profile(max_turns=4, abort_max_tokens=200),
}
# After the traffic ends, time for aborted generations to wind down before the last sample.
SETTLE_SECONDS: Final = 3.0
# Error bodies kept for the summary, per kind and status.
EXAMPLES: Final = 3
# What one client does, by weight. Admin traffic (metrics, backups) has a client of its own.
KIND_WEIGHTS: Final[dict[str, int]] = {
    "chat_new": 3,
    "chat_followup": 3,
    "chat_stream": 1,
    "openai": 2,
    "openai_stream": 2,
    "openai_stream_abort": 2,
    "list": 2,
    "read": 2,
    "delete": 1,
    "models": 1,
}
ADMIN_KINDS: Final = ("metrics", "backup")
# Short on purpose (see Profile); one carries personal data, so redaction runs too.
PROMPTS: Final = (
    "Note on the weather?",
    "A name for a cat?",
    "Mail ann@example.com",
    "Pack for a trip?",
    "What is a backup?",
    "Call +1 415 555 0100",
)


def note(message: str) -> None:
    """Progress for humans: stderr, so stdout stays one JSON object per line."""
    print(f"[soak] {message}", file=sys.stderr, flush=True)


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=False), flush=True)


def _number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be a number, not {raw!r}") from None


@dataclass(frozen=True)
class Plan:
    seconds: float
    clients: int
    sample_seconds: float
    backup_seconds: float
    pause: float
    model: str
    kinds: dict[str, int]
    admin_kinds: tuple[str, ...]
    slope_limit_mb_per_hour: float
    keep_state: bool

    @property
    def warmup(self) -> float:
        """The first 20% of the run, at least a minute (but never more than half a run)."""
        return min(max(self.seconds * WARMUP_SHARE, WARMUP_MIN_SECONDS), self.seconds / 2)

    @classmethod
    def from_environment(cls) -> Plan:
        skip = {k.strip() for k in os.environ.get("SOAK_SKIP", "").split(",") if k.strip()}
        unknown = skip - set(KIND_WEIGHTS) - set(ADMIN_KINDS)
        if unknown:
            known = ", ".join([*KIND_WEIGHTS, *ADMIN_KINDS])
            raise SystemExit(f"SOAK_SKIP names unknown kinds {sorted(unknown)}; known: {known}")
        model = os.environ.get("SOAK_MODEL", "tiny") or "tiny"
        if model not in ("tiny", "gemma"):
            raise SystemExit(f"SOAK_MODEL must be tiny or gemma, not {model!r}")
        plan = cls(
            seconds=_number("SOAK_SECONDS", 600),
            clients=int(_number("SOAK_CLIENTS", 4)),
            sample_seconds=_number("SOAK_SAMPLE_SECONDS", 10),
            backup_seconds=_number("SOAK_BACKUP_SECONDS", 60),
            pause=_number("SOAK_PAUSE", 0.05),
            model=model,
            kinds={k: w for k, w in KIND_WEIGHTS.items() if k not in skip},
            admin_kinds=tuple(k for k in ADMIN_KINDS if k not in skip),
            slope_limit_mb_per_hour=_number(
                "SOAK_SLOPE_LIMIT_MB", DEFAULT_SLOPE_LIMIT_MB_PER_10_MIN
            )
            * 6,
            keep_state=os.environ.get("SOAK_KEEP_STATE", "0") not in ("", "0", "false"),
        )
        if min(plan.seconds, plan.sample_seconds, plan.backup_seconds) <= 0:
            raise SystemExit(
                "SOAK_SECONDS, SOAK_SAMPLE_SECONDS and SOAK_BACKUP_SECONDS must be above 0 "
                "(SOAK_SKIP=backup leaves backups out)"
            )
        if plan.clients < 0 or plan.pause < 0:
            raise SystemExit("SOAK_CLIENTS and SOAK_PAUSE must not be negative")
        return plan


def daemon_env(plan: Plan, state_dir: Path) -> dict[str, str]:
    env = {
        # The harness keeps its own files (the notify socket, the admin key, an env file)
        # in the folder it is given; the daemon's state dir is a folder inside it, so that
        # the backups this run makes archive only what the daemon keeps.
        "APPLIANCE_STATE_DIR": str(state_dir),
        # Budgets, rate and stream limits are on (their bookkeeping runs on every request,
        # which is what a soak must cover) but far above what this traffic reaches. Each
        # client holds one stream at a time, so a too_many_streams answer means streams
        # that were never released.
        "APPLIANCE_RATE_LIMIT": "1000000",
        "APPLIANCE_MAX_STREAMS_PER_KEY": "32",
        "APPLIANCE_TOKENS_PER_DAY": "1000000000",
        "APPLIANCE_TOKENS_PER_MONTH": "1000000000",
        "BUDGET_ENFORCE": "true",
        # The worker is recycled after 1000 requests or 3 GiB by default: that would hide
        # exactly the growth a soak looks for (and restart its RSS series).
        "APPLIANCE_WORKER_MAX_REQUESTS": "0",
        "APPLIANCE_WORKER_MAX_RSS_MB": "0",
        "APPLIANCE_BACKUP_KEEP": str(BACKUP_KEEP),
        # One llama.cpp thread leaves a core for the supervisor and redis on a small box.
        "APPLIANCE_THREADS": os.environ.get("APPLIANCE_THREADS", "1"),
    }
    if "backup" not in plan.admin_kinds:
        # Without backups means without the scheduled one too (a minute after start).
        env["APPLIANCE_BACKUP_INTERVAL"] = "0"
    return env


def install_model(plan: Plan, models: Path) -> str:
    """Put the model into the models dir; its name for requests."""
    models.mkdir(parents=True, exist_ok=True)
    if plan.model == "gemma":
        if not GEMMA_FILE.exists():
            raise SystemExit(f"SOAK_MODEL=gemma needs {GEMMA_FILE} (make model)")
        try:
            os.link(GEMMA_FILE, models / "gemma.gguf")
        except OSError:
            shutil.copyfile(GEMMA_FILE, models / "gemma.gguf")
        return "gemma"
    from tests.tiny_gguf import write_tiny_llama

    write_tiny_llama(models / "tiny.gguf")
    return "tiny"


@dataclass
class Tally:
    """What happened, shared by every client (one Trio thread: no locks needed)."""

    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # by status, or a failure's kind
    errors_by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    aborted_streams: int = 0
    tokens_streamed: int = 0

    examples: dict[str, list[str]] = field(default_factory=dict)

    def record(self, kind: str, status: int | str, body: str = "") -> None:
        self.requests[kind] += 1
        if isinstance(status, int) and status < 400:
            return
        self.error(kind, str(status))
        seen = self.examples.setdefault(f"{kind} {status}", [])
        if len(seen) < EXAMPLES:
            seen.append(body[:400])

    def answer(self, kind: str, answer: httpx.Response) -> None:
        """Record a complete (read) response; an error keeps its body as an example."""
        self.record(kind, answer.status_code, answer.text if answer.status_code >= 400 else "")

    def error(self, kind: str, what: str) -> None:
        self.errors[what] += 1
        self.errors_by_kind.setdefault(kind, Counter())[what] += 1

    @property
    def server_errors(self) -> int:
        """5xx answers, transport failures and error events inside streams."""
        return sum(
            count
            for what, count in self.errors.items()
            if what.startswith(("5", "transport", "stream_error"))
        )


@dataclass
class Sample:
    elapsed: float
    rss_mb: dict[str, float]
    pids: dict[str, int]
    redis_used_mb: float | None
    ready: bool


@dataclass
class Conversation:
    id: str
    turns: int = 1


class UserClient:
    """One API client with a user key: one request at a time, chosen by weight."""

    def __init__(
        self, name: str, http: httpx.AsyncClient, model: str, plan: Plan, tally: Tally
    ) -> None:
        self.name = name
        self.http = http
        self.model = model
        self.plan = plan
        self.tally = tally
        self.conversations: list[Conversation] = []
        self.random = random.Random(name)
        self.actions: dict[str, Callable[[], Awaitable[None]]] = {
            "chat_new": self.chat_new,
            "chat_followup": self.chat_followup,
            "chat_stream": self.chat_stream,
            "openai": self.openai,
            "openai_stream": lambda: self.openai_stream(abort=False),
            "openai_stream_abort": lambda: self.openai_stream(abort=True),
            "list": self.list,
            "read": self.read,
            "delete": self.delete,
            "models": self.models,
        }

    async def run(self, stop_at: float) -> None:
        kinds = list(self.plan.kinds)
        weights = [self.plan.kinds[k] for k in kinds]
        while trio.current_time() < stop_at and kinds:
            kind = self.random.choices(kinds, weights)[0]
            await guarded(self.tally, kind, self.actions[kind])
            await trio.sleep(self.plan.pause)

    def _prompt(self) -> str:
        return self.random.choice(PROMPTS)

    async def _send(self, kind: str, conversation: Conversation | None) -> None:
        body: dict[str, Any] = {"message": self._prompt(), "max_tokens": MAX_TOKENS}
        if conversation is not None:
            body["conversation_id"] = conversation.id
        answer = await self.http.post("/api/v1/chat/send", json=body)
        self.tally.answer(kind, answer)
        if answer.status_code != 200:
            return
        if conversation is None:
            self.conversations.append(Conversation(answer.json()["conversation_id"]))
        else:
            conversation.turns += 1

    async def chat_new(self) -> None:
        while len(self.conversations) >= MAX_CONVERSATIONS:
            await self.delete(oldest=True)
        await self._send("chat_new", None)

    async def chat_followup(self) -> None:
        if not self.conversations:
            await self.chat_new()
            return
        conversation = self.random.choice(self.conversations)
        if conversation.turns >= PROFILES[self.model].max_turns:
            await self.delete(conversation)
            await self.chat_new()
            return
        await self._send("chat_followup", conversation)

    async def chat_stream(self) -> None:
        """chat/send streamed: token events, then done (the exchange is stored then)."""
        while len(self.conversations) >= MAX_CONVERSATIONS:
            await self.delete(oldest=True)
        body = {"message": self._prompt(), "max_tokens": MAX_TOKENS, "stream": True}
        async with self.http.stream("POST", "/api/v1/chat/send", json=body) as answer:
            if answer.status_code != 200:
                await answer.aread()
                self.tally.answer("chat_stream", answer)
                return
            event = ""
            done: dict[str, Any] | None = None
            async for line in answer.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "error":
                        self._stream_error("chat_stream", line[6:])
                        return
                    if event == "token":
                        self.tally.tokens_streamed += 1
                    elif event == "done":
                        done = json.loads(line[6:])
        if done is None:
            self.tally.record("chat_stream", "stream_error:no_done_event")
            return
        self.tally.record("chat_stream", 200)
        self.conversations.append(Conversation(done["conversation_id"]))

    def _stream_error(self, kind: str, data: str) -> None:
        try:
            code = json.loads(data)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = "unparsed"
        self.tally.record(kind, f"stream_error:{code}", data)

    async def openai(self) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": self._prompt()}],
            "max_tokens": MAX_TOKENS,
        }
        answer = await self.http.post("/v1/chat/completions", json=body)
        self.tally.answer("openai", answer)

    async def openai_stream(self, *, abort: bool) -> None:
        """A streamed chat completion; with `abort`, hang up after 1-3 tokens."""
        kind = "openai_stream_abort" if abort else "openai_stream"
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": self._prompt()}],
            "max_tokens": PROFILES[self.model].abort_max_tokens if abort else MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        hang_up_after = self.random.randint(1, 3)
        tokens = 0
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as answer:
            if answer.status_code != 200:
                await answer.aread()
                self.tally.answer(kind, answer)
                return
            event = ""
            async for line in answer.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "error":
                        self._stream_error(kind, line[6:])
                        return
                    if line == "data: [DONE]":
                        self.tally.record(kind, 200)
                        return
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        tokens += 1
                        self.tally.tokens_streamed += 1
                    if abort and tokens >= hang_up_after:
                        # Leaving the block closes the connection mid-stream.
                        self.tally.aborted_streams += 1
                        self.tally.record(kind, 200)
                        return
        # The generation may end (end of text) before the client meant to hang up.
        self.tally.record(kind, 200 if abort else "stream_error:no_done_marker")

    async def list(self) -> None:
        answer = await self.http.get("/api/v1/conversations", params={"limit": 20})
        self.tally.answer("list", answer)

    async def read(self) -> None:
        if not self.conversations:
            await self.list()
            return
        conversation = self.random.choice(self.conversations)
        answer = await self.http.get(f"/api/v1/conversations/{conversation.id}")
        self.tally.answer("read", answer)

    async def delete(self, conversation: Conversation | None = None, oldest: bool = False) -> None:
        if conversation is None:
            if not self.conversations:
                await self.list()
                return
            conversation = (
                self.conversations[0] if oldest else self.random.choice(self.conversations)
            )
        self.conversations.remove(conversation)
        answer = await self.http.delete(f"/api/v1/conversations/{conversation.id}")
        self.tally.answer("delete", answer)

    async def models(self) -> None:
        answer = await self.http.get("/v1/models")
        self.tally.answer("models", answer)

    async def delete_all(self) -> None:
        while self.conversations:
            await guarded(self.tally, "delete", self.delete)


async def guarded(tally: Tally, kind: str, action: Callable[[], Awaitable[None]]) -> None:
    """Run one request; a transport failure is counted, never raised."""
    try:
        with trio.fail_after(REQUEST_TIMEOUT + 5):
            await action()
    except (httpx.HTTPError, trio.TooSlowError) as exc:
        tally.record(kind, f"transport:{type(exc).__name__}")
        note(f"{kind}: {type(exc).__name__}: {exc}")


async def admin_metrics(admin: httpx.AsyncClient, tally: Tally, stop_at: float) -> None:
    """Metrics now and then, JSON and Prometheus, as a monitoring system would ask."""
    prometheus = False
    while trio.current_time() < stop_at:
        params = {"format": "prometheus"} if prometheus else {}

        async def ask(params: dict[str, str] = params) -> None:
            answer = await admin.get("/api/v1/health/metrics", params=params)
            tally.answer("metrics", answer)

        await guarded(tally, "metrics", ask)
        prometheus = not prometheus
        await trio.sleep(2.0)


async def admin_backups(admin: httpx.AsyncClient, tally: Tally, plan: Plan, stop_at: float) -> None:
    """A backup every SOAK_BACKUP_SECONDS (409 while a scheduled one runs is fine)."""
    while trio.current_time() + plan.backup_seconds < stop_at:
        await trio.sleep(plan.backup_seconds)

        async def backup() -> None:
            answer = await admin.post("/api/v1/admin/backups", json={})
            tally.answer("backup", answer)

        await guarded(tally, "backup", backup)


def rss_mb(pid: int) -> float | None:
    try:
        return psutil.Process(pid).memory_info().rss / MIB
    except psutil.Error:
        return None


class Sampler:
    """RSS of each process of the appliance, Redis's used_memory and readiness."""

    def __init__(self, daemon: Daemon, admin: httpx.AsyncClient, tally: Tally) -> None:
        self.daemon = daemon
        self.admin = admin
        self.tally = tally
        self.samples: list[Sample] = []
        self.restarts: dict[str, int] = {}
        self.not_ready: list[dict[str, Any]] = []
        self.started = trio.current_time()

    async def take(self) -> Sample:
        pids = {"daemon": self.daemon.process.pid}
        redis_used: float | None = None
        ready = False
        try:
            services = await self.admin.get("/api/v1/health/services")
            self.tally.answer("sample", services)
            for service in services.json().get("services", []):
                # One model, so one `worker:<model>`: the worker whose RSS is watched.
                name = "worker" if service["name"].startswith("worker:") else service["name"]
                self.restarts[name] = service["restarts"]
                if name in PROCESSES and service["pid"]:
                    pids[name] = int(service["pid"])
            metrics = await self.admin.get("/api/v1/health/metrics")
            self.tally.answer("sample", metrics)
            used = metrics.json().get("services", {}).get("redis", {}).get("used_memory_bytes")
            redis_used = used / MIB if used is not None else None
            readiness = await self.admin.get("/api/v1/health/ready")
            self.tally.answer("sample", readiness)
            ready = readiness.status_code == 200
            if not ready:
                self.not_ready.append(
                    {"elapsed": self.elapsed(), "status": readiness.status_code, **readiness.json()}
                )
        except (httpx.HTTPError, ValueError) as exc:
            self.tally.record("sample", f"transport:{type(exc).__name__}")
            self.not_ready.append({"elapsed": self.elapsed(), "error": repr(exc)})
        rss = {name: rss_mb(pid) for name, pid in pids.items()}
        sample = Sample(
            elapsed=self.elapsed(),
            rss_mb={name: round(value, 2) for name, value in rss.items() if value is not None},
            pids=pids,
            redis_used_mb=round(redis_used, 3) if redis_used is not None else None,
            ready=ready,
        )
        self.samples.append(sample)
        emit(
            {
                "elapsed": round(sample.elapsed, 1),
                "rss_mb": sample.rss_mb,
                "redis_used_memory_mb": sample.redis_used_mb,
                "ready": sample.ready,
                "requests": sum(self.tally.requests.values()),
                "errors": dict(self.tally.errors),
                "pids": sample.pids,
            }
        )
        return sample

    def elapsed(self) -> float:
        return trio.current_time() - self.started

    async def run(self, interval: float, stop_at: float) -> None:
        while trio.current_time() < stop_at:
            await self.take()
            if self.daemon.process.returncode is not None:
                return
            await trio.sleep(min(interval, max(0.0, stop_at - trio.current_time())))


def least_squares_slope(points: list[tuple[float, float]]) -> float | None:
    """Slope of the least-squares line through (t, y); None below 3 points."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return None
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / spread


def growth_report(
    series: list[tuple[float, float]], warmup: float, limit_per_hour: float
) -> dict[str, Any]:
    """RSS after warm-up and at the end, growth, slope per hour over the post-warm-up part."""
    after = [(t, y) for t, y in series if t >= warmup]
    if not after:
        return {"verdict": "no samples after warm-up"}
    start, end = after[0][1], after[-1][1]
    slope = least_squares_slope(after)
    per_hour = slope * 3600 if slope is not None else None
    growth = end - start
    if per_hour is None:
        verdict = "inconclusive (fewer than 3 samples after warm-up)"
    elif per_hour > limit_per_hour and growth > NOISE_MB:
        verdict = "growing"
    else:
        verdict = "stable"
    return {
        "after_warmup_mb": round(start, 2),
        "end_mb": round(end, 2),
        "growth_mb": round(growth, 2),
        "slope_mb_per_hour": round(per_hour, 2) if per_hour is not None else None,
        "limit_mb_per_hour": limit_per_hour,
        "samples_after_warmup": len(after),
        "verdict": verdict,
    }


def process_reports(samples: list[Sample], plan: Plan) -> dict[str, dict[str, Any]]:
    reports: dict[str, dict[str, Any]] = {}
    for name in PROCESSES:
        # A restarted process starts its series again: judge only its last life.
        pid = samples[-1].pids.get(name) if samples else None
        series = [
            (s.elapsed, s.rss_mb[name])
            for s in samples
            if s.pids.get(name) == pid and name in s.rss_mb
        ]
        report = growth_report(series, plan.warmup, plan.slope_limit_mb_per_hour)
        reports[name] = {"pid": pid, **report}
    used = [(s.elapsed, s.redis_used_mb) for s in samples if s.redis_used_mb is not None]
    reports["redis_used_memory"] = growth_report(used, plan.warmup, plan.slope_limit_mb_per_hour)
    return reports


def backups_on_disk(state_dir: Path) -> dict[str, Any]:
    folder = state_dir / "backups"
    names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    archives = [n for n in names if n.startswith("data-backup-") and ".partial" not in n]
    return {
        "archives": len(archives),
        "keep": BACKUP_KEEP,
        "partial": [n for n in names if "partial" in n],
        "bytes": sum((folder / n).stat().st_size for n in names if (folder / n).is_file()),
    }


async def llm_idle(admin: httpx.AsyncClient) -> dict[str, Any]:
    """Generations still running or queued once every client has gone (leaks show here)."""
    try:
        llm = (await admin.get("/api/v1/health/metrics")).json()["llm"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return {"error": repr(exc)}
    return {key: llm.get(key) for key in ("running", "queue_depth", "completed", "failed")}


async def soak(plan: Plan) -> int:
    tally = Tally()
    work_dir = short_tempdir("sk")
    state_dir = work_dir / "s"
    model = install_model(plan, state_dir / "models")
    note(
        f"{plan.seconds:.0f} s, {plan.clients} clients, model {model}, warm-up "
        f"{plan.warmup:.0f} s, in {work_dir}"
    )
    summary: dict[str, Any] = {}
    exit_code: int | None = None
    env = daemon_env(plan, state_dir)
    try:
        async with running_daemon(env, state_dir=work_dir, with_model=False) as daemon:
            summary = await drive(daemon, plan, model, tally, state_dir)
        exit_code = daemon.process.returncode
    finally:
        if not plan.keep_state:
            shutil.rmtree(work_dir, ignore_errors=True)
            daemon_log(work_dir).unlink(missing_ok=True)
    reasons: list[str] = summary.pop("reasons")
    summary["daemon_exit_code"] = exit_code
    if exit_code != 0:
        reasons.append(f"the daemon exited with {exit_code} on SIGTERM")
    summary["verdict"] = "fail" if reasons else "pass"
    summary["reasons"] = reasons
    emit({"summary": summary})
    return 1 if reasons else 0


async def drain_notify(daemon: Daemon) -> None:
    """Read sd_notify datagrams as systemd would, so the socket's queue never fills."""
    notifier = daemon.notify
    if notifier is None:
        return
    while True:
        await notifier.receive()


async def drive(
    daemon: Daemon, plan: Plan, model: str, tally: Tally, state_dir: Path
) -> dict[str, Any]:
    keys = [await daemon.create_key(f"soak-{i}", "user") for i in range(plan.clients)]
    timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=10)
    async with daemon.client(timeout=timeout) as admin:
        sampler = Sampler(daemon, admin, tally)
        stop_at = sampler.started + plan.seconds
        clients = [
            UserClient(f"client-{i}", daemon.client(key, timeout=timeout), model, plan, tally)
            for i, key in enumerate(keys)
        ]
        async with trio.open_nursery() as background:
            background.start_soon(drain_notify, daemon)
            traffic_scope = trio.CancelScope()
            background.start_soon(watch_exit, daemon, traffic_scope)
            with traffic_scope:
                async with trio.open_nursery() as traffic:
                    traffic.start_soon(sampler.run, plan.sample_seconds, stop_at)
                    for client in clients:
                        traffic.start_soon(client.run, stop_at)
                    if "metrics" in plan.admin_kinds:
                        traffic.start_soon(admin_metrics, admin, tally, stop_at)
                    if "backup" in plan.admin_kinds:
                        traffic.start_soon(admin_backups, admin, tally, plan, stop_at)
            duration = sampler.elapsed()
            alive = daemon.process.returncode is None
            if alive:
                await trio.sleep(SETTLE_SECONDS)
                await sampler.take()
                idle = await llm_idle(admin)
            else:
                idle = {"error": "the daemon is gone"}
            reports = process_reports(sampler.samples, plan)
            if alive:
                # The soak's own conversations go, so a kept state dir holds no stale ones.
                for client in clients:
                    await client.delete_all()
            for client in clients:
                await client.http.aclose()
            background.cancel_scope.cancel()

    reasons: list[str] = []
    if not alive:
        reasons.append(f"the daemon died (exit code {daemon.process.returncode})")
    for name, report in reports.items():
        if report["verdict"] == "growing":
            reasons.append(
                f"{name} grows {report['slope_mb_per_hour']} MiB/h after warm-up "
                f"(limit {report['limit_mb_per_hour']})"
            )
    if tally.server_errors:
        reasons.append(f"{tally.server_errors} server errors (5xx, transport or stream errors)")
    if any("429" in by_kind for kind, by_kind in tally.errors_by_kind.items() if "stream" in kind):
        reasons.append("streams answered 429: stream slots are not released")
    restarted = {name: n for name, n in sampler.restarts.items() if n}
    if restarted:
        reasons.append(f"services restarted: {restarted}")
    if sampler.not_ready:
        reasons.append(f"the daemon was not ready {len(sampler.not_ready)} times")
    if idle.get("running") or idle.get("queue_depth"):
        reasons.append(f"generations left running after the clients went: {idle}")
    backups = backups_on_disk(state_dir)
    if backups["archives"] > BACKUP_KEEP:
        reasons.append(f"{backups['archives']} backups kept (APPLIANCE_BACKUP_KEEP={BACKUP_KEEP})")
    total = sum(v for k, v in tally.requests.items() if k != "sample")
    return {
        "duration_s": round(duration, 1),
        "model": model,
        "clients": plan.clients,
        "warmup_s": plan.warmup,
        "requests_total": total,
        "requests_per_s": round(total / duration, 2) if duration else None,
        "requests": dict(sorted(tally.requests.items())),
        "errors": dict(tally.errors),
        "errors_by_kind": {k: dict(v) for k, v in tally.errors_by_kind.items()},
        "error_examples": tally.examples,
        "server_errors": tally.server_errors,
        "aborted_streams": tally.aborted_streams,
        "tokens_streamed": tally.tokens_streamed,
        "not_ready": sampler.not_ready[:5],
        "restarts": sampler.restarts,
        "llm_after": idle,
        "backups": backups,
        "processes": reports,
        "reasons": reasons,
    }


async def watch_exit(daemon: Daemon, traffic: trio.CancelScope) -> None:
    """Stop the traffic at once if the daemon dies (cancelled with the background tasks)."""
    await daemon.process.wait()
    note(f"the daemon exited with {daemon.process.returncode} during the soak")
    traffic.cancel()


def main() -> int:
    plan = Plan.from_environment()
    started = time.monotonic()
    code = trio.run(soak, plan)
    note(f"done in {time.monotonic() - started:.0f} s, exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
