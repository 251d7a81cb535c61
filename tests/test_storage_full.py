"""A full store: a full disk under the state dir, and Redis at APPLIANCE_REDIS_MAXMEMORY.

Both refuse writes with 507 `storage_full` (nothing acknowledged is ever dropped to make
room), keep reads and deletes working, and take writes again once there is room, without
a restart. The disk is a real size-limited tmpfs mounted as the daemon's state dir (root
only); the daemon, its redis-server and its worker are the real ones.

The requests carry API keys: the gate's own bookkeeping writes (rate counter, last use)
are skipped while the store refuses writes, so the request is still served.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio

from tests.harness import Daemon, running_daemon, short_tempdir

ENV: Final = {
    "APPLIANCE_BACKUP_INTERVAL": "0",
    # Filling the store takes more requests than a minute's rate allows.
    "APPLIANCE_RATE_LIMIT": "0",
    "APPLIANCE_THREADS": "1",
    # The tmpfs is small: readiness fails only once it is really full.
    "APPLIANCE_MIN_FREE_DISK_MB": "1",
}
TMPFS_SIZE: Final = "24m"
# Plain words: the tiny model reads each as one token, and redaction keeps them.
WORDS: Final = "the quick brown fox said what you can do with all your time "


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[None]:
    """A size-limited tmpfs mounted on `path` (skips the test where that is impossible)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def fill_disk(filler: Path) -> int:
    """Write `filler` until the file system has no byte left; its size."""
    written = 0
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 14, 1 << 10, 64, 1):
            block = b"\0" * chunk
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


async def send(
    client: httpx.AsyncClient, text: str, conversation_id: str | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"message": text, "max_tokens": 2, "temperature": 0}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    return await client.post("/api/v1/chat/send", json=body)


class Written:
    """What the API acknowledged: conversation id -> [(question, answer message id)]."""

    def __init__(self) -> None:
        self.exchanges: dict[str, list[tuple[str, str]]] = {}

    def record(self, text: str, answer: httpx.Response) -> str:
        assert answer.status_code == 200, answer.text
        data = answer.json()
        self.exchanges.setdefault(data["conversation_id"], []).append((text, data["message"]["id"]))
        return str(data["conversation_id"])

    async def check(self, client: httpx.AsyncClient) -> None:
        """Every acknowledged exchange is stored, once, in order, with the text sent."""
        for conversation_id, exchanges in self.exchanges.items():
            answer = await client.get(f"/api/v1/conversations/{conversation_id}")
            assert answer.status_code == 200, (conversation_id, answer.text)
            messages = answer.json()["messages"]
            assert len(messages) == 2 * len(exchanges), conversation_id
            for n, (question, answer_id) in enumerate(exchanges):
                assert messages[2 * n]["role"] == "user"
                assert messages[2 * n]["content"] == question
                assert messages[2 * n + 1]["id"] == answer_id


def assert_storage_full(answer: httpx.Response, *advice: str) -> None:
    assert answer.status_code == 507, answer.text
    error = answer.json()["error"]
    assert error["code"] == "storage_full"
    assert error["type"] == "insufficient_storage"
    assert error["request_id"] == answer.headers["X-Request-ID"]
    for words in advice:
        assert words in error["message"], error["message"]


async def readiness(client: httpx.AsyncClient) -> tuple[int, dict[str, dict[str, str]]]:
    answer = await client.get("/api/v1/health/ready")
    return answer.status_code, {c["name"]: c for c in answer.json()["checks"]}


async def wait_until_ready(client: httpx.AsyncClient) -> None:
    with trio.fail_after(30):
        while True:
            if (await readiness(client))[0] == 200:
                return
            await trio.sleep(0.2)


async def wait_for_write(client: httpx.AsyncClient, written: Written, text: str) -> str:
    """Send until a write is accepted again (Redis retries its append once a second)."""
    with trio.fail_after(30):
        while True:
            answer = await send(client, text)
            if answer.status_code == 200:
                return written.record(text, answer)
            assert_storage_full(answer)
            await trio.sleep(0.2)


async def test_full_disk_refuses_writes_with_507_and_takes_them_again_when_space_returns() -> None:
    state_dir = short_tempdir()
    outside = short_tempdir()
    with tmpfs(state_dir, TMPFS_SIZE), trio.fail_after(240):
        # The log goes to the journal on a box; here it stays off the full disk.
        (outside / "daemon.log").touch()
        (state_dir / "daemon.log").symlink_to(outside / "daemon.log")
        written = Written()
        filler = state_dir / "filler"
        async with running_daemon(ENV, state_dir=state_dir) as daemon, daemon.client() as client:
            first = written.record("before", await send(client, "before"))
            written.record("a second turn", await send(client, "a second turn", first))
            await trio.to_thread.run_sync(fill_disk, filler)

            # The next writes are refused (the first ones may still fit the AOF's last
            # page, or wait in Redis's buffer; those are acknowledged and kept).
            for n in range(100):
                text = f"while full {WORDS} number {n}"
                answer = await send(client, text)
                if answer.status_code != 200:
                    break
                written.record(text, answer)
            assert_storage_full(answer, "no space left", "Free space")
            assert_storage_full(await send(client, "a follow-up", first), "Free space")

            # Reads go on; the daemon stays up and says why it is not ready.
            await written.check(client)
            listing = await client.get("/api/v1/conversations")
            assert listing.status_code == 200
            assert {c["id"] for c in listing.json()["conversations"]} >= set(written.exchanges)
            assert (await client.get("/api/v1/health/live")).status_code == 200
            status, checks = await readiness(client)
            assert status == 503
            assert checks["disk"]["state"] == "fail"
            assert "MB free in the state directory" in checks["disk"]["detail"]
            assert daemon.process.returncode is None

            # A backup cannot be written: a clear error, and serving goes on.
            backup = await client.post("/api/v1/admin/backups")
            assert backup.status_code == 500, backup.text
            assert backup.json()["error"]["code"] == "backup_failed"
            assert "disk space" in backup.json()["error"]["message"]
            assert daemon.process.returncode is None

            # Space returns: writes are taken again without a restart, backups work again.
            filler.unlink()
            await wait_for_write(client, written, "after the space came back")
            written.record("and a follow-up", await send(client, "and a follow-up", first))
            await wait_until_ready(client)
            assert (await client.post("/api/v1/admin/backups")).status_code == 201
            await written.check(client)
            assert daemon.process.returncode is None
        assert daemon.process.returncode == 0

        # Everything acknowledged reached the disk: a new daemon reads it all back.
        async with running_daemon(ENV, state_dir=state_dir) as daemon, daemon.client() as client:
            await written.check(client)


async def stored_conversations(daemon: Daemon) -> set[str]:
    found: set[str] = set()
    async with daemon.client() as client:
        offset = 0
        while True:
            page = (await client.get(f"/api/v1/conversations?offset={offset}&limit=100")).json()
            found.update(c["id"] for c in page["conversations"])
            offset += 100
            if offset >= page["total"]:
                return found


async def test_redis_maxmemory_refuses_writes_with_507_and_never_evicts() -> None:
    env = {**ENV, "APPLIANCE_REDIS_MAXMEMORY": "3mb"}
    text = WORDS * 12  # about 700 bytes, 270 tokens: a follow-up still fits the context
    with trio.fail_after(240):
        async with running_daemon(env) as daemon, daemon.client() as client:
            written = Written()
            # Fill with large exchanges, then with small ones until those are refused too
            # (near the cap, a small write may still fit where a large one did not).
            refusals = 0
            for n in range(5000):
                question = f"{text} {n}" if n < 50 or refusals == 0 else f"small {n}"
                answer = await send(client, question)
                if answer.status_code == 200:
                    written.record(question, answer)
                    refusals = 0
                    continue
                assert_storage_full(answer, "APPLIANCE_REDIS_MAXMEMORY", "Delete old conversations")
                refusals += 1
                if refusals == 3:
                    break
            assert refusals == 3, "the store never filled"
            assert len(written.exchanges) > 10
            first = next(iter(written.exchanges))
            # A follow-up of a few hundred bytes (a few bytes may come free near the cap,
            # so a tiny one could still fit; a large one would not fit the context).
            assert_storage_full(await send(client, f"{WORDS * 4} one more turn", first))

            # Nothing was evicted to make room: every acknowledged conversation is there.
            await written.check(client)
            assert await stored_conversations(daemon) == set(written.exchanges)
            metrics = (await client.get("/api/v1/health/metrics")).json()
            assert metrics["services"]["redis"]["memory_percent"] >= 90

            # Deletes work, and free room for new writes (no restart).
            removed = list(written.exchanges)[: len(written.exchanges) // 4]
            for conversation_id in removed:
                answer = await client.delete(f"/api/v1/conversations/{conversation_id}")
                assert answer.status_code == 200, answer.text
                del written.exchanges[conversation_id]
            await wait_for_write(client, written, "room again")
            kept = list(written.exchanges)[-1]
            written.record("a turn again", await send(client, "a turn again", kept))
            await written.check(client)
            assert await stored_conversations(daemon) == set(written.exchanges)
