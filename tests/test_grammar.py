"""JSON schemas to grammars (appliance.llm.grammar): bounds become digit patterns that
admit exactly the numbers within them, and what a grammar cannot enforce is refused by
name rather than left out."""

from __future__ import annotations

import random
import re

import pytest

from appliance.llm.grammar import SchemaError, _fraction_range, int_range, schema_to_grammar


def _regex(expression: str) -> re.Pattern[str]:
    """The digit patterns are literals, classes, groups, | and *: a regex once the
    literals' quotes and the spaces go."""
    body = re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), expression)
    return re.compile(body.replace(" ", ""))


BOUNDS = [
    (0, None),
    (None, None),
    (5, None),
    (None, -3),
    (None, 17),
    (-15, 7),
    (3, 3),
    (0, 0),
    (12, 345),
    (-1000, -7),
    (99, 101),
    (7, 1234567),
    (-5, None),
]


@pytest.mark.parametrize(("low", "high"), BOUNDS)
def test_integer_bounds_admit_exactly_the_numbers_within(low: int | None, high: int | None) -> None:
    pattern = _regex(int_range(low, high))
    rng = random.Random(7)
    values = [*range(-1100, 1100), *(rng.randint(-(10**8), 10**8) for _ in range(2000))]
    for value in values:
        inside = (low is None or value >= low) and (high is None or value <= high)
        assert bool(pattern.fullmatch(str(value))) == inside, (low, high, value)
    for text in ("01", "-0", "00", "1.5", ""):
        assert not pattern.fullmatch(text)


@pytest.mark.parametrize(("low", "high"), [(None, -47), (-5, 0), (0, 1), (2, 10), (-3, 3)])
def test_fractions_stay_within_number_bounds(low: int | None, high: int) -> None:
    fraction = _fraction_range(low, high)
    if fraction is None:
        assert high < 1
        return
    pattern = _regex(fraction)
    for whole in range(-60, 60):
        for tail in ("0", "5", "999"):
            text = f"{whole}.{tail}"
            if pattern.fullmatch(text):
                assert (low is None or float(text) >= low) and float(text) <= high, text


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "integer", "multipleOf": 2}, "multipleOf"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"a": {"not": {}}}}, "properties.a.not"),
        ({"type": "string", "format": "email"}, "format"),
        ({"type": "array", "maxItems": 100000}, "maxItems"),
        ({"$ref": "https://example.com/schema.json"}, "$ref"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "properties.a.$ref"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "pattern"),
        ({"type": "widget"}, "type"),
    ],
)
def test_what_a_grammar_cannot_enforce_is_refused_by_name(
    schema: dict[str, object], where: str
) -> None:
    with pytest.raises(SchemaError) as caught:
        schema_to_grammar(schema)
    assert caught.value.where == where


def test_strings_hold_no_raw_control_characters() -> None:
    grammar = schema_to_grammar({"type": "object", "properties": {"a": {"type": "string"}}})
    (char,) = [line for line in grammar.splitlines() if line.startswith("char ::= ")]
    assert "\\x00-\\x1F" in char
