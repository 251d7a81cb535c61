"""What production refuses before anything starts, one line each with the fix, and a taken
port that stops `appliance serve` at once, naming the address and APPLIANCE_BIND."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.certs import self_signed
from tests.harness import daemon_environment, short_tempdir

GOOD_PRODUCTION = "APPLIANCE_ENV=production\nSECRET_KEY=" + "k" * 40 + "\nPRIVACY_SALT=some-salt\n"


def _env_file(folder: Path, text: str, mode: int = 0o600) -> Path:
    path = folder / "appliance.env"
    path.write_text(GOOD_PRODUCTION + text)
    path.chmod(mode)
    return path


def _check(folder: Path, env_file: Path, extra: dict[str, str] | None = None) -> list[str]:
    env = daemon_environment(folder, extra or {})
    env["APPLIANCE_ENV_FILE"] = str(env_file)
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems: list[str] = json.loads(done.stdout)["problems"]
    assert (done.returncode == 1) == bool(problems), done
    for problem in problems:
        assert "\n" not in problem and "k" * 40 not in problem
    return problems


def test_a_good_production_env_file_passes(tmp_path: Path) -> None:
    assert _check(tmp_path, _env_file(tmp_path, "")) == []


def test_an_env_file_others_may_read_is_refused_in_production(tmp_path: Path) -> None:
    for mode in (0o644, 0o640, 0o604, 0o620):
        path = _env_file(tmp_path, "", mode)
        [problem] = _check(tmp_path, path)
        assert f"mode {mode:04o}" in problem
        assert f"chmod 600 {path}" in problem
    # Development keeps working with a readable file (tests, a laptop).
    dev = tmp_path / "dev.env"
    dev.write_text("APPLIANCE_ENV=development\n")
    dev.chmod(0o644)
    assert _check(tmp_path, dev) == []


def test_encryption_at_rest_off_is_refused_in_production(tmp_path: Path) -> None:
    [problem] = _check(tmp_path, _env_file(tmp_path, "PRIVACY_ENCRYPT_AT_REST=false\n"))
    assert problem.startswith("PRIVACY_ENCRYPT_AT_REST=false is refused in production")
    assert "remove the line" in problem


def test_a_plaintext_remote_llm_on_another_machine_needs_the_explicit_override(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "remote.key"
    key_file.write_text("sk-test\n")
    key_file.chmod(0o600)
    remote = (
        f"REMOTE_LLM_ENABLED=true\nAPPLIANCE_REMOTE_LLM_MODEL=m\n"
        f"APPLIANCE_REMOTE_LLM_KEY_FILE={key_file}\n"
    )

    def problems(url: str, more: str = "") -> list[str]:
        return _check(
            tmp_path, _env_file(tmp_path, f"{remote}APPLIANCE_REMOTE_LLM_URL={url}\n{more}")
        )

    [problem] = problems("http://llm.example.net:8080/v1")
    assert "plain http://" in problem and "'llm.example.net'" in problem
    assert "use https://" in problem and "APPLIANCE_REMOTE_LLM_ALLOW_PLAINTEXT=true" in problem
    assert problems("http://10.1.2.3/v1") != []
    # Named risk accepted, TLS, or loopback (a gateway on the box): accepted.
    assert (
        problems("http://llm.example.net:8080/v1", "APPLIANCE_REMOTE_LLM_ALLOW_PLAINTEXT=true\n")
        == []
    )
    assert problems("https://llm.example.net/v1") == []
    assert problems("http://127.0.0.1:9000/v1") == []
    assert problems("http://[::1]:9000/v1") == []
    assert problems("http://localhost:9000/v1") == []


def test_a_tls_key_every_user_may_read_is_refused_in_production(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tls = f"APPLIANCE_TLS_CERT={cert}\nAPPLIANCE_TLS_KEY={key}\n"
    assert _check(tmp_path, _env_file(tmp_path, tls)) == []
    key.chmod(0o644)
    [problem] = _check(tmp_path, _env_file(tmp_path, tls))
    assert "APPLIANCE_TLS_KEY" in problem and f"chmod 600 {key}" in problem


def test_serve_refuses_every_problem_at_once_and_starts_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = _env_file(
        tmp_path, f"PRIVACY_ENCRYPT_AT_REST=false\nAPPLIANCE_STATE_DIR={state}\n", 0o644
    )
    env = daemon_environment(short_tempdir(), {})
    env["APPLIANCE_ENV_FILE"] = str(path)
    env.pop("APPLIANCE_STATE_DIR")
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert any("PRIVACY_ENCRYPT_AT_REST=false" in line for line in lines)
    assert any("mode 0644" in line for line in lines)
    assert not state.exists()


def test_a_taken_port_stops_serve_at_once_naming_it() -> None:
    state = short_tempdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "appliance", "serve"],
            env=daemon_environment(state, {"APPLIANCE_BIND": f"127.0.0.1:{port}"}),
            capture_output=True,
            text=True,
            timeout=120,
        )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert f"127.0.0.1:{port} (APPLIANCE_BIND)" in output
    assert "already in use" in output and "Errno" not in output
    # Before Redis, the model worker or anything else: nothing was started or created.
    assert not (state / "redis").exists() and not (state / "run").exists()
    assert "starting" not in output
