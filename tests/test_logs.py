"""Log lines: JSON shape, secret scrubbing, and the native journal protocol with real journald."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from appliance.logs import JOURNAL_SOCKET, configure_logging, encode_journal_fields
from tests.harness import running_daemon

JOURNALD = Path("/lib/systemd/systemd-journald")
SECRET = "do-not-log-this-secret-0123456789abcdef"


@pytest.fixture
def json_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("DEBUG", secrets=[SECRET], stream=stream, journal_socket="/nonexistent")
    yield stream
    configure_logging("WARNING", journal_socket="/nonexistent")


def test_json_line_shape(json_stream: io.StringIO) -> None:
    logging.getLogger("appliance.chat").info(
        "Chat request completed",
        extra={"request_id": "req-123", "endpoint": "/api/v1/chat/send", "duration_ms": 250},
    )
    entry = json.loads(json_stream.getvalue().splitlines()[-1])
    assert entry["level"] == "INFO"
    assert entry["logger"] == "appliance.chat"
    assert entry["message"] == "Chat request completed"
    assert entry["request_id"] == "req-123"
    assert entry["endpoint"] == "/api/v1/chat/send"
    assert entry["duration_ms"] == 250
    assert entry["timestamp"].endswith("Z")


def test_secrets_are_scrubbed_from_messages_and_tracebacks(json_stream: io.StringIO) -> None:
    log = logging.getLogger("appliance.test")
    log.warning("connecting with key %s", SECRET)
    try:
        raise ValueError(f"bad key {SECRET}")
    except ValueError:
        log.exception("failed")
    text = json_stream.getvalue()
    assert SECRET not in text
    assert text.count("[SECRET]") == 2


def test_journal_encoding_handles_newlines() -> None:
    packet = encode_journal_fields({"MESSAGE": b"two\nlines", "PRIORITY": b"6"})
    assert packet == b"MESSAGE\n\x09\x00\x00\x00\x00\x00\x00\x00two\nlines\nPRIORITY=6\n"


@pytest.fixture
def journald() -> Iterator[None]:
    """A real systemd-journald on the host (root only), stopped afterwards."""
    if os.geteuid() != 0 or not JOURNALD.exists() or not shutil.which("journalctl"):
        pytest.skip("needs root, systemd-journald and journalctl")
    created = not Path(JOURNAL_SOCKET).parent.exists()
    Path(JOURNAL_SOCKET).parent.mkdir(parents=True, exist_ok=True)
    process = None
    if not _journal_answers():
        process = subprocess.Popen(
            [str(JOURNALD)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not _journal_answers():
            assert time.monotonic() < deadline, "systemd-journald did not start"
            time.sleep(0.05)
    yield
    if process is not None:
        process.terminate()
        process.wait(timeout=10)
        if created:
            shutil.rmtree(Path(JOURNAL_SOCKET).parent, ignore_errors=True)


def _journal_answers() -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(JOURNAL_SOCKET)
        except OSError:
            return False
    return True


def _journal_entries(field: str, value: str) -> list[dict[str, str]]:
    deadline = time.monotonic() + 10
    while True:
        done = subprocess.run(
            ["journalctl", f"{field}={value}", "-o", "json", "--no-pager"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        entries = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        if entries or time.monotonic() > deadline:
            return entries
        time.sleep(0.2)


@pytest.mark.journald
async def test_request_lines_reach_journald_with_their_fields(journald: None) -> None:
    request_id = f"req-{uuid.uuid4().hex[:12]}"
    with trio.fail_after(60):
        async with running_daemon() as daemon, daemon.client() as client:
            await client.get("/api/v1/health/ready", headers={"X-Request-ID": request_id})
    entries = await trio.to_thread.run_sync(_journal_entries, "REQUEST_ID", request_id)
    assert len(entries) == 1
    entry = entries[0]
    assert entry["ENDPOINT"] == "/api/v1/health/ready"
    assert entry["STATUS"] == "200"
    assert entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == "appliance"
    assert entry["LOGGER"] == "appliance.access"
    assert "DURATION_MS" in entry


@pytest.mark.journald
def test_under_systemd_stdout_entries_go_only_to_the_journal(
    journald: None, tmp_path: Path
) -> None:
    # systemd sets JOURNAL_STREAM to stdout's device:inode; a file stands in for the stream.
    out = tmp_path / "stdout"
    marker = f"marker-{uuid.uuid4().hex}"
    with out.open("w") as handle:
        info = os.fstat(handle.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import logging; from appliance.logs import configure_logging; "
                "configure_logging('INFO'); "
                f"logging.getLogger('appliance.t').info('{marker}', "
                f"extra={{'request_id': '{marker}'}})",
            ],
            stdout=handle,
            env=env,
            check=True,
            timeout=60,
        )
    assert marker not in out.read_text()
    entries = _journal_entries("REQUEST_ID", marker)
    assert [e["MESSAGE"] for e in entries] == [marker]
