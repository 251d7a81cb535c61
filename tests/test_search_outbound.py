"""With search on, the appliance contacts the search provider's host and nothing else.

Every Python process of the daemon (and its worker) runs with the audit hook of
tests/test_shared_redis.py, which records each socket connect and name lookup. The
SearXNG stand-in listens on 127.0.0.2 (a loopback address of its own, so that its traffic
is told apart from the daemon's own on 127.0.0.1), and its results point at a listener on
127.0.0.3 that records whoever connects: results are never fetched.
"""

from __future__ import annotations

import json
import os
import socket
from functools import partial
from typing import Any

import trio

from tests.harness import install_tiny_model, running_daemon, short_tempdir
from tests.searxng import result, searxng_standin
from tests.test_shared_redis import _AUDIT_HOOK

PROVIDER_HOST = "127.0.0.2"
RESULT_HOST = "127.0.0.3"


async def test_with_search_on_only_the_providers_host_is_contacted() -> None:
    hook_dir = short_tempdir("hk")
    (hook_dir / "sitecustomize.py").write_text(_AUDIT_HOOK)
    log = hook_dir / "network.jsonl"
    visits: list[str] = []

    async def visited(stream: trio.SocketStream) -> None:
        visits.append("connected")
        await stream.aclose()

    state = short_tempdir()
    install_tiny_model(state / "models", context_length=4096)
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, visited, 0, host=RESULT_HOST))
            bait_port = listeners[0].socket.getsockname()[1]
            bait = [
                result(i, url=f"http://{RESULT_HOST}:{bait_port}/page-{i}") for i in range(1, 4)
            ]
            async with searxng_standin(PROVIDER_HOST, results=bait) as standin:
                env = {
                    "PYTHONPATH": os.pathsep.join(
                        filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")])
                    ),
                    "NETWORK_AUDIT_LOG": str(log),
                    "APPLIANCE_BACKUP_INTERVAL": "0",
                    "SEARCH_ENABLED": "true",
                    "APPLIANCE_SEARCH_URL": standin.url,
                }
                async with running_daemon(env, state_dir=state) as daemon:
                    async with daemon.client() as client:
                        for mode in ("always", "auto"):
                            answer = await client.post(
                                "/api/v1/chat/send",
                                json={
                                    "message": "Who wrote Hamlet?",
                                    "search": mode,
                                    "max_tokens": 3,
                                },
                            )
                            assert answer.status_code == 200, answer.text
                            assert len(answer.json()["sources"]) == 3
                    await daemon.stop()
                    daemon_port = int(daemon.url.rsplit(":", 1)[1])
            nursery.cancel_scope.cancel()
    assert len(standin.received) == 2
    assert visits == []

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert daemon.process.pid in {r["pid"] for r in records if r["event"] == "start"}
    inet = [
        (r["address"][0], r["address"][1])
        for r in records
        if r["event"] != "start"
        and r["event"] != "socket.getaddrinfo"
        and r["family"] != socket.AF_UNIX
    ]
    # The provider was connected to, once per search; every other connection is the
    # daemon's own (its HTTP self-probe).
    assert inet.count((PROVIDER_HOST, standin.port)) == 2
    assert set(inet) <= {(PROVIDER_HOST, standin.port), ("127.0.0.1", daemon_port)}
    looked_up: set[Any] = {r["host"] for r in records if r["event"] == "socket.getaddrinfo"}
    assert looked_up <= {PROVIDER_HOST, "127.0.0.1", "localhost"}
