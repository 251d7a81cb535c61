"""Per-model defaults, as Ollama's Modelfile PARAMETER and SYSTEM lines.

Kept in the model's manifest record (`defaults`), set with `appliance models set NAME
KEY=VALUE` or `PATCH /api/v1/models/<name>/defaults`, and applied to a request that does not
say otherwise: a value the request gives wins, then the model's default, then the
appliance's own (`FALLBACK`). `context_size` applies when the model is next loaded.

Models the appliance knows by their SHA-256 get defaults of their own when first recorded
(`known_defaults`): the default model, SmolLM2-135M-Instruct, would otherwise repeat itself
to the token limit under greedy decoding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from appliance.llm.protocol import ChatMessage

MAX_SYSTEM_CHARS: Final = 100_000
MAX_STOP: Final = 4
MAX_STOP_CHARS: Final = 64
MIN_CONTEXT: Final = 128
MAX_CONTEXT: Final = 1 << 20
# SmolLM2-135M-Instruct Q4_1 (the default model; tools/default_model.py).
SMOLLM2_SHA256: Final = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ModelDefaults(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A model's own defaults; None (left out of the manifest) means not set."""

    system: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    stop: list[str] | None = None
    context_size: int | None = None

    def items(self) -> list[tuple[str, Any]]:
        """The keys that are set, in the struct's order."""
        return [
            (name, getattr(self, name))
            for name in self.__struct_fields__
            if getattr(self, name) is not None
        ]

    def describe(self) -> str:
        """`key=value ...` of the keys that are set (one line; long values shortened)."""
        parts = []
        for name, value in self.items():
            shown = json.dumps(value, ensure_ascii=False)
            parts.append(f"{name}={shown if len(shown) <= 40 else shown[:37] + '...'}")
        return " ".join(parts)


class InvalidDefault(ValueError):
    """A key or value `models set` or the API refuses; the message names it and the form."""


@dataclass(frozen=True)
class _Key:
    form: str
    check: Callable[[Any], Any]


def _number(low: float, high: float, *, low_open: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError
        number = float(value)
        if not math.isfinite(number) or number > high or number < low:
            raise ValueError
        if low_open and number == low:
            raise ValueError
        return number

    return check


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError
        number = int(value)
        if not low <= number <= high:
            raise ValueError
        return number

    return check


def _system(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_SYSTEM_CHARS:
        raise ValueError
    return value


def _stop(value: Any) -> list[str]:
    if isinstance(value, str):
        value = json.loads(value) if value.startswith("[") else [value]
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_STOP:
        raise ValueError
    if not all(isinstance(item, str) and 0 < len(item) <= MAX_STOP_CHARS for item in value):
        raise ValueError
    return list(value)


KEYS: Final[dict[str, _Key]] = {
    "system": _Key(f"text of up to {MAX_SYSTEM_CHARS} characters", _system),
    "temperature": _Key("a number from 0 to 2", _number(0, 2)),
    "top_p": _Key("a number above 0, up to 1", _number(0, 1, low_open=True)),
    "top_k": _Key("a whole number from 0 (off) to 1000", _integer(0, 1000)),
    "min_p": _Key("a number from 0 (off) to 1", _number(0, 1)),
    "repeat_penalty": _Key("a number above 0, up to 2 (1 is off)", _number(0, 2, low_open=True)),
    "presence_penalty": _Key("a number from -2 to 2 (0 is off)", _number(-2, 2)),
    "stop": _Key(
        f"a string, or a JSON list of 1 to {MAX_STOP} strings of 1 to {MAX_STOP_CHARS} "
        'characters (["User:", "###"])',
        _stop,
    ),
    "context_size": _Key(
        f"tokens, {MIN_CONTEXT} or more (capped at the model's own; applies at the next load)",
        _integer(MIN_CONTEXT, MAX_CONTEXT),
    ),
}


def _known(key: str) -> _Key:
    spec = KEYS.get(key)
    if spec is None:
        raise InvalidDefault(f"unknown default {key[:40]!r}; known: {', '.join(KEYS)}")
    return spec


def check_value(key: str, value: Any) -> Any:
    """The value as stored, or InvalidDefault naming the key and the form it takes."""
    spec = _known(key)
    try:
        return spec.check(value)
    except (ValueError, TypeError, OverflowError):
        shown = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
        raise InvalidDefault(f"{key}={shown[:40]} is invalid; expected {spec.form}") from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` from the command line: the key and its checked value; `KEY=` clears it
    (None)."""
    key, equals, raw = text.partition("=")
    key = key.strip()
    if not equals or not key:
        raise InvalidDefault(f"{text[:40]!r} is not KEY=VALUE; keys: {', '.join(KEYS)}")
    _known(key)
    return key, None if raw == "" else check_value(key, raw)


def updated(defaults: ModelDefaults, changes: Mapping[str, Any]) -> ModelDefaults:
    """`defaults` with `changes` applied (values checked; None clears a key)."""
    values = {name: value for name, value in defaults.items()}
    for key, value in changes.items():
        _known(key)
        if value is None:
            values.pop(key, None)
        else:
            values[key] = check_value(key, value)
    return ModelDefaults(**values)


@dataclass(frozen=True)
class Fallback:
    """What a request gets when neither it nor the model says (llama.cpp's server's)."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0


FALLBACK: Final = Fallback()


def pick(requested: Any, default: Any, fallback: Any) -> Any:
    """The request's value, else the model's default, else the appliance's."""
    if requested is not None:
        return requested
    return default if default is not None else fallback


def with_system(messages: list[ChatMessage] | None, system: str | None) -> list[ChatMessage] | None:
    """The model's default system prompt first, when the conversation has none of its own."""
    if messages is None or not system or any(m.role == "system" for m in messages):
        return messages
    return [ChatMessage("system", system), *messages]


# Defaults that come with models the appliance knows, by SHA-256.
_KNOWN: Final[dict[str, ModelDefaults]] = {
    # Greedy decoding loops ("la femme au martyre" to the token limit); a little temperature
    # and a repeat penalty end its answers (tests/test_model_defaults.py).
    SMOLLM2_SHA256: ModelDefaults(
        temperature=0.2, top_p=0.9, top_k=40, min_p=0.05, repeat_penalty=1.1
    ),
}


def known_defaults(sha256: str) -> ModelDefaults:
    return _KNOWN.get(sha256, ModelDefaults())
