"""HTTPS served by the daemon itself (APPLIANCE_TLS_CERT/KEY): real clients that verify a
certificate made here, and the checks that refuse unusable files before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import trio

from tests.certs import self_signed, trusting
from tests.harness import daemon_environment, free_port, running_daemon, short_tempdir


async def test_https_with_httpx_and_the_openai_client() -> None:
    cert, key = self_signed(short_tempdir("tc"))
    env = {
        "APPLIANCE_TLS_CERT": str(cert),
        "APPLIANCE_TLS_KEY": str(key),
        "APPLIANCE_BIND": f"127.0.0.1:{free_port()}",
    }
    with trio.fail_after(120):
        async with running_daemon(env) as daemon:
            # READY came, so the daemon's own probe got through TLS too.
            assert daemon.url.startswith("https://127.0.0.1:")
            context = trusting(cert)
            async with daemon.client(verify=context) as client:
                live = await client.get("/api/v1/health/live")
                assert live.status_code == 200 and live.json()["status"] == "alive"
                assert live.extensions["http_version"] == b"HTTP/1.1"
                ready = await client.get("/api/v1/health/ready")
                assert ready.status_code == 200, ready.text
            user = await daemon.create_key("tls-user")
            async with httpx.AsyncClient(verify=context, timeout=30) as http:
                oai = openai.AsyncOpenAI(
                    base_url=f"{daemon.url}/v1", api_key=user, http_client=http
                )
                models = await oai.models.list()
                assert [model.id for model in models.data] == ["tiny"]
                answer = await oai.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
                )
                assert answer.choices[0].finish_reason in ("length", "stop")
                with pytest.raises(openai.AuthenticationError):
                    await openai.AsyncOpenAI(
                        base_url=f"{daemon.url}/v1", api_key="ak-wrong", http_client=http
                    ).models.list()
            # `appliance status` reaches the daemon over HTTPS too (pinned to the certificate).
            status = await trio.run_process(
                [sys.executable, "-m", "appliance", "status", "--json"],
                env=daemon.env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["ready"] is True
            # A client that does not trust the certificate is refused by TLS itself...
            async with httpx.AsyncClient(timeout=10) as untrusting:
                with pytest.raises(httpx.ConnectError):
                    await untrusting.get(f"{daemon.url}/api/v1/health/live")
            # ...and plain HTTP on the same port gets no answer.
            async with httpx.AsyncClient(timeout=10) as plain:
                with pytest.raises(httpx.HTTPError):
                    await plain.get(
                        daemon.url.replace("https://", "http://") + "/api/v1/health/live"
                    )


def _config_problems(tmp_path: Path, extra: dict[str, str]) -> list[str]:
    (tmp_path / "state").mkdir(exist_ok=True)
    env = daemon_environment(tmp_path / "state", extra)
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems: list[str] = json.loads(done.stdout)["problems"]
    assert (done.returncode == 1) == bool(problems)
    return problems


def test_unusable_tls_files_are_refused_with_one_line_each(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    other_cert, other_key = self_signed(tmp_path, "other")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(key),
            "-out",
            str(encrypted),
            "-aes256",
            "-passout",
            "pass:secret",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    encrypted.chmod(0o600)
    cases = [
        ({"APPLIANCE_TLS_CERT": str(cert)}, "APPLIANCE_TLS_KEY is not"),
        ({"APPLIANCE_TLS_KEY": str(key)}, "APPLIANCE_TLS_CERT is not"),
        (
            {"APPLIANCE_TLS_CERT": str(tmp_path / "missing.crt"), "APPLIANCE_TLS_KEY": str(key)},
            "does not exist",
        ),
        (
            {"APPLIANCE_TLS_CERT": str(cert), "APPLIANCE_TLS_KEY": str(other_key)},
            "do not load as a PEM certificate chain and its private key",
        ),
        (
            {"APPLIANCE_TLS_CERT": str(tmp_path), "APPLIANCE_TLS_KEY": str(key)},
            "not a regular file",
        ),
        (
            {"APPLIANCE_TLS_CERT": str(cert), "APPLIANCE_TLS_KEY": str(encrypted)},
            "encrypted with a passphrase",
        ),
    ]
    for extra, needle in cases:
        problems = _config_problems(tmp_path, extra)
        assert len(problems) == 1 and needle in problems[0], (extra, problems)
        assert "\n" not in problems[0] and "BEGIN" not in problems[0]
    assert (
        _config_problems(
            tmp_path, {"APPLIANCE_TLS_CERT": str(other_cert), "APPLIANCE_TLS_KEY": str(other_key)}
        )
        == []
    )


def test_serve_with_a_mismatched_key_stops_before_anything_starts(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    _, other_key = self_signed(tmp_path, "other")
    state = tmp_path / "state"
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "serve"],
        env=daemon_environment(
            short_tempdir(),
            {
                "APPLIANCE_TLS_CERT": str(cert),
                "APPLIANCE_TLS_KEY": str(other_key),
                "APPLIANCE_STATE_DIR": str(state),
            },
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "APPLIANCE_TLS_CERT and APPLIANCE_TLS_KEY do not load" in done.stderr
    assert not state.exists()
