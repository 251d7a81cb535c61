"""The pieces of resident models that need no daemon: keep-alive values, model defaults,
the new settings, the memory estimate's arithmetic and the pull's outbound policy."""

from __future__ import annotations

import math

import pytest

from appliance.config import (
    FOREVER,
    ConfigError,
    InvalidKeepAlive,
    describe_keep_alive,
    load_settings,
    parse_keep_alive,
)
from appliance.llm.gguf_header import check_gguf_header
from appliance.llm.memory import WORKER_OVERHEAD_BYTES, estimate
from appliance.llm.model_defaults import (
    SMOLLM2_SHA256,
    InvalidDefault,
    ModelDefaults,
    known_defaults,
    parse_assignment,
    pick,
    updated,
    with_system,
)
from appliance.llm.protocol import ChatMessage
from appliance.llm.pull import PullRefused, check_sha256, check_url, name_from_url, shown_url
from tests.harness import short_tempdir
from tests.tiny_gguf import write_tiny_llama


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("90s", 90.0),
        ("250ms", 0.25),
        ("300", 300.0),
        (300, 300.0),
        (2.5, 2.5),
        ("0", 0.0),
        (0, 0.0),
        ("-1", FOREVER),
        (-1, FOREVER),
        ("-5m", FOREVER),
        (" 10m ", 600.0),
    ],
)
def test_keep_alive_takes_ollamas_values(value: str | float, seconds: float) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["", "5 minutes", "m", "5x", "1e99", "nan", True, [5]])
def test_keep_alive_refuses_other_values_saying_the_form(value: object) -> None:
    with pytest.raises(InvalidKeepAlive, match="a duration such as 5m"):
        parse_keep_alive(value)


def test_keep_alive_refuses_a_finite_value_too_large_to_mean_anything() -> None:
    with pytest.raises(InvalidKeepAlive, match="use -1 to keep the model loaded for ever"):
        parse_keep_alive("9" * 20)


def test_keep_alive_is_described_in_its_largest_unit() -> None:
    assert describe_keep_alive(300) == "5m"
    assert describe_keep_alive(7200) == "2h"
    assert describe_keep_alive(90) == "90s"
    assert describe_keep_alive(0) == "0s"
    assert describe_keep_alive(FOREVER) == "forever"


def test_model_defaults_from_the_command_line() -> None:
    assert parse_assignment("temperature=0.3") == ("temperature", 0.3)
    assert parse_assignment("top_k=20") == ("top_k", 20)
    assert parse_assignment("system=You are brief. Use = signs freely") == (
        "system",
        "You are brief. Use = signs freely",
    )
    assert parse_assignment('stop=["User:", "###"]') == ("stop", ["User:", "###"])
    assert parse_assignment("stop=END") == ("stop", ["END"])
    assert parse_assignment("temperature=") == ("temperature", None)
    assert parse_assignment("context_size=2048") == ("context_size", 2048)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("temperature=3", "temperature=3 is invalid; expected a number from 0 to 2"),
        ("top_p=0", "top_p=0 is invalid"),
        ("top_k=1.5", "top_k=1.5 is invalid"),
        ("repeat_penalty=0", "repeat_penalty=0 is invalid"),
        ("context_size=64", "context_size=64 is invalid"),
        ("stop=[]", "stop=[] is invalid"),
        ("temprature=0.3", "unknown default 'temprature'; known: system, temperature"),
        ("temperature", "is not KEY=VALUE"),
    ],
)
def test_model_defaults_refuse_what_they_cannot_take(text: str, named: str) -> None:
    with pytest.raises(InvalidDefault) as raised:
        parse_assignment(text)
    assert named in str(raised.value)


def test_model_defaults_update_and_clear() -> None:
    defaults = updated(ModelDefaults(), {"temperature": 0.2, "stop": ["END"]})
    assert defaults == ModelDefaults(temperature=0.2, stop=["END"])
    assert defaults.describe() == 'temperature=0.2 stop=["END"]'
    cleared = updated(defaults, {"temperature": None, "top_k": 10})
    assert cleared == ModelDefaults(top_k=10, stop=["END"])
    with pytest.raises(InvalidDefault, match="unknown default 'nope'"):
        updated(defaults, {"nope": None})


def test_a_request_value_wins_then_the_models_then_the_appliances() -> None:
    assert pick(0.5, 0.2, 0.8) == 0.5
    assert pick(0.0, 0.2, 0.8) == 0.0  # 0 is a value, not "not given"
    assert pick(None, 0.2, 0.8) == 0.2
    assert pick(None, None, 0.8) == 0.8
    system = with_system([ChatMessage("user", "hi")], "Be brief.")
    assert system == [ChatMessage("system", "Be brief."), ChatMessage("user", "hi")]
    own = [ChatMessage("system", "Mine."), ChatMessage("user", "hi")]
    assert with_system(own, "Be brief.") == own
    assert with_system(None, "Be brief.") is None


def test_the_default_model_comes_with_defaults_of_its_own() -> None:
    defaults = known_defaults(SMOLLM2_SHA256)
    assert defaults.temperature is not None and defaults.temperature > 0
    assert defaults.repeat_penalty is not None and defaults.repeat_penalty > 1
    assert known_defaults("0" * 64) == ModelDefaults()


def test_the_new_settings_are_read_and_checked() -> None:
    settings = load_settings(
        environ={
            "APPLIANCE_STATE_DIR": "/tmp/unused",
            "APPLIANCE_PRELOAD": "smollm2, gemma",
            "APPLIANCE_MODEL_MEMORY": "2gb",
            "APPLIANCE_KEEP_ALIVE": "-1",
            "APPLIANCE_PULL_HOSTS": "huggingface.co, *.hf.co",
            "APPLIANCE_PULL_MAX_BYTES": "512mb",
        },
        env_file=None,
    )
    assert settings.preload_models == ("smollm2", "gemma")
    assert settings.model_memory_bytes == 2 * 1024**3
    assert settings.keep_alive_seconds == math.inf
    assert settings.pull_allowed_hosts == ("huggingface.co", "*.hf.co")
    assert settings.pull_max_size == 512 * 1024**2
    default = load_settings(environ={"APPLIANCE_STATE_DIR": "/tmp/unused"}, env_file=None)
    assert default.preload_models is None  # the default model
    assert default.model_memory_bytes is None  # half the box's memory
    assert default.keep_alive_seconds == 300
    assert default.pull_allowed_hosts == ()
    none = load_settings(
        environ={"APPLIANCE_STATE_DIR": "/tmp/unused", "APPLIANCE_PRELOAD": "false"},
        env_file=None,
    )
    assert none.preload_models == ()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("APPLIANCE_PRELOAD", "../etc"),
        ("APPLIANCE_MODEL_MEMORY", "lots"),
        ("APPLIANCE_KEEP_ALIVE", "forever"),
        ("APPLIANCE_PULL_HOSTS", "https://huggingface.co"),
        ("APPLIANCE_PULL_MAX_BYTES", "0"),
    ],
)
def test_the_new_settings_refuse_bad_values_by_name(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"APPLIANCE_STATE_DIR": "/tmp/unused", name: value}, env_file=None)
    assert str(raised.value).startswith(f"{name}=")


def test_the_estimate_counts_weights_kv_cache_and_buffers() -> None:
    path = write_tiny_llama(short_tempdir("mu") / "tiny.gguf", n_embd=64, n_layer=2)
    header = check_gguf_header(path)
    assert header.shape.block_count == 2
    assert header.shape.head_count == 4 and header.shape.head_count_kv == 2
    small = estimate(header, n_ctx=512, parallel=4, n_batch=512)
    large = estimate(header, n_ctx=1024, parallel=4, n_batch=512)
    # 2 layers x n_ctx cells x 2 KV heads x (16 + 16) values x 2 bytes.
    assert small.kv_cache == 2 * 512 * 2 * 32 * 2
    assert large.kv_cache == 2 * small.kv_cache
    assert small.weights >= header.weights_bytes > 0
    assert small.overhead == WORKER_OVERHEAD_BYTES
    assert small.total == small.weights + small.kv_cache + small.compute + small.overhead
    assert "MB (weights" in small.describe()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/m.gguf",
        "http://localhost/m.gguf",
        "http://[::1]:9/m.gguf",
        "https://huggingface.co/o/r/resolve/main/m.gguf",
        "https://cas-bridge.xethub.hf.co/x/y?sig=1",
    ],
)
def test_the_policy_allows_loopback_and_the_operators_hosts(url: str) -> None:
    check_url(url, ("huggingface.co", "*.hf.co"))


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("https://example.com/m.gguf", "APPLIANCE_PULL_HOSTS"),
        ("https://evil-hf.co/m.gguf", "APPLIANCE_PULL_HOSTS"),
        ("http://huggingface.co/m.gguf", "https:// only"),
        ("ftp://127.0.0.1/m.gguf", "not an http:// or https:// URL"),
        ("file:///etc/passwd", "not an http:// or https:// URL"),
        ("http://user:secret@127.0.0.1/m.gguf", "user name or password"),
        ("https://10.0.0.5/m.gguf", "APPLIANCE_PULL_HOSTS"),
    ],
)
def test_the_policy_refuses_the_rest_saying_how_to_allow_it(url: str, named: str) -> None:
    with pytest.raises(PullRefused) as raised:
        check_url(url, ("huggingface.co", "*.hf.co"))
    assert named in str(raised.value)
    assert "secret" not in str(raised.value)


def test_names_and_checksums_of_pulls() -> None:
    url = "https://huggingface.co/o/r/resolve/main/SmolLM2-135M-Instruct-Q4_1.gguf?download=1"
    assert name_from_url(url) == "SmolLM2-135M-Instruct-Q4_1"
    with pytest.raises(PullRefused, match="--name"):
        name_from_url("https://huggingface.co/o/r/resolve/main/README.md")
    assert check_sha256("A" * 64) == "a" * 64
    with pytest.raises(PullRefused, match="64 hexadecimal digits"):
        check_sha256("abc")
    assert shown_url("https://u:p@host.hf.co/a/b.gguf?X-Amz-Signature=s") == (
        "https://host.hf.co/a/b.gguf"
    )
