"""Properties of the configuration readers: any value of any setting loads or is refused by
name with `ConfigError`, secrets never show in a message, and the env file the product
writes reads back as written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from appliance.commands.init import _env_text_with_admin_key
from appliance.config import (
    ENV_NAMES,
    SECRET_NAMES,
    ConfigError,
    Settings,
    load_settings,
    masked,
    production_problems,
)
from appliance.envfile import EnvFileError, generate_env_file_text, parse_env_file
from appliance.startup_checks import remote_problems
from tests.conftest import examples

NAMES = sorted(ENV_NAMES)
CANARY = "Zq9secretCanary"  # never part of any message or form text
NUMBERISH = "0123456789+-.eE_xkmgbsdhKMGBSDH :/[]*"
# Values chosen to reach the corners of number, size, duration and address parsing.
CORNERS = [
    "",
    " ",
    "0",
    "-1",
    "1e400",
    "-1e400",
    "nan",
    "inf",
    "-inf",
    "1_000",
    "0x10",
    "9" * 30,
    "9" * 5000,
    "9" * 5000 + "h",
    "٣",  # an Arabic-Indic digit: `\d` matches it
    "٣٣h",
    "127.0.0.1:" + "9" * 5,
    "[::1]:0",
    "[" + "9" * 5000 + "]:1",
    "/",
    "/\x00",
    "redis://",
    "unix://",
    "true",
    "TRUE",
    "Off",
    "*",
    '["*"]',
    "[1, 2]",
    "[" * 5000,
    "[" + "1" * 5000 + "]",  # json.loads refuses ints of over 4300 digits with a ValueError
    '{"a": 1}',
    "https://a.example",
]
VALUES = st.one_of(
    st.text(),
    st.text(NUMBERISH, max_size=30),
    st.sampled_from(CORNERS),
    st.text(st.characters(codec="utf-8"), max_size=30),  # no surrogates
    st.text(st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), max_size=3),  # undecodable
)


@pytest.fixture(scope="module")
def empty_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("env") / "appliance.env"
    path.write_text("")
    return path


def check_loaded(loaded: Settings) -> None:
    """Everything derived from loaded settings is computable."""
    assert loaded.backup_interval_seconds >= 0
    assert 0 <= loaded.port <= 65535
    assert isinstance(loaded.host, str)
    assert isinstance(loaded.allowed_origins, tuple)
    assert loaded.redis_socket.is_absolute()
    assert set(masked(loaded)) == ENV_NAMES
    production_problems(loaded)


def check_refusal(error: ConfigError, names: set[str]) -> str:
    message = str(error)
    assert "\n" not in message
    assert any(name in message for name in names), message
    return message


@settings(
    max_examples=examples(400),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=st.sampled_from(NAMES), value=VALUES)
def test_any_value_of_any_setting_loads_or_is_refused_by_name(
    empty_env_file: Path, name: str, value: str
) -> None:
    try:
        loaded = load_settings({name: value}, empty_env_file)
    except ConfigError as error:
        message = check_refusal(error, {name})
        if name in SECRET_NAMES and len(value.strip()) >= 4:
            assert value.strip() not in message
        return
    check_loaded(loaded)


@settings(
    max_examples=examples(200),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    values=st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=6),
    secrets=st.dictionaries(
        st.sampled_from(sorted(SECRET_NAMES)),
        st.tuples(st.text(max_size=20), st.text(max_size=20)),
        min_size=1,
    ),
)
def test_secrets_never_appear_in_refusals_or_problems(
    empty_env_file: Path, values: dict[str, str], secrets: dict[str, tuple[str, str]]
) -> None:
    environ = {**values, **{k: f"{a}{CANARY}{b}" for k, (a, b) in secrets.items()}}
    try:
        loaded = load_settings(environ, empty_env_file)
    except ConfigError as error:
        assert CANARY not in check_refusal(error, set(environ))
        return
    for line in production_problems(loaded):
        assert CANARY not in line
    for shown in masked(loaded).values():
        assert CANARY not in shown


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(key=st.binary(max_size=64))
def test_the_remote_key_never_appears_in_its_problems(tmp_path: Path, key: bytes) -> None:
    # A key file of any content with the canary inside: accepted or refused, never shown.
    raw = key[: len(key) // 2] + CANARY.encode() + key[len(key) // 2 :]
    key_file = tmp_path / "remote.key"
    key_file.unlink(missing_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_bytes(raw)
    loaded = load_settings(
        {
            "REMOTE_LLM_ENABLED": "true",
            "APPLIANCE_REMOTE_LLM_URL": "https://api.example.com/v1",
            "APPLIANCE_REMOTE_LLM_MODEL": "m",
            "APPLIANCE_REMOTE_LLM_KEY_FILE": str(key_file),
            "APPLIANCE_STATE_DIR": "/srv/st",
        },
        Path(os.devnull),
    )
    problems = remote_problems(loaded)
    for line in problems:
        assert CANARY not in line
        assert "\n" not in line
    # A key that an HTTP header can carry is accepted (one line end stripped); no other is.
    text = raw.decode("latin-1")
    text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
    assert (problems == []) == all("!" <= c <= "~" for c in text)


# --- the env file ----------------------------------------------------------------------------

KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)
# One line's worth of text: systemd ends a line at \n or \r and nowhere else.
LINE_TEXT = st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)))


def _write(folder: Path, data: bytes) -> Path:
    path = folder / "appliance.env"
    path.write_bytes(data)
    return path


@settings(
    max_examples=examples(300),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.one_of(st.binary(max_size=300), LINE_TEXT.map(str.encode)))
def test_any_bytes_parse_or_are_refused_cleanly(tmp_path: Path, data: bytes) -> None:
    path = _write(tmp_path, data)
    try:
        values = parse_env_file(path)
    except EnvFileError as error:
        message = str(error)
        assert str(path) in message
        assert "\n" not in message
        return
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) for key in values)


@settings(
    max_examples=examples(200),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    lines=st.lists(
        st.one_of(
            st.tuples(st.just("pair"), st.text(max_size=10), st.text(max_size=10)),
            st.tuples(st.just("junk"), LINE_TEXT, st.just("")),
        ),
        max_size=6,
    )
)
def test_env_file_errors_never_show_a_value(
    tmp_path: Path, lines: list[tuple[str, str, str]]
) -> None:
    text = "".join(
        f"KEY_{n}={a}{CANARY}{b}\n" if kind == "pair" else f"{a.replace(CANARY, '')}\n"
        for n, (kind, a, b) in enumerate(lines)
    )
    try:
        parse_env_file(_write(tmp_path, text.encode(errors="surrogatepass")))
    except EnvFileError as error:
        assert CANARY not in str(error)


@settings(
    max_examples=examples(300),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    pairs=st.dictionaries(KEYS, LINE_TEXT, max_size=8),
    quoting=st.sampled_from(["double", "single", "bare"]),
    export=st.booleans(),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_values_round_trip_through_the_env_file(
    tmp_path: Path, pairs: dict[str, str], quoting: str, export: bool, newline: str
) -> None:
    if quoting == "bare":  # a bare value loses surrounding blanks and cannot open a quote
        pairs = {k: v.strip() for k, v in pairs.items()}
        assume(not any(v.startswith(("'", '"')) for v in pairs.values()))
    prefix = "export " if export else ""
    lines = [f"# {len(pairs)} settings"]
    for key, value in pairs.items():
        if quoting == "double":
            value = '"' + re.sub(r'(["\\$`])', r"\\\1", value) + '"'
        elif quoting == "single":
            value = f"'{value}'"
        lines.append(f"{prefix}{key}={value}")
    path = _write(tmp_path, (newline.join(lines) + newline).encode())
    assert parse_env_file(path) == pairs


def test_the_written_env_file_reads_back_and_passes_production(tmp_path: Path) -> None:
    for production in (True, False):
        for _ in range(20):
            text, _ = _env_text_with_admin_key(production=production)
            for candidate in (text, generate_env_file_text(production=production)):
                path = _write(tmp_path, candidate.encode())
                values = parse_env_file(path)
                written = dict(
                    line.split("=", 1)
                    for line in candidate.splitlines()
                    if line and not line.startswith("#")
                )
                assert values == written
                loaded = load_settings({"APPLIANCE_STATE_DIR": "/srv/st"}, path)
                assert loaded.env == ("production" if production else "development")
                assert production_problems(loaded) == []


def test_a_directory_as_env_file_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(EnvFileError, match=r"env file .* cannot be read"):
        parse_env_file(tmp_path)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings({}, tmp_path)


def test_a_json_number_too_long_for_python_is_refused_by_name(empty_env_file: Path) -> None:
    """Found by the fuzz profile: json.loads raised ValueError (not JSONDecodeError) for an
    integer of over 4300 digits inside BACKEND_CORS_ORIGINS."""
    with pytest.raises(ConfigError, match=r"^BACKEND_CORS_ORIGINS="):
        load_settings({"BACKEND_CORS_ORIGINS": "[" + "1" * 5000 + "]"}, empty_env_file)
