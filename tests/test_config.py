"""Settings from defaults, env file and environment; `appliance init` and `config check`."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_settings, masked, production_problems
from appliance.envfile import EnvFileError, parse_env_file

STRONG = "k" * 40


def _env_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.env"
    path.write_text(text)
    return path


def test_defaults_and_derived_directories(tmp_path: Path) -> None:
    settings = load_settings({"APPLIANCE_STATE_DIR": "/srv/st"}, _env_file(tmp_path, ""))
    assert settings.bind == "127.0.0.1:8000"
    assert settings.models_dir == "/srv/st/models"
    assert settings.backup_dir == "/srv/st/backups"
    assert settings.runtime_dir == "/srv/st/run"
    assert settings.privacy_encrypt_at_rest is True
    assert settings.privacy_redact_aggressiveness == "strict"
    assert settings.privacy_retention_days == 7
    assert settings.budget_enforce is True
    assert settings.search_enabled is False and settings.remote_llm_enabled is False
    assert settings.redis_maxmemory == "256mb"


def test_systemd_directories_are_the_defaults_under_systemd(tmp_path: Path) -> None:
    settings = load_settings(
        {"STATE_DIRECTORY": "/var/lib/appliance", "RUNTIME_DIRECTORY": "/run/appliance"},
        _env_file(tmp_path, ""),
    )
    assert settings.state_dir == "/var/lib/appliance"
    assert settings.runtime_dir == "/run/appliance"


def test_environment_overrides_env_file_overrides_defaults(tmp_path: Path) -> None:
    path = _env_file(
        tmp_path,
        "# comment\n\nexport APPLIANCE_BIND=0.0.0.0:9000\n"
        'APPLIANCE_LOG_LEVEL="debug"\nBUDGET_ENFORCE=no\n',
    )
    settings = load_settings({"APPLIANCE_LOG_LEVEL": "error"}, path)
    assert settings.bind == "0.0.0.0:9000"
    assert settings.log_level == "ERROR"
    assert settings.budget_enforce is False


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"APPLIANCE_BIND": "localhost"}, "APPLIANCE_BIND"),
        ({"APPLIANCE_BIND": "127.0.0.1:99999"}, "APPLIANCE_BIND"),
        ({"APPLIANCE_ENV": "staging"}, "APPLIANCE_ENV"),
        ({"APPLIANCE_LOG_LEVEL": "loud"}, "APPLIANCE_LOG_LEVEL"),
        ({"APPLIANCE_MAX_BODY_BYTES": "ten"}, "APPLIANCE_MAX_BODY_BYTES"),
        ({"APPLIANCE_STATE_DIR": "relative/dir"}, "APPLIANCE_STATE_DIR"),
        ({"APPLIANCE_REDIS_URL": "http://nope"}, "APPLIANCE_REDIS_URL"),
        ({"APPLIANCE_REDIS_MAXMEMORY": "lots"}, "APPLIANCE_REDIS_MAXMEMORY"),
        ({"PRIVACY_RETENTION_DAYS": "0"}, "PRIVACY_RETENTION_DAYS"),
        ({"PRIVACY_REDACT_AGGRESSIVENESS": "max"}, "PRIVACY_REDACT_AGGRESSIVENESS"),
        ({"BUDGET_ENFORCE": "maybe"}, "BUDGET_ENFORCE"),
        ({"BACKEND_CORS_ORIGINS": "not a url"}, "BACKEND_CORS_ORIGINS"),
        ({"APPLIANCE_TYPO": "1"}, "APPLIANCE_TYPO"),
    ],
)
def test_invalid_values_are_refused_naming_the_key(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env, _env_file(tmp_path, ""))
    message = str(caught.value)
    assert named in message
    assert "\n" not in message


def test_unknown_key_in_env_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SECRT_KEY"):
        load_settings({}, _env_file(tmp_path, "SECRT_KEY=abc\n"))


def test_env_file_syntax_errors_name_the_line_not_the_value(tmp_path: Path) -> None:
    path = _env_file(tmp_path, "APPLIANCE_ENV=production\nthis line is wrong hunter2\n")
    with pytest.raises(EnvFileError) as caught:
        parse_env_file(path)
    assert "line 2" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_secret_values_never_appear_in_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"SECRET_KEY": "x" * 5, "APPLIANCE_BIND": "bad"}, _env_file(tmp_path, ""))
    assert "xxxxx" not in str(caught.value)


def test_production_requires_strong_secrets_and_exact_cors(tmp_path: Path) -> None:
    empty = _env_file(tmp_path, "")
    weak = load_settings({"APPLIANCE_ENV": "production", "SECRET_KEY": "short"}, empty)
    problems = production_problems(weak)
    assert any(p.startswith("SECRET_KEY is 5 characters") for p in problems)
    assert any(p.startswith("PRIVACY_SALT") for p in problems)
    wildcard = load_settings(
        {
            "APPLIANCE_ENV": "production",
            "SECRET_KEY": STRONG,
            "PRIVACY_SALT": "salt",
            "BACKEND_CORS_ORIGINS": '["https://a.example", "*"]',
        },
        empty,
    )
    assert [p.split(" ")[0] for p in production_problems(wildcard)] == ["BACKEND_CORS_ORIGINS"]
    good = load_settings(
        {"APPLIANCE_ENV": "production", "SECRET_KEY": STRONG, "PRIVACY_SALT": "salt"}, empty
    )
    assert production_problems(good) == []
    # Development tolerates a missing secret.
    assert production_problems(load_settings({}, empty)) == []


def test_masked_settings_hide_secrets(tmp_path: Path) -> None:
    settings = load_settings(
        {"SECRET_KEY": STRONG, "PRIVACY_SALT": "pepper"}, _env_file(tmp_path, "")
    )
    shown = masked(settings)
    assert shown["SECRET_KEY"] == "set (40 characters)"
    assert shown["PRIVACY_SALT"] == "set (6 characters)"
    assert STRONG not in json.dumps(shown)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        env=base,
        timeout=60,
    )


def test_init_writes_a_private_env_file_once(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "appliance.env"
    first = _cli("--env-file", str(path), "init")
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    values = parse_env_file(path)
    assert values["APPLIANCE_ENV"] == "production"
    assert len(values["SECRET_KEY"]) >= 32
    assert values["PRIVACY_SALT"]
    assert values["SECRET_KEY"] not in first.stdout + first.stderr
    before = path.read_bytes()
    second = _cli("--env-file", str(path), "init")
    assert second.returncode == 1
    assert "already exists" in second.stderr
    assert path.read_bytes() == before
    # The written file passes the production checks.
    check = _cli("--env-file", str(path), "config", "check")
    assert check.returncode == 0, check.stderr
    assert values["SECRET_KEY"] not in check.stdout
    assert "set (64 characters)" in check.stdout


def test_config_check_reports_problems_with_exit_1(tmp_path: Path) -> None:
    path = _env_file(tmp_path, "APPLIANCE_ENV=production\nSECRET_KEY=weak\n")
    done = _cli("--env-file", str(path), "config", "check", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["valid"] is False
    assert report["settings"]["SECRET_KEY"] == "set (4 characters)"
    invalid = _cli("--env-file", str(path), "config", "check", env={"APPLIANCE_BIND": "nowhere"})
    assert invalid.returncode == 1
    assert "APPLIANCE_BIND" in invalid.stderr


def test_version_flag() -> None:
    done = _cli("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("appliance ")


@pytest.mark.parametrize("switch", ["SEARCH_ENABLED", "REMOTE_LLM_ENABLED"])
def test_external_service_switches_are_honest(tmp_path: Path, switch: str) -> None:
    state = tmp_path / "state"
    done = _cli(
        "--env-file",
        str(_env_file(tmp_path, "")),
        "serve",
        env={switch: "true", "APPLIANCE_STATE_DIR": str(state)},
    )
    assert done.returncode == 1
    assert f"{switch}=true" in done.stderr
    assert not state.exists()


def test_the_configuration_page_documents_every_setting_and_no_other() -> None:
    from appliance.config import DOCS

    page = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \|", page, re.MULTILINE)
    assert [name for name in DOCS if name not in rows] == [], "settings missing from the table"
    assert [name for name in rows if name not in DOCS] == [], "rows for settings that do not exist"
    assert len(rows) == len(set(rows)), "a setting listed twice"
