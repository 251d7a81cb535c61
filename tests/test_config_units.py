"""Settings, one rule at a time: every default an operator gets without an env file, each
setting's boundary (the last value accepted, the first refused) with the exact message that
names it, the parsed forms (durations, sizes, model lists, origins, proxies, hosts), where
the settings and the directories come from, and each problem that stops a start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import msgspec
import pytest

from appliance.config import (
    ConfigError,
    Settings,
    env_file_problems,
    load_settings,
    masked,
    parse_size,
    production_problems,
)
from appliance.config_docs import DOCS
from appliance.envfile import DEFAULT_ENV_FILE
from appliance.startup_checks import startup_problems

STRONG: Final = "k" * 32
HASH: Final = "0123456789abcdef:" + "a" * 64
# What an operator gets without setting anything (the state directory aside).
DEFAULTS: Final = {
    "APPLIANCE_ENV": "development",
    "APPLIANCE_BIND": "127.0.0.1:8000",
    "APPLIANCE_STATE_DIR": "/srv/st",
    "APPLIANCE_MODELS_DIR": "/srv/st/models",
    "APPLIANCE_BACKUP_DIR": "/srv/st/backups",
    "APPLIANCE_RUNTIME_DIR": "/srv/st/run",
    "APPLIANCE_REDIS_URL": "",
    "APPLIANCE_REDIS_MAXMEMORY": "256mb",
    "APPLIANCE_LOG_LEVEL": "INFO",
    "APPLIANCE_MAX_BODY_BYTES": "1048576",
    "APPLIANCE_GRACEFUL_TIMEOUT": "30.0",
    "APPLIANCE_MIN_FREE_DISK_MB": "100",
    "APPLIANCE_RESTART_LIMIT": "5",
    "APPLIANCE_RESTART_WINDOW": "60.0",
    "APPLIANCE_DEFAULT_MODEL": "",
    "APPLIANCE_PRELOAD": "true",
    "APPLIANCE_CONTEXT_SIZE": "4096",
    "APPLIANCE_THREADS": "0",
    "APPLIANCE_GPU_LAYERS": "0",
    "APPLIANCE_MAX_QUEUE": "8",
    "APPLIANCE_PARALLEL": "4",
    "APPLIANCE_REQUEST_TIMEOUT": "300.0",
    "APPLIANCE_MAX_TOKENS": "4096",
    "APPLIANCE_DEFAULT_MAX_TOKENS": "512",
    "APPLIANCE_WORKER_MAX_REQUESTS": "1000",
    "APPLIANCE_WORKER_MAX_RSS_MB": "3072",
    "SECRET_KEY": "not set",
    "PRIVACY_SALT": "not set",
    "SECRET_KEY_PREVIOUS": "not set",
    "PRIVACY_SALT_PREVIOUS": "not set",
    "APPLIANCE_ADMIN_KEY_HASH": "",
    "APPLIANCE_TOKENS_PER_DAY": "0",
    "APPLIANCE_TOKENS_PER_MONTH": "0",
    "APPLIANCE_RATE_LIMIT": "600",
    "APPLIANCE_MAX_STREAMS_PER_KEY": "4",
    "APPLIANCE_AUTH": "on",
    "APPLIANCE_BACKUP_INTERVAL": "24h",
    "APPLIANCE_BACKUP_KEEP": "10",
    "APPLIANCE_RETENTION_SWEEP_SECONDS": "3600.0",
    "BACKEND_CORS_ORIGINS": "",
    "PRIVACY_ENCRYPT_AT_REST": "true",
    "PRIVACY_REDACT_AGGRESSIVENESS": "strict",
    "PRIVACY_RETENTION_DAYS": "7",
    "BUDGET_ENFORCE": "true",
    "SEARCH_ENABLED": "false",
    "REMOTE_LLM_ENABLED": "false",
    "APPLIANCE_REMOTE_LLM_URL": "",
    "APPLIANCE_REMOTE_LLM_MODEL": "",
    "APPLIANCE_REMOTE_LLM_KEY_FILE": "",
    "APPLIANCE_REMOTE_TIMEOUT": "60.0",
    "APPLIANCE_REMOTE_PRICE_PER_1K_TOKENS": "0.0",
    "APPLIANCE_REMOTE_BUDGET_MONTHLY": "0.0",
    "NPU_FORCE_ENABLE": "false",
    "APPLIANCE_CONSOLE": "true",
    "APPLIANCE_TRUSTED_PROXIES": "",
    "APPLIANCE_PROXY_HEADER": "x-forwarded-for",
    "APPLIANCE_TLS_CERT": "",
    "APPLIANCE_TLS_KEY": "",
    "APPLIANCE_REMOTE_LLM_ALLOW_PLAINTEXT": "false",
    "APPLIANCE_RESTORE_PREVIOUS_KEEP": "3",
    "APPLIANCE_RESTORE_PREVIOUS_MAX_DAYS": "30",
    "APPLIANCE_STREAM_STALL_SECONDS": "30.0",
    "APPLIANCE_PARALLEL_PER_KEY": "0",
    "APPLIANCE_MODEL_MEMORY": "",
    "APPLIANCE_KEEP_ALIVE": "5m",
    "APPLIANCE_PULL_HOSTS": "",
    "APPLIANCE_PULL_MAX_BYTES": "64gb",
    "APPLIANCE_SEARCH_PROVIDER": "searxng",
    "APPLIANCE_SEARCH_URL": "",
    "APPLIANCE_SEARCH_API_KEY": "not set",
    "APPLIANCE_SEARCH_RESULTS": "5",
    "APPLIANCE_SEARCH_TIMEOUT": "5.0",
    "APPLIANCE_SEARCH_QUERY_CHARS": "200",
    "SEARCH_BUDGET_DAILY": "100",
    "APPLIANCE_SEARCH_ALLOW": "admin,user",
}


@pytest.fixture
def empty(tmp_path: Path) -> Path:
    path = tmp_path / "appliance.env"
    path.write_text("")
    path.chmod(0o600)
    return path


def load(env_file: Path, **environ: str) -> Settings:
    return load_settings({"APPLIANCE_STATE_DIR": "/srv/st", **environ}, env_file)


def refusal(env_file: Path, **environ: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(env_file, **environ)
    return str(caught.value)


def invalid(name: str, shown: str) -> str:
    return f"{name}={shown} is invalid; expected {DOCS[name].form}"


def production(**environ: str) -> dict[str, str]:
    return {"APPLIANCE_ENV": "production", "SECRET_KEY": STRONG, "PRIVACY_SALT": "s", **environ}


# --- defaults and the Settings object ---------------------------------------------------------


def test_the_defaults(empty: Path) -> None:
    shown = masked(load(empty))
    assert {name: shown[name] for name in DEFAULTS} == DEFAULTS
    assert shown["APPLIANCE_ENV_FILE"] == str(empty)


def test_settings_are_frozen_named_and_complete(empty: Path) -> None:
    settings = load(empty)
    with pytest.raises(AttributeError):
        settings.auth = "off"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Settings("production")  # type: ignore[call-arg]
    with pytest.raises(msgspec.ValidationError, match="APPLIANCE_TYPO"):
        msgspec.convert({"APPLIANCE_TYPO": "1"}, Settings)


def test_masked_shows_secrets_only_as_set_or_not_and_booleans_as_words(empty: Path) -> None:
    shown = masked(load(empty, SECRET_KEY=STRONG, PRIVACY_SALT="", BUDGET_ENFORCE="no"))
    assert shown["SECRET_KEY"] == "set (32 characters)"
    assert shown["PRIVACY_SALT"] == "not set"
    assert (shown["BUDGET_ENFORCE"], shown["APPLIANCE_CONSOLE"]) == ("false", "true")


# --- each setting's boundary ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "lowest", "below"),
    [
        ("APPLIANCE_RESTART_LIMIT", "1", "0"),  # PositiveInt
        ("APPLIANCE_BACKUP_KEEP", "1", "0"),
        ("APPLIANCE_MAX_BODY_BYTES", "1024", "1023"),
        ("APPLIANCE_CONTEXT_SIZE", "128", "127"),
        ("APPLIANCE_GPU_LAYERS", "-1", "-2"),
        ("APPLIANCE_MAX_QUEUE", "0", "-1"),
        ("APPLIANCE_PARALLEL", "1", "0"),
        ("PRIVACY_RETENTION_DAYS", "1", "0"),
    ],
)
def test_the_lowest_value_of_a_number_is_accepted_and_the_next_refused(
    empty: Path, name: str, lowest: str, below: str
) -> None:
    assert masked(load(empty, **{name: lowest}))[name] == lowest
    assert refusal(empty, **{name: below}) == invalid(name, below)


@pytest.mark.parametrize(
    "name", ["APPLIANCE_GRACEFUL_TIMEOUT", "APPLIANCE_RESTART_WINDOW", "APPLIANCE_REMOTE_TIMEOUT"]
)
def test_a_positive_time_may_be_a_fraction_but_not_zero(empty: Path, name: str) -> None:
    assert masked(load(empty, **{name: "0.5"}))[name] == "0.5"
    assert refusal(empty, **{name: "0"}) == invalid(name, "0")


@pytest.mark.parametrize(
    ("bind", "host", "port"),
    [
        ("127.0.0.1:65535", "127.0.0.1", 65535),
        ("0.0.0.0:1", "0.0.0.0", 1),
        ("[::1]:8000", "::1", 8000),
        ("[2001:db8::5]:443", "2001:db8::5", 443),
        ("box.example:8080", "box.example", 8080),
    ],
)
def test_a_bind_address_gives_its_host_and_port(
    empty: Path, bind: str, host: str, port: int
) -> None:
    settings = load(empty, APPLIANCE_BIND=bind)
    assert (settings.host, settings.port) == (host, port)


@pytest.mark.parametrize(
    "bind", ["127.0.0.1:65536", "127.0.0.1:99999", "localhost", ":80", "a b:1"]
)
def test_a_bind_address_without_a_valid_port_is_refused(empty: Path, bind: str) -> None:
    assert refusal(empty, APPLIANCE_BIND=bind) == invalid("APPLIANCE_BIND", bind)


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("APPLIANCE_REDIS_MAXMEMORY", "512MB", "lots"),
        ("APPLIANCE_ADMIN_KEY_HASH", HASH, "0123456789abcdef:" + "a" * 63),
        ("APPLIANCE_ADMIN_KEY_HASH", "0123456789abcdef:v2:" + "b" * 64, "v2:" + "b" * 64),
        ("APPLIANCE_BACKUP_INTERVAL", "90m", "1w"),
        ("APPLIANCE_REDIS_URL", "rediss+cluster://a:1,b:2", "http://redis"),
        ("APPLIANCE_MODELS_DIR", "/models", "models"),
        ("APPLIANCE_BACKUP_DIR", "/backups", "backups"),
        ("APPLIANCE_RUNTIME_DIR", "/run/x", "run"),
        ("APPLIANCE_STATE_DIR", "/state", "state"),
        ("APPLIANCE_TLS_CERT", "/tls/cert.pem", "cert.pem"),
        ("APPLIANCE_TLS_KEY", "/tls/key.pem", "key.pem"),
        ("APPLIANCE_MODEL_MEMORY", "6gb", "6tb"),
        ("APPLIANCE_PULL_MAX_BYTES", "1", "0"),
        ("APPLIANCE_PULL_MAX_BYTES", "2gb", "many"),
        ("APPLIANCE_KEEP_ALIVE", "-1", "soon"),
        ("APPLIANCE_TRUSTED_PROXIES", "10.0.0.0/8, ::1", "10.0.0.1/8"),
        ("APPLIANCE_PULL_HOSTS", "huggingface.co, *.example.com", "under_score.example"),
        ("BACKEND_CORS_ORIGINS", "https://a.example", "ftp://a.example"),
        ("APPLIANCE_PRELOAD", "a, b", "../up"),
    ],
)
def test_a_checked_setting_takes_its_form_and_refuses_another(
    empty: Path, name: str, good: str, bad: str
) -> None:
    assert masked(load(empty, **{name: good}))[name] == good
    assert refusal(empty, **{name: bad}) == invalid(name, bad[:60])


@pytest.mark.parametrize(
    "url", ["redis://h:6379/0", "rediss://h", "unix:///run/r.sock", "redis+cluster://a:1"]
)
def test_every_redis_scheme_is_accepted(empty: Path, url: str) -> None:
    settings = load(empty, APPLIANCE_REDIS_URL=url)
    assert settings.redis_url == url and not settings.embedded_redis


def test_without_a_redis_url_the_store_is_embedded(empty: Path) -> None:
    settings = load(empty)
    assert settings.embedded_redis
    assert settings.redis_socket == Path("/srv/st/run/redis.sock")


# --- parsed forms ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "seconds"),
    [("0", 0), ("90", 90), ("10s", 10), ("10m", 600), ("2h", 7200), ("1d", 86400)],
)
def test_the_backup_interval_in_seconds(empty: Path, interval: str, seconds: int) -> None:
    assert load(empty, APPLIANCE_BACKUP_INTERVAL=interval).backup_interval_seconds == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5", 5),
        ("5b", 5),
        ("2kb", 2048),
        ("3mb", 3 * 1024**2),
        ("2gb", 2 * 1024**3),
        ("4GB", 4 * 1024**3),
        (" 7Kb ", 7 * 1024),
    ],
)
def test_sizes_in_bytes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "mb", "5tb", "5 mb", "-5", "x5"])
def test_a_size_of_another_form_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_model_memory_and_pull_limit_in_bytes(empty: Path) -> None:
    assert load(empty).model_memory_bytes is None
    settings = load(empty, APPLIANCE_MODEL_MEMORY="6gb", APPLIANCE_PULL_MAX_BYTES="512mb")
    assert settings.model_memory_bytes == 6 * 1024**3
    assert settings.pull_max_size == 512 * 1024**2
    assert load(empty).pull_max_size == 64 * 1024**3
    assert load(empty, APPLIANCE_KEEP_ALIVE="90s").keep_alive_seconds == 90.0


@pytest.mark.parametrize(
    ("preload", "models"),
    [
        ("true", None),
        ("YES", None),
        ("on", None),
        ("1", None),
        ("false", ()),
        ("No", ()),
        ("off", ()),
        ("0", ()),
        ("", ()),
        ("   ", ()),
        ("qwen", ("qwen",)),
        (" a , b ,a,,", ("a", "b")),
        ("_x.1-2", ("_x.1-2",)),
    ],
)
def test_the_models_to_preload(empty: Path, preload: str, models: tuple[str, ...] | None) -> None:
    assert load(empty, APPLIANCE_PRELOAD=preload).preload_models == models


@pytest.mark.parametrize("preload", ["a..b", "a,../b", ".hidden", "a/b", "x" * 65])
def test_a_model_list_with_a_path_or_an_odd_name_is_refused(empty: Path, preload: str) -> None:
    assert refusal(empty, APPLIANCE_PRELOAD=preload) == invalid("APPLIANCE_PRELOAD", preload[:60])


@pytest.mark.parametrize(
    ("origins", "parsed"),
    [
        ("", ()),
        ("  ", ()),
        ("*", ("*",)),
        (
            "https://a.example/, http://b.example:8080,",
            ("https://a.example", "http://b.example:8080"),
        ),
        ('["https://a.example", " * "]', ("https://a.example", "*")),
        ("[]", ()),
    ],
)
def test_cors_origins(empty: Path, origins: str, parsed: tuple[str, ...]) -> None:
    assert load(empty, BACKEND_CORS_ORIGINS=origins).allowed_origins == parsed


@pytest.mark.parametrize(
    "origins",
    ['["https://a.example"', "[1]", '["https://a.example", 2]', "[" * 100_000, "a.example"],
)
def test_cors_origins_of_another_form_are_refused(empty: Path, origins: str) -> None:
    assert refusal(empty, BACKEND_CORS_ORIGINS=origins) == invalid(
        "BACKEND_CORS_ORIGINS", origins[:60]
    )


def test_trusted_proxies_are_networks_and_empty_items_are_skipped(empty: Path) -> None:
    settings = load(empty, APPLIANCE_TRUSTED_PROXIES=" 10.0.0.0/8, ,::1,192.0.2.7 ")
    assert [str(network) for network in settings.trusted_networks] == [
        "10.0.0.0/8",
        "::1/128",
        "192.0.2.7/32",
    ]
    assert load(empty).trusted_networks == ()


def test_pull_hosts_are_lower_case_names_of_at_most_253_characters(empty: Path) -> None:
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(longest) == 253
    settings = load(empty, APPLIANCE_PULL_HOSTS=f"HuggingFace.co., ,*.Example.com,{longest}")
    assert settings.pull_allowed_hosts == ("huggingface.co", "*.example.com", longest)
    too_long = longest + "d"
    assert refusal(empty, APPLIANCE_PULL_HOSTS=too_long) == invalid(
        "APPLIANCE_PULL_HOSTS", too_long[:60]
    )


def test_tls_is_on_only_with_both_files(empty: Path) -> None:
    assert not load(empty).tls
    assert not load(empty, APPLIANCE_TLS_CERT="/c.pem").tls
    assert not load(empty, APPLIANCE_TLS_KEY="/k.pem").tls
    assert load(empty, APPLIANCE_TLS_CERT="/c.pem", APPLIANCE_TLS_KEY="/k.pem").tls


# --- how values are read ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("1", True),
        ("false", False),
        ("No", False),
        ("OFF", False),
        ("0", False),
    ],
)
def test_switches_take_the_usual_words(empty: Path, value: str, expected: bool) -> None:
    settings = load(empty, BUDGET_ENFORCE=value, SEARCH_ENABLED=value, NPU_FORCE_ENABLE=value)
    assert settings.budget_enforce is settings.search_enabled is settings.npu_force_enable
    assert settings.budget_enforce is expected


def test_a_switch_that_is_no_word_is_refused(empty: Path) -> None:
    assert refusal(empty, BUDGET_ENFORCE="maybe") == invalid("BUDGET_ENFORCE", "maybe")


def test_choices_are_read_in_any_case_and_other_text_as_written(empty: Path) -> None:
    settings = load(
        empty,
        APPLIANCE_LOG_LEVEL="debug",
        APPLIANCE_ENV="Development",
        PRIVACY_REDACT_AGGRESSIVENESS="STANDARD",
        APPLIANCE_PROXY_HEADER="Forwarded",
        APPLIANCE_DEFAULT_MODEL=" Qwen2.5-Instruct ",
        APPLIANCE_MAX_QUEUE=" 3 ",
    )
    assert settings.log_level == "DEBUG"
    assert settings.env == "development"
    assert settings.privacy_redact_aggressiveness == "standard"
    assert settings.proxy_header == "forwarded"
    assert settings.default_model == "Qwen2.5-Instruct"
    assert settings.max_queue == 3


def test_a_value_is_cut_to_60_characters_and_escaped_in_a_refusal(empty: Path) -> None:
    long = "9" * 70
    assert refusal(empty, APPLIANCE_PARALLEL=long) == invalid("APPLIANCE_PARALLEL", "9" * 60)
    assert refusal(empty, APPLIANCE_LOG_LEVEL="a\tb") == invalid("APPLIANCE_LOG_LEVEL", "'A\\tB'")


def test_an_unknown_appliance_setting_in_the_environment_is_refused(empty: Path) -> None:
    known = ", ".join(sorted(name for name in DOCS if name.startswith("APPLIANCE_")))
    assert refusal(empty, APPLIANCE_TYPO="1") == (
        f"unknown setting APPLIANCE_TYPO in the environment; known APPLIANCE_* settings: {known}"
    )
    assert "SECRET_KEY" not in known and "APPLIANCE_BIND" in known
    # Other variables are not ours; the control names are not settings but known.
    settings = load(empty, HOME="/root", SECRET_KEYS="x", APPLIANCE_SYSTEMCTL="/bin/true")
    assert settings.secret_key == ""


def test_the_environment_wins_over_the_env_file_which_wins_over_defaults(tmp_path: Path) -> None:
    path = tmp_path / "appliance.env"
    path.write_text("APPLIANCE_BIND=0.0.0.0:9000\nAPPLIANCE_LOG_LEVEL=warning\n")
    settings = load(path, APPLIANCE_LOG_LEVEL="error")
    assert (settings.bind, settings.log_level, settings.env_file) == (
        "0.0.0.0:9000",
        "ERROR",
        str(path),
    )


def test_the_env_file_named_in_the_environment_is_read(tmp_path: Path) -> None:
    named = tmp_path / "named.env"
    named.write_text("APPLIANCE_MAX_QUEUE=3\n")
    given = tmp_path / "given.env"
    given.write_text("APPLIANCE_MAX_QUEUE=5\n")
    environ = {"APPLIANCE_STATE_DIR": "/srv/st", "APPLIANCE_ENV_FILE": str(named)}
    settings = load_settings(environ)
    assert (settings.max_queue, settings.env_file) == (3, str(named))
    # An env file given by the caller (`--env-file`) wins.
    assert load_settings(environ, given).max_queue == 5


@pytest.mark.skipif(DEFAULT_ENV_FILE.exists(), reason="this box has an installed env file")
def test_without_an_env_file_the_settings_are_the_environment_and_defaults() -> None:
    settings = load_settings({"APPLIANCE_STATE_DIR": "/srv/st", "APPLIANCE_MAX_QUEUE": "2"})
    assert (settings.max_queue, settings.env_file) == (2, "")


def test_the_environment_read_is_the_one_given(empty: Path) -> None:
    assert "APPLIANCE_BIND" not in os.environ
    assert load(empty, APPLIANCE_BIND="0.0.0.0:9").bind == "0.0.0.0:9"


def test_an_env_file_may_hold_only_known_settings_and_name_no_other_file(tmp_path: Path) -> None:
    path = tmp_path / "appliance.env"
    path.write_text("SECRT_KEY=abc\n")
    assert refusal(path) == f"unknown setting SECRT_KEY in env file {path}"
    path.write_text("APPLIANCE_ENV_FILE=/etc/other.env\n")
    assert refusal(path) == (
        f"APPLIANCE_ENV_FILE in env file {path}: an env file cannot name another; remove the line"
    )
    path.write_text("this line is wrong hunter2\n")
    message = refusal(path)
    assert "line 1" in message and "hunter2" not in message


def test_a_value_that_is_not_utf_8_is_refused_by_name(empty: Path) -> None:
    assert refusal(empty, APPLIANCE_DEFAULT_MODEL="qwen\udcff") == (
        "APPLIANCE_DEFAULT_MODEL holds bytes that are not UTF-8 text; write it in UTF-8"
    )


# --- directories ----------------------------------------------------------------------------


def test_directories_follow_the_state_directory(empty: Path) -> None:
    settings = load_settings({"APPLIANCE_STATE_DIR": "/data"}, empty)
    assert (settings.models_dir, settings.backup_dir, settings.runtime_dir) == (
        "/data/models",
        "/data/backups",
        "/data/run",
    )
    given = load_settings(
        {
            "APPLIANCE_STATE_DIR": "/data",
            "APPLIANCE_MODELS_DIR": "/m",
            "APPLIANCE_BACKUP_DIR": "/b",
            "APPLIANCE_RUNTIME_DIR": "/r",
            "STATE_DIRECTORY": "/ignored",
            "RUNTIME_DIRECTORY": "/ignored",
        },
        empty,
    )
    assert (given.state_dir, given.models_dir, given.backup_dir, given.runtime_dir) == (
        "/data",
        "/m",
        "/b",
        "/r",
    )


def test_under_systemd_the_first_of_its_directories_are_the_defaults(empty: Path) -> None:
    settings = load_settings(
        {"STATE_DIRECTORY": "/var/lib/a:/var/lib/b", "RUNTIME_DIRECTORY": "/run/a:/run/b"}, empty
    )
    assert (settings.state_dir, settings.runtime_dir, settings.models_dir) == (
        "/var/lib/a",
        "/run/a",
        "/var/lib/a/models",
    )


def test_the_installed_layout_keeps_its_sockets_where_the_unit_puts_them(empty: Path) -> None:
    settings = load_settings({}, empty)
    assert (settings.state_dir, settings.runtime_dir, settings.backup_dir) == (
        "/var/lib/appliance",
        "/run/appliance",
        "/var/lib/appliance/backups",
    )


# --- what stops a start -----------------------------------------------------------------------


def test_production_needs_a_secret_key_of_32_characters(empty: Path) -> None:
    assert production_problems(load(empty, **production())) == []
    assert production_problems(load(empty, **production(SECRET_KEY="k" * 31))) == [
        "SECRET_KEY is 31 characters; production needs 32 or more (generate one with: "
        "appliance init)"
    ]
    assert production_problems(load(empty, **production(SECRET_KEY="", PRIVACY_SALT=""))) == [
        "SECRET_KEY is not set; production needs 32 or more characters (generate an env file "
        "with: appliance init)",
        "PRIVACY_SALT is not set; production needs one (generate one with: appliance init)",
    ]


def test_production_refuses_any_origin_and_plain_storage(empty: Path) -> None:
    problems = production_problems(
        load(empty, **production(BACKEND_CORS_ORIGINS="*", PRIVACY_ENCRYPT_AT_REST="false"))
    )
    assert problems == [
        "BACKEND_CORS_ORIGINS allows '*'; production needs the exact origins of your sites",
        "PRIVACY_ENCRYPT_AT_REST=false is refused in production: conversations would lie "
        "readable in Redis, its files and every backup; remove the line (default true)",
    ]


def test_development_has_no_production_problems(empty: Path) -> None:
    settings = load(empty, BACKEND_CORS_ORIGINS="*", PRIVACY_ENCRYPT_AT_REST="false")
    assert production_problems(settings) == []


def test_production_refuses_a_plain_http_remote_unless_allowed(empty: Path) -> None:
    remote = production(REMOTE_LLM_ENABLED="true", APPLIANCE_REMOTE_LLM_URL="http://llm.example")

    def plaintext(**env: str) -> list[str]:
        problems = startup_problems(load(empty, **env))
        return [p for p in problems if p.startswith("APPLIANCE_REMOTE_LLM_URL is plain http")]

    [problem] = plaintext(**remote)
    assert problem.startswith("APPLIANCE_REMOTE_LLM_URL is plain http:// to 'llm.example'")
    assert plaintext(**remote, APPLIANCE_REMOTE_LLM_ALLOW_PLAINTEXT="true") == []
    assert plaintext(**{**remote, "REMOTE_LLM_ENABLED": "false"}) == []
    assert plaintext(**{**remote, "APPLIANCE_REMOTE_LLM_URL": "https://llm.example"}) == []
    # Outside production a plain-http remote is the operator's choice.
    assert plaintext(**{**remote, "APPLIANCE_ENV": "development"}) == []


@pytest.mark.parametrize(
    ("mode", "refused"),
    [(0o600, False), (0o400, False), (0o640, True), (0o604, True), (0o700, False)],
)
def test_production_refuses_an_env_file_others_may_read(
    tmp_path: Path, mode: int, refused: bool
) -> None:
    path = tmp_path / "appliance.env"
    path.write_text("")
    path.chmod(mode)
    settings = load(path, **production())
    expected = [
        f"env file {path} has mode {mode:04o}: group or others may read its secrets; "
        f"production needs 0600 (run: chmod 600 {path})"
    ]
    assert env_file_problems(settings) == (expected if refused else [])
    assert startup_problems(settings) == (expected if refused else [])
    # Development does not care; a file gone since it was read is not this check's business.
    assert env_file_problems(load(path)) == []
    path.unlink()
    assert env_file_problems(settings) == []


@pytest.mark.skipif(DEFAULT_ENV_FILE.exists(), reason="this box has an installed env file")
def test_production_without_an_env_file_has_no_env_file_problem() -> None:
    settings = load_settings({"APPLIANCE_STATE_DIR": "/srv/st", **production()})
    assert settings.env_file == ""
    assert env_file_problems(settings) == []


def test_startup_refuses_half_of_tls(empty: Path) -> None:
    assert startup_problems(load(empty)) == []
    assert startup_problems(load(empty, APPLIANCE_TLS_CERT="/c.pem")) == [
        "APPLIANCE_TLS_CERT is set but APPLIANCE_TLS_KEY is not; HTTPS needs both (the PEM "
        "certificate chain and its private key), or neither for plain HTTP"
    ]


def test_startup_checks_the_search_settings_only_when_search_is_on(empty: Path) -> None:
    search = {"SEARCH_ENABLED": "true"}
    [problem] = startup_problems(load(empty, **search))
    assert problem.startswith("SEARCH_ENABLED=true needs APPLIANCE_SEARCH_URL")
    search["APPLIANCE_SEARCH_URL"] = "http://searxng.lan:8080"
    assert startup_problems(load(empty, **search)) == []
    assert startup_problems(load(empty, **search, APPLIANCE_SEARCH_ALLOW=" , ")) == [
        "APPLIANCE_SEARCH_ALLOW is empty, so no key could search; name the scopes or keys "
        "that may (e.g. admin, user), or set SEARCH_ENABLED=false"
    ]
    # Off, the same unusable settings stop nothing.
    assert startup_problems(load(empty, APPLIANCE_SEARCH_ALLOW=" , ")) == []


def test_startup_checks_the_remote_llm_settings(tmp_path: Path, empty: Path) -> None:
    remote = {"REMOTE_LLM_ENABLED": "true"}
    assert startup_problems(load(empty, **remote)) == [
        "REMOTE_LLM_ENABLED=true needs APPLIANCE_REMOTE_LLM_URL (the remote server's "
        "OpenAI-compatible base URL, e.g. https://api.example.com/v1)"
    ]
    remote["APPLIANCE_REMOTE_LLM_URL"] = "https://llm.example/v1"
    assert startup_problems(load(empty, **remote)) == [
        "REMOTE_LLM_ENABLED=true needs APPLIANCE_REMOTE_LLM_MODEL (its model name)"
    ]
    remote["APPLIANCE_REMOTE_LLM_MODEL"] = "big"
    key = tmp_path / "remote.key"
    remote["APPLIANCE_REMOTE_LLM_KEY_FILE"] = str(key)
    [problem] = startup_problems(load(empty, **remote))
    assert problem.startswith(f"APPLIANCE_REMOTE_LLM_KEY_FILE ({key}) does not exist")
    key.write_text("sk-remote\n")
    key.chmod(0o600)
    assert startup_problems(load(empty, **remote)) == []
    assert startup_problems(load(empty, **{**remote, "REMOTE_LLM_ENABLED": "false"})) == []


@pytest.mark.parametrize("bind", ["127.0.0.1:8000", "127.9.9.9:80", "localhost:8000", "[::1]:8000"])
def test_auth_off_is_allowed_on_loopback_in_development(empty: Path, bind: str) -> None:
    assert startup_problems(load(empty, APPLIANCE_AUTH="off", APPLIANCE_BIND=bind)) == []


@pytest.mark.parametrize("bind", ["0.0.0.0:8000", "[::]:8000", "192.0.2.7:80", "box.example:80"])
def test_auth_off_is_refused_off_loopback(empty: Path, bind: str) -> None:
    host = load(empty, APPLIANCE_BIND=bind).host
    assert startup_problems(load(empty, APPLIANCE_AUTH="off", APPLIANCE_BIND=bind)) == [
        f"APPLIANCE_AUTH=off needs a loopback APPLIANCE_BIND (127.0.0.1), not {host}: without "
        "keys anyone who reaches the port is admin"
    ]


def test_auth_off_is_refused_in_production(empty: Path) -> None:
    assert startup_problems(load(empty, **production(APPLIANCE_AUTH="off"))) == [
        "APPLIANCE_AUTH=off is refused in production; remove it"
    ]
