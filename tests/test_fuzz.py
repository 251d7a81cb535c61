"""Schemathesis against the real daemon: every documented operation with an admin key, and
the user endpoints with a user key.

Checked: no server error (500, or 502/504 with the remote LLM off; 503/507 are designed
answers), every status, content type, header and body as documented (SSE events too),
input the document refuses answered with a 4xx, methods an endpoint does not take answered
405 with `Allow`; and afterwards the daemon is still ready and logged no unhandled error.

`make test` runs a few examples per operation (plus schemathesis' deterministic coverage
cases); `make fuzz` raises FUZZ_EXAMPLES. schemathesis runs as its own process (its CLI):
its synchronous engine never blocks this test's Trio loop, and its JSON report gives the
figures.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Final

import trio

from tests.harness import Daemon, running_daemon

FUZZ_EXAMPLES: Final = int(os.environ.get("FUZZ_EXAMPLES", "5"))
# Backups take about a second each; a few cover the endpoint.
BACKUP_EXAMPLES: Final = min(FUZZ_EXAMPLES, 3)
MAX_TOKENS: Final = 64
DAEMON_ENV: Final = {
    # One fast client: APPLIANCE_RATE_LIMIT would refuse most of its requests.
    "APPLIANCE_RATE_LIMIT": "0",
    # Short generations keep the run quick.
    "APPLIANCE_MAX_TOKENS": str(MAX_TOKENS),
    "APPLIANCE_DEFAULT_MAX_TOKENS": "16",
}
USER_TAGS: Final = ("chat", "openai", "privacy", "usage")
SKIPPED_CHECKS: Final = {
    # These two send requests without the key or with a wrong one; ten of those a minute
    # from one address lock the address out (429 for every request, by design). Refused
    # keys are tested in test_auth.py and test_openapi.py.
    "missing_required_header",
    "ignored_auth",
    # A request the document allows may still be refused for what a schema cannot say (a
    # prompt longer than the model's context, 12.0 sent for an integer).
    "positive_data_acceptance",
}
CONFIG: Final = f"""
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503", "507"]

# schemathesis' list, and 413: a body over APPLIANCE_MAX_BODY_BYTES is refused unread.
[checks.negative_data_rejection]
expected-statuses = [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"
]

[generation]
max-examples = {FUZZ_EXAMPLES}
with-security-parameters = false
database = "none"

[[operations]]
include-name = "POST /api/v1/admin/backups"
generation.max-examples = {BACKUP_EXAMPLES}
"""


def fuzz_schema(document: dict[str, Any]) -> dict[str, Any]:
    """The served document, fitted to this run: `max_tokens` bounded by this daemon's
    APPLIANCE_MAX_TOKENS, and no `sample_seconds` (each would hold a request up to 10 s;
    test_http.py covers it)."""
    schema: dict[str, Any] = json.loads(json.dumps(document))
    for item in schema["paths"].values():
        for operation in item.values():
            if "parameters" in operation:
                operation["parameters"] = [
                    p for p in operation["parameters"] if p["name"] != "sample_seconds"
                ]
    for struct in schema["components"]["schemas"].values():
        for name, field in struct.get("properties", {}).items():
            if name in ("max_tokens", "max_completion_tokens"):
                field["anyOf"][0]["maximum"] = MAX_TOKENS
    return schema


async def schemathesis_run(
    daemon: Daemon, key: str, workdir: Path, name: str, *filters: str
) -> tuple[dict[str, Any], str]:
    """One schemathesis run; its JSON report and its console output."""
    report = workdir / f"{name}.json"
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--no-color",
        "--config-file",
        str(workdir / "schemathesis.toml"),
        "run",
        str(workdir / "schema.json"),
        "--url",
        daemon.url,
        "--header",
        f"Authorization: Bearer {key}",
        "--workers",
        "1",
        "--exclude-checks",
        ",".join(sorted(SKIPPED_CHECKS)),
        "--output-truncate",
        "false",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        *filters,
    ]
    done = await trio.run_process(
        command, cwd=workdir, capture_stdout=True, capture_stderr=True, check=False
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert report.exists(), output[-4000:]
    result: dict[str, Any] = json.loads(report.read_text())
    return result, output


def _summary(name: str, result: dict[str, Any], seconds: float) -> str:
    cases = result["test_cases"]
    return (
        f"{name}: {result['operations']['tested']} operations, {cases['generated']} test cases, "
        f"{cases['with_failures']} failing, {cases['errored']} errored, {seconds:.1f} s, "
        f"seed {result['seed']}"
    )


def _access_lines(daemon: Daemon) -> list[dict[str, Any]]:
    return [line for line in daemon.log_lines() if line.get("logger") == "appliance.access"]


async def test_schemathesis_finds_nothing_and_the_daemon_stays_ready(tmp_path: Path) -> None:
    with trio.fail_after(120 + 6 * FUZZ_EXAMPLES):
        async with running_daemon(DAEMON_ENV) as daemon:
            user = await daemon.create_key("fuzz-user")
            async with daemon.client() as admin:
                served = (await admin.get("/api/v1/openapi.json")).json()
            (tmp_path / "schema.json").write_text(json.dumps(fuzz_schema(served)))
            (tmp_path / "schemathesis.toml").write_text(CONFIG)
            runs = []
            # The user key's run first: the admin run revokes the keys it finds (schemathesis
            # feeds names from GET /api/v1/admin/keys to DELETE /api/v1/admin/keys/{name}).
            for name, key, filters in (
                (
                    "user key, user operations",
                    user,
                    tuple(f"--include-tag={tag}" for tag in USER_TAGS),
                ),
                ("admin key, every operation", daemon.api_key, ()),
            ):
                started = time.monotonic()
                result, output = await schemathesis_run(daemon, key, tmp_path, name[:5], *filters)
                summary = _summary(name, result, time.monotonic() - started)
                print(summary)
                runs.append((result, output, summary))
            async with daemon.client() as admin:
                ready = await admin.get("/api/v1/health/ready")
        for result, output, summary in runs:
            assert result["exit_code"] == 0 and not result["failures"], f"{summary}\n{output}"
            assert result["test_cases"]["errored"] == 0, f"{summary}\n{output}"
            operations = result["operations"]
            assert operations["tested"] == operations["selected"] >= 9, summary
        assert runs[1][0]["operations"]["tested"] == len(_operations(served))
        assert ready.status_code == 200, ready.text
        lines = _access_lines(daemon)
        # The run never locked itself out: no request went without a valid key.
        refused = [line["message"] for line in lines if line["status"] == 401]
        assert not refused, refused[:20]
        server_errors = [line for line in lines if line["status"] >= 500]
        assert all(line["status"] in (503, 507) for line in server_errors), server_errors
        unhandled = [line for line in daemon.log_lines() if line.get("level") == "ERROR"]
        assert not unhandled, unhandled[:3]


def _operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    return [(method, path) for path, item in document["paths"].items() for method in item]


async def _answer(stream: trio.SocketStream) -> bytes:
    """One HTTP/1.1 answer with a Content-Length body, read whole."""
    data = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        while len(body) < length:
            body += await stream.receive_some(65536)
    return head


async def test_an_answer_given_before_the_body_arrived_leaves_the_connection_usable() -> None:
    """Found by the fuzzer: a refusal (405, OPTIONS, a wrong key) answered before the
    request's body had arrived left the keep-alive connection stuck."""
    with trio.fail_after(60):
        async with running_daemon() as daemon:
            host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
            body = b'{"text": "hello"}'
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                for method, key in (("PUT", daemon.api_key), ("OPTIONS", ""), ("POST", "x")):
                    await stream.send_all(
                        f"{method} /api/v1/privacy/redact HTTP/1.1\r\nHost: x\r\n"
                        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode()
                    )
                    await trio.sleep(0.1)  # the answer is ready before the body comes
                    await stream.send_all(body)
                    head = await _answer(stream)
                    assert head.split(b" ")[1] in (b"200", b"401", b"405"), head
                await stream.send_all(b"GET /api/v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await _answer(stream)
            assert head.startswith(b"HTTP/1.1 200"), head
