"""JSON schemas to llama.cpp grammars (GBNF), for structured output and tool calls.

llama-cpp-python's `SchemaConverter` does the work. What it would silently leave out (a
keyword it does not express, such as `multipleOf` or `uniqueItems`) is refused by name
instead, so that an answer that follows the grammar always validates against the schema.
Two gaps of the converter are closed here: integer (and number) bounds become digit
patterns, and string characters exclude the control characters JSON does not allow raw.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any, Final

# The most a schema may weigh, and the most its grammar may: both bound the work of the
# converter and of the grammar sampler.
MAX_SCHEMA_BYTES: Final = 64 * 1024
MAX_GRAMMAR_BYTES: Final = 256 * 1024
# Repetition counts beyond this expand into grammars too large to sample quickly.
MAX_REPEAT: Final = 256

# Keywords whose meaning the grammar expresses (or that only annotate).
_EXPRESSED: Final = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
    }
)
_ANNOTATIONS: Final = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$comment",
        "$schema",
        "$id",
        "nullable",
        "discriminator",
    }
)
_FORMATS: Final = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3"})
_FORMATS_ALL: Final = _FORMATS | {"uuid4", "uuid5"}
_TYPES: Final = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
# JSON strings hold no raw control characters (llama-cpp-python's own rule lets them in).
_SAFE_CHAR: Final = (
    'char ::= [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] '
    "[0-9a-fA-F] [0-9a-fA-F])"
)
# The answer of `response_format: {"type": "json_object"}`: any JSON object.
JSON_OBJECT_SCHEMA: Final[dict[str, Any]] = {"type": "object"}


class SchemaError(ValueError):
    """The schema cannot be turned into a grammar; `where` is its JSON path."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


def schema_to_grammar(schema: Any) -> str:
    """The GBNF grammar of `schema`, or SchemaError naming what cannot be expressed."""
    if not isinstance(schema, dict):
        raise SchemaError("a JSON schema is an object")
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the schema is over {MAX_SCHEMA_BYTES} bytes")
    for where, problem in _problems(schema, "", schema):
        raise SchemaError(problem, where)
    from llama_cpp.llama_grammar import SchemaConverter  # untyped library

    converter = _converter_class(SchemaConverter)(
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "schema")
        converter.visit(resolved, "")
        grammar: str = converter.format_grammar()
    except Exception as exc:
        # The schema is a client's: whatever the converter trips on is the schema's fault.
        raise SchemaError(f"the schema cannot be turned into a grammar: {exc}") from None
    lines = [_SAFE_CHAR if line.startswith("char ::= ") else line for line in grammar.split("\n")]
    grammar = "\n".join(lines)
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise SchemaError(f"the schema's grammar is over {MAX_GRAMMAR_BYTES} bytes; simplify it")
    return grammar


def _problems(node: Any, where: str, root: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(path, what) for each part of the schema that the grammar would not enforce."""
    if isinstance(node, bool):
        if node is False:
            yield where, "a `false` schema accepts nothing"
        return
    if not isinstance(node, dict):
        yield where, "a schema must be an object"
        return
    for key, value in node.items():
        here = f"{where}.{key}" if where else key
        if key not in _EXPRESSED and key not in _ANNOTATIONS:
            yield here, f"the JSON schema keyword {key!r} is not supported in structured output"
            continue
        if key == "type":
            kinds = value if isinstance(value, list) else [value]
            if not kinds or any(kind not in _TYPES for kind in kinds):
                yield here, f"type must be one of {', '.join(sorted(_TYPES))}"
        elif key == "format" and value not in _FORMATS_ALL:
            known = ", ".join(sorted(_FORMATS))
            yield here, f"format {value!r} is not supported; use one of {known}"
        elif key in ("minItems", "maxItems", "minLength", "maxLength"):
            whole = isinstance(value, int) and not isinstance(value, bool)
            if not whole or not 0 <= value <= MAX_REPEAT:
                yield here, f"{key} must be a whole number from 0 to {MAX_REPEAT}"
        elif key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                yield here, f"{key} must be a number"
            elif not math.isfinite(value) or abs(value) > 1e15:
                yield here, f"{key} must be a finite number of at most 1e15"
        elif key == "$ref":
            if not isinstance(value, str) or not value.startswith("#/"):
                yield here, "only references inside the schema (#/...) are supported"
            elif _follow(root, value) is None:
                yield here, f"the reference {value!r} names nothing in the schema"
        elif key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                yield here, f"{key} must be an object"
                continue
            for name, sub in value.items():
                yield from _problems(sub, f"{here}.{name}", root)
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                yield here, f"{key} must be a non-empty list of schemas"
                continue
            for index, sub in enumerate(value):
                yield from _problems(sub, f"{here}[{index}]", root)
        elif key in ("items", "additionalProperties"):
            if not isinstance(value, bool):
                yield from _problems(value, here, root)
            elif key == "items" and value is False:
                yield here, "items: false is not supported"
        elif key == "required" and (
            not isinstance(value, list) or not all(isinstance(v, str) for v in value)
        ):
            yield here, "required must be a list of property names"
        elif key == "enum" and (not isinstance(value, list) or not value):
            yield here, "enum must be a non-empty list"
    if "pattern" in node and ("minLength" in node or "maxLength" in node):
        yield where or "pattern", "pattern together with minLength or maxLength is not supported"
    if "items" in node and "prefixItems" in node:
        yield where or "items", "items together with prefixItems is not supported"
    if "allOf" in node and "properties" in node:
        yield where or "allOf", "allOf beside properties is not supported"
    if ("minimum" in node or "maximum" in node) and node.get("type") not in ("integer", "number"):
        yield where or "minimum", "bounds (minimum, maximum) need type integer or number"


def _follow(root: dict[str, Any], ref: str) -> Any:
    node: Any = root
    for part in ref[2:].split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _converter_class(base: type[Any]) -> type[Any]:
    class Converter(base):  # type: ignore[misc]
        """The library's converter, with bounds on integers and numbers."""

        def visit(self, schema: dict[str, Any], name: str) -> Any:
            kind = schema.get("type")
            bounded = any(
                k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
            )
            if kind in ("integer", "number") and bounded and not _other_keys(schema):
                rule_name = f"{name}-" if name in ("root", "integer", "number") else name or "root"
                low, high = _integer_bounds(schema)
                if low is not None and high is not None and low > high:
                    raise ValueError(f"no {kind} lies within the bounds of {name or 'the root'}")
                body = int_range(low, high)
                fraction = _fraction_range(low, high) if high is not None else None
                if kind == "number" and fraction is not None:
                    body = f"{body} | {fraction}"
                return self._add_rule(rule_name, f"({body}) space")
            return super().visit(schema, name)

    return Converter


def _other_keys(schema: dict[str, Any]) -> bool:
    return any(k in schema for k in ("enum", "const", "anyOf", "oneOf", "allOf", "$ref"))


def _integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """The whole numbers the bounds allow, as [low, high] (None: unbounded)."""
    low: int | None = None
    high: int | None = None
    if "minimum" in schema:
        low = math.ceil(schema["minimum"])
    if "exclusiveMinimum" in schema:
        value = math.floor(schema["exclusiveMinimum"]) + 1
        low = value if low is None else max(low, value)
    if "maximum" in schema:
        high = math.floor(schema["maximum"])
    if "exclusiveMaximum" in schema:
        value = math.ceil(schema["exclusiveMaximum"]) - 1
        high = value if high is None else min(high, value)
    return low, high


def _fraction_range(low: int | None, high: int) -> str | None:
    """Numbers with a fraction that stay inside [low, high]: k.ddd for whole k with
    max(low, 0) <= k < high (k.ddd lies in [k, k + 1), so within the bounds); None when
    there is no such k."""
    start = max(low or 0, 0)
    if start > high - 1:
        return None
    return f'({int_range(start, high - 1)}) "." [0-9] [0-9]*'


def int_range(low: int | None, high: int | None) -> str:
    """A GBNF expression for the decimal whole numbers (JSON's form) in [low, high]."""
    alternatives: list[str] = []
    # Negative numbers: "-" then their absolute values, in [max(1, -high), -low].
    if low is None or low < 0:
        smallest = 1 if high is None or high >= 0 else -high
        biggest = None if low is None else -low
        alternatives += [f'"-" {p}' for p in _unsigned(smallest, biggest)]
    if high is None or high >= 0:
        alternatives += _unsigned(max(low or 0, 0), high)
    return " | ".join(f"({a})" for a in alternatives)


def _unsigned(low: int, high: int | None) -> list[str]:
    """Patterns for the whole numbers in [low, high] (high None: no end), low >= 0."""
    if high is not None and low > high:
        return []
    patterns: list[str] = []
    digits = len(str(low))
    last = digits if high is None else len(str(high))
    for length in range(digits, last + 1):
        start = low if length == digits else 10 ** (length - 1)
        end = high if high is not None and length == last else 10**length - 1
        patterns += [" ".join(p) for p in _same_length(str(start), str(end))]
    if high is None:
        # Any number with more digits than `low`.
        patterns.append(" ".join(["[1-9]", *(["[0-9]"] * digits), "[0-9]*"]))
    return patterns


def _same_length(low: str, high: str) -> list[list[str]]:
    """Digit-class sequences for the numbers from `low` to `high` (same length)."""
    if low == high:
        return [[f'"{low}"']]
    if len(low) == 1:
        return [[f"[{low}-{high}]"]]
    rest = len(low) - 1
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        return [[f"[{low[0]}-{high[0]}]", *(["[0-9]"] * rest)]]
    if low[0] == high[0]:
        return [[f'"{low[0]}"', *p] for p in _same_length(low[1:], high[1:])]
    out = [[f'"{low[0]}"', *p] for p in _same_length(low[1:], "9" * rest)]
    if int(high[0]) - int(low[0]) > 1:
        out.append([f"[{int(low[0]) + 1}-{int(high[0]) - 1}]", *(["[0-9]"] * rest)])
    out += [[f'"{high[0]}"', *p] for p in _same_length("0" * rest, high[1:])]
    return out
