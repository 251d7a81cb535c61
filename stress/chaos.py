"""Fault injection: clients write conversations while redis-server, the inference worker and
the whole daemon are killed with SIGKILL at random moments; afterwards every write the API
acknowledged is read back.

The daemon, its redis-server and its worker are the real ones (started as tests do, with
the tiny test model). A killed daemon is started again on the same state dir, as systemd's
`Restart=on-failure` would; so is one that ends by itself (the restart limit of a service).

    make chaos                        # CHAOS_SECONDS (default 180) of faults, then checks
    python -m stress.chaos --seconds 60 --clients 4 --seed 7

Every message carries a unique marker that redaction leaves alone. A write counts as
acknowledged when `POST /api/v1/chat/send` answered 2xx. Afterwards (daemon ready):

- lost: an acknowledged question or answer that is not stored (or not listed);
- changed: stored, but not what was sent (the answer as redaction keeps it);
- duplicated: a marker or a message id stored more than once;
- landed_unacknowledged: writes that failed for the client but were stored anyway (allowed:
  the client cannot know; a retry would make a second exchange);
- stored_unindexed / index_without_data: conversations in Redis missing from the index,
  and index entries whose conversation was never stored (reported, not failed: only an
  unacknowledged write can leave either; listings skip the second kind).

Output: JSON lines on stdout, progress on stderr. Exit code 1 when anything was lost,
changed or duplicated, or the daemon did not come back.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import string
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import coredis
import httpx
import trio

from appliance.config import load_settings
from appliance.privacy.redaction import Redactor
from appliance.store.access import store_url
from appliance.store.conversations import INDEX_KEY
from tests.harness import Daemon, create_api_key, short_tempdir, start_daemon

KINDS: Final = ("redis", "worker", "daemon")
DEFAULT_SECONDS: Final = 180.0
DEFAULT_CLIENTS: Final = 4
# Pause between the moment everything is ready again and the next kill.
MIN_GAP: Final = 0.5
MAX_GAP: Final = 4.0
RECOVERY_TIMEOUT: Final = 120.0
REQUEST_TIMEOUT: Final = 30.0
CLIENT_BACKOFF: Final = 0.2
POLL: Final = 0.05
MAX_TOKENS: Final = 4
# Share of sends that continue one of the client's conversations; a conversation takes
# at most this many exchanges (the tiny model's context is 512 tokens).
FOLLOW_UP_SHARE: Final = 0.4
MAX_TURNS: Final = 3
PAGE: Final = 100
MARKER_LETTERS: Final = 14

# The daemon as the run configures it: no scheduled backups, a rate limit no client of this
# run reaches (its counter is still written on every request), one llama.cpp thread. The
# worker is recycled as shipped, so some kills land while a new worker loads its model.
CHAOS_ENV: Final = {
    "APPLIANCE_BACKUP_INTERVAL": "0",
    "APPLIANCE_RATE_LIMIT": "1000000",
    "APPLIANCE_THREADS": "1",
    "APPLIANCE_GRACEFUL_TIMEOUT": "5",
    "APPLIANCE_MIN_FREE_DISK_MB": "0",
}


def note(message: str) -> None:
    print(f"[chaos] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Ack:
    """One exchange the API acknowledged with a 2xx."""

    client: int
    conversation_id: str
    marker: str
    question: str
    answer: str
    answer_id: str


@dataclass
class ChaosReport:
    seconds: float
    clients: int
    kills: Counter[str] = field(default_factory=Counter)
    daemon_exits: list[int] = field(default_factory=list)
    acknowledged: int = 0
    attempted: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    landed_unacknowledged: int = 0
    stored_unindexed: int = 0
    index_without_data: int = 0
    recovery: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    came_back: bool = False
    problems: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return (
            self.came_back
            and not self.lost
            and not self.changed
            and not self.duplicated
            and not self.problems
        )

    def lines(self) -> list[dict[str, Any]]:
        """The figures, one JSON object each."""
        every = [t for times in self.recovery.values() for t in times]
        out: list[dict[str, Any]] = [
            {"metric": "kills", **{k: self.kills[k] for k in KINDS}},
            {"metric": "daemon_exits_by_itself", "value": len(self.daemon_exits)},
            {"metric": "writes_acknowledged", "value": self.acknowledged},
            {"metric": "writes_attempted", "value": self.attempted},
            {
                "metric": "writes_failed",
                "value": sum(self.failed.values()),
                "by_reason": dict(sorted(self.failed.items())),
            },
            {"metric": "writes_landed_unacknowledged", "value": self.landed_unacknowledged},
            {"metric": "conversations_stored_unindexed", "value": self.stored_unindexed},
            {"metric": "index_entries_without_conversation", "value": self.index_without_data},
        ]
        for name, found in (
            ("lost", self.lost),
            ("changed", self.changed),
            ("duplicated", self.duplicated),
        ):
            out.append({"metric": name, "value": len(found), "examples": found[:5]})
        for kind, times in [*self.recovery.items(), ("all", every)]:
            out.append({"metric": "recovery_seconds", "kind": kind, **_spread(times)})
        out.append(
            {
                "metric": "result",
                "ok": self.ok(),
                "came_back": self.came_back,
                "seconds": round(self.seconds, 1),
                "clients": self.clients,
                "problems": self.problems[:10],
            }
        )
        return out


def _spread(times: list[float]) -> dict[str, Any]:
    if not times:
        return {"count": 0, "p50": None, "max": None}
    return {
        "count": len(times),
        "p50": round(statistics.median(times), 3),
        "max": round(max(times), 3),
    }


def _marker(rng: random.Random) -> str:
    # Letters only: redaction (strict) leaves a plain word alone; 26^14 makes clashes moot.
    return "mk" + "".join(rng.choice(string.ascii_lowercase) for _ in range(MARKER_LETTERS))


class Chaos:
    """One run: a daemon on `state_dir`, `clients` writers, one killer, then the checks."""

    def __init__(
        self,
        state_dir: Path,
        *,
        seconds: float,
        clients: int = DEFAULT_CLIENTS,
        seed: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.seconds = seconds
        self.clients = clients
        self.seed = random.randrange(1 << 30) if seed is None else seed
        self.env = {**CHAOS_ENV, **(env or {})}
        self.report = ChaosReport(seconds=seconds, clients=clients)
        self.acks: list[Ack] = []
        self.attempted: set[str] = set()
        self.keys: list[str] = []
        self._daemon: Daemon | None = None
        self._stop = trio.Event()

    @property
    def daemon(self) -> Daemon:
        assert self._daemon is not None
        return self._daemon

    async def run(self) -> ChaosReport:
        note(f"state dir {self.state_dir}, seed {self.seed}, {self.seconds:.0f} s")
        self._daemon = await start_daemon(self.state_dir, self.env)
        try:
            self.keys = [
                await create_api_key(self.daemon.env, f"chaos-{i}", "user")
                for i in range(self.clients)
            ]
            async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as http:
                async with trio.open_nursery() as nursery:
                    for index in range(self.clients):
                        nursery.start_soon(self._client, http, index)
                    try:
                        await self._drive(http)
                    finally:
                        # Clients finish the request they are in, so its answer counts.
                        self._stop.set()
                await self._settle(http)
                if self.report.came_back:
                    await self._verify(http)
        finally:
            await self._shut_down()
        self.report.acknowledged = len(self.acks)
        self.report.attempted = len(self.attempted)
        return self.report

    # -- writers ------------------------------------------------------------------------

    async def _client(self, http: httpx.AsyncClient, index: int) -> None:
        rng = random.Random(self.seed * 1009 + index)
        headers = {"Authorization": f"Bearer {self.keys[index]}"}
        turns: dict[str, int] = {}
        while not self._stop.is_set():
            marker = _marker(rng)
            if marker in self.attempted:
                continue
            self.attempted.add(marker)
            question = f"remember the word {marker} please"
            body: dict[str, Any] = {"message": question, "max_tokens": MAX_TOKENS}
            body["temperature"] = 0
            open_ones = [c for c, n in turns.items() if n < MAX_TURNS]
            if open_ones and rng.random() < FOLLOW_UP_SHARE:
                body["conversation_id"] = rng.choice(open_ones)
            try:
                answer = await http.post(
                    f"{self.daemon.url}/api/v1/chat/send", json=body, headers=headers
                )
            except httpx.HTTPError as exc:
                self.report.failed[type(exc).__name__] += 1
                await trio.sleep(CLIENT_BACKOFF)
                continue
            if not 200 <= answer.status_code < 300:
                code = _error_code(answer)
                self.report.failed[f"{answer.status_code} {code}"] += 1
                await trio.sleep(CLIENT_BACKOFF)
                continue
            data = answer.json()
            conversation_id = data["conversation_id"]
            self.acks.append(
                Ack(
                    client=index,
                    conversation_id=conversation_id,
                    marker=marker,
                    question=question,
                    answer=data["message"]["content"],
                    answer_id=data["message"]["id"],
                )
            )
            turns[conversation_id] = turns.get(conversation_id, 0) + 1

    # -- faults -------------------------------------------------------------------------

    async def _drive(self, http: httpx.AsyncClient) -> None:
        """Kill in rounds (each kind once per round, in a random order) until the time is
        up and at least one round is complete."""
        rng = random.Random(self.seed)
        deadline = trio.current_time() + self.seconds
        kinds: list[str] = []
        while True:
            await self._pause(rng.uniform(MIN_GAP, MAX_GAP))
            if not kinds:
                if trio.current_time() >= deadline:
                    return
                kinds = rng.sample(KINDS, len(KINDS))
            kind = kinds.pop()
            started = trio.current_time()
            old_pid = await self._kill(http, kind)
            if old_pid is None:
                kinds.append(kind)
                continue
            self.report.kills[kind] += 1
            await self._recover(http, kind, old_pid)
            took = trio.current_time() - started
            self.report.recovery[kind].append(took)
            note(f"kill -9 {kind} ({old_pid}): ready again after {took:.2f} s")

    async def _pause(self, seconds: float) -> None:
        """Sleep, starting the daemon again if it ends by itself meanwhile."""
        until = trio.current_time() + seconds
        while trio.current_time() < until:
            if self.daemon.process.returncode is not None:
                await self._restart_exited()
            await trio.sleep(POLL)

    async def _kill(self, http: httpx.AsyncClient, kind: str) -> int | None:
        if kind == "daemon":
            pid = self.daemon.process.pid
            self.daemon.process.kill()
            await self.daemon.process.wait()
            return pid
        services = await self._services(http)
        pid = services.get(kind, (None, None))[1]
        if pid is None:
            return None
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        return pid

    async def _recover(self, http: httpx.AsyncClient, kind: str, old_pid: int) -> None:
        with trio.fail_after(RECOVERY_TIMEOUT):
            if kind == "daemon":
                await self._start_again()
            while True:
                if self.daemon.process.returncode is not None:
                    await self._restart_exited()
                    continue
                if await self._is_ready(http):
                    services = await self._services(http)
                    state, pid = services.get(kind, ("running", None))
                    if kind == "daemon" or (state == "running" and pid not in (None, old_pid)):
                        return
                await trio.sleep(POLL)

    async def _restart_exited(self) -> None:
        code = self.daemon.process.returncode
        assert code is not None
        self.report.daemon_exits.append(code)
        note(f"the daemon ended by itself (exit code {code}); starting it again")
        if code == 0:
            self.report.problems.append("the daemon exited 0 without being asked to")
        await self._start_again()

    async def _start_again(self) -> None:
        if self.daemon.notify is not None:
            self.daemon.notify.close()
        self._daemon = await start_daemon(self.state_dir, self.env)

    async def _services(self, http: httpx.AsyncClient) -> dict[str, tuple[str, int | None]]:
        try:
            answer = await http.get(
                f"{self.daemon.url}/api/v1/health/services",
                headers={"Authorization": f"Bearer {self.daemon.api_key}"},
            )
            if answer.status_code != 200:
                return {}
            services = answer.json()["services"]
        except (httpx.HTTPError, ValueError, KeyError):
            return {}
        # One model, so one `worker:<model>`: it is the worker that gets killed.
        return {_kind(s["name"]): (s["state"], s["pid"]) for s in services}

    async def _is_ready(self, http: httpx.AsyncClient) -> bool:
        try:
            answer = await http.get(f"{self.daemon.url}/api/v1/health/ready")
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    async def _settle(self, http: httpx.AsyncClient) -> None:
        """After the last fault: the daemon must be (or become) ready."""
        try:
            with trio.fail_after(RECOVERY_TIMEOUT):
                while True:
                    if self.daemon.process.returncode is not None:
                        await self._restart_exited()
                        continue
                    if await self._is_ready(http):
                        self.report.came_back = True
                        return
                    await trio.sleep(POLL)
        except (trio.TooSlowError, AssertionError) as exc:
            self.report.problems.append(f"the daemon did not become ready: {exc}"[:300])

    async def _shut_down(self) -> None:
        daemon = self._daemon
        if daemon is None:
            return
        with trio.CancelScope(shield=True):
            if daemon.process.returncode is None:
                daemon.process.send_signal(signal.SIGTERM)
                with trio.move_on_after(60):
                    await daemon.process.wait()
                if daemon.process.returncode is None:
                    self.report.problems.append("the daemon did not stop on SIGTERM in 60 s")
                    daemon.process.kill()
                    await daemon.process.wait()
                elif daemon.process.returncode != 0:
                    self.report.problems.append(
                        f"the daemon stopped with exit code {daemon.process.returncode}"
                    )
            if daemon.notify is not None:
                daemon.notify.close()

    # -- checks -------------------------------------------------------------------------

    async def _verify(self, http: httpx.AsyncClient) -> None:
        report = self.report
        stored: dict[str, list[dict[str, Any]]] = {}
        for index, key in enumerate(self.keys):
            headers = {"Authorization": f"Bearer {key}"}
            listed = await self._listing(http, headers)
            mine = {a.conversation_id for a in self.acks if a.client == index}
            for conversation_id in sorted(listed | mine):
                answer = await self._get(http, f"/api/v1/conversations/{conversation_id}", headers)
                if answer.status_code == 404:
                    continue
                if answer.status_code != 200:
                    report.problems.append(
                        f"GET conversation {conversation_id}: {answer.status_code}"
                    )
                    continue
                stored[conversation_id] = answer.json()["messages"]
                if conversation_id not in listed:
                    report.lost.append(f"{conversation_id} is stored but not listed")
        markers: Counter[str] = Counter()
        ids: Counter[str] = Counter()
        for messages in stored.values():
            for message in messages:
                ids[message["id"]] += 1
                if message["role"] == "user":
                    markers.update(w for w in message["content"].split() if w.startswith("mk"))
        report.duplicated += [f"marker {m} stored {n} times" for m, n in markers.items() if n > 1]
        report.duplicated += [f"message id {i} stored {n} times" for i, n in ids.items() if n > 1]
        acked = {a.marker for a in self.acks}
        report.landed_unacknowledged = len((set(markers) - acked) & self.attempted)
        strays = set(markers) - self.attempted
        if strays:
            report.problems.append(f"{len(strays)} stored markers were never sent")
        redactor = Redactor("strict")
        for ack in self.acks:
            problem = _check(ack, stored.get(ack.conversation_id), redactor)
            if problem is not None:
                target = report.lost if problem.startswith("missing") else report.changed
                target.append(f"{ack.marker} in {ack.conversation_id}: {problem}")
        report.stored_unindexed, report.index_without_data = await self._index_gaps()

    async def _index_gaps(self) -> tuple[int, int]:
        """Conversations stored in Redis that the index (listing, retention, erasure of an
        owner's data) does not know, and index entries of conversations never stored."""
        settings = load_settings(environ=self.daemon.env)
        client: coredis.Redis[bytes] = coredis.Redis.from_url(store_url(settings))
        async with client:
            indexed = {m.decode() for m in await client.zrange(INDEX_KEY, 0, -1)}
            stored = {
                key.decode().split("{", 1)[1].split("}", 1)[0]
                async for key in client.scan_iter(match="conv:{*}:meta")
            }
        return len(stored - indexed), len(indexed - stored)

    async def _listing(self, http: httpx.AsyncClient, headers: dict[str, str]) -> set[str]:
        found: set[str] = set()
        offset = 0
        while True:
            answer = await self._get(
                http, f"/api/v1/conversations?offset={offset}&limit={PAGE}", headers
            )
            if answer.status_code != 200:
                self.report.problems.append(f"listing conversations: {answer.status_code}")
                return found
            page = answer.json()
            found.update(c["id"] for c in page["conversations"])
            offset += PAGE
            if offset >= page["total"]:
                return found

    async def _get(
        self, http: httpx.AsyncClient, path: str, headers: dict[str, str]
    ) -> httpx.Response:
        return await http.get(f"{self.daemon.url}{path}", headers=headers)


def _check(ack: Ack, messages: list[dict[str, Any]] | None, redactor: Redactor) -> str | None:
    """What is wrong with one acknowledged exchange in its stored conversation, or None."""
    if messages is None:
        return "missing: the conversation is gone"
    asked = [i for i, m in enumerate(messages) if ack.marker in m["content"].split()]
    if not asked:
        return "missing: the question is not stored"
    i = asked[0]
    if messages[i]["role"] != "user" or messages[i]["content"] != ack.question:
        return f"question stored as {messages[i]['content'][:80]!r}"
    if i + 1 >= len(messages):
        return "missing: the answer is not stored"
    answer = messages[i + 1]
    if answer["id"] != ack.answer_id or answer["role"] != "assistant":
        return f"the message after the question is {answer['role']} {answer['id']}"
    if answer["content"] not in (ack.answer, redactor.redact(ack.answer).text):
        return f"answer stored as {answer['content'][:80]!r}, sent {ack.answer[:80]!r}"
    return None


def _error_code(answer: httpx.Response) -> str:
    try:
        return str(answer.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "no_error_body"


async def run_chaos(
    seconds: float,
    *,
    clients: int = DEFAULT_CLIENTS,
    seed: int | None = None,
    state_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ChaosReport:
    """One bounded run on a fresh (or the given) state dir; the report, never raises for a
    failed check (see `ChaosReport.ok`)."""
    chaos = Chaos(
        state_dir or short_tempdir("ch"), seconds=seconds, clients=clients, seed=seed, env=env
    )
    return await chaos.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stress.chaos", description=__doc__)
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("CHAOS_SECONDS", DEFAULT_SECONDS)),
        help="how long faults are injected (default: $CHAOS_SECONDS or 180)",
    )
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument("--seed", type=int, default=None)
    arguments = parser.parse_args(argv)
    report = trio.run(
        lambda: run_chaos(arguments.seconds, clients=arguments.clients, seed=arguments.seed)
    )
    for line in report.lines():
        print(json.dumps(line), flush=True)
    return 0 if report.ok() else 1


def _kind(service: str) -> str:
    return "worker" if service.startswith("worker:") else service


if __name__ == "__main__":
    sys.exit(main())
