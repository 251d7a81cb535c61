"""How long an idle model stays resident: Ollama's `keep_alive` values.

A number is seconds; a string is a duration (`300`, `90s`, `5m`, `1h30m`, `250ms`, Go's
`time.ParseDuration` units). A negative value keeps the model resident for ever; 0 unloads
it as soon as its requests have ended. The value is seconds as a float, `FOREVER` for ever.
"""

from __future__ import annotations

import math
import re
from typing import Final

FOREVER: Final = math.inf
# Beyond any real wish (about 30 years): a larger finite value is refused, not overflowed.
MAX_SECONDS: Final = 1e9
FORM: Final = (
    "a duration such as 5m, 1h30m, 90s or 300 (seconds); 0 unloads after the request, "
    "a negative value (-1) keeps the model loaded"
)

_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_NUMBER: Final = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_PLAIN: Final = re.compile(rf"[-+]?{_NUMBER}")
_PART: Final = re.compile(rf"({_NUMBER})(ns|us|µs|ms|s|m|h)")
_DURATION: Final = re.compile(rf"[-+]?(?:{_NUMBER}(?:ns|us|µs|ms|s|m|h))+")


class InvalidKeepAlive(ValueError):
    """The value is not a keep-alive duration; the message says what is expected."""


def parse_keep_alive(value: object) -> float:
    """Seconds (`FOREVER` for ever) from a number or a duration string."""
    if isinstance(value, bool):
        raise InvalidKeepAlive(f"keep_alive is {value!r}; expected {FORM}")
    if isinstance(value, int | float):
        return _checked(float(value), value)
    if not isinstance(value, str):
        raise InvalidKeepAlive(f"keep_alive is a {type(value).__name__}; expected {FORM}")
    text = value.strip()
    if _PLAIN.fullmatch(text):
        return _checked(float(text), value)
    if not _DURATION.fullmatch(text):
        raise InvalidKeepAlive(f"keep_alive is {value[:40]!r}; expected {FORM}")
    sign = -1.0 if text.startswith("-") else 1.0
    seconds = sum(float(amount) * _UNITS[unit] for amount, unit in _PART.findall(text))
    return _checked(sign * seconds, value)


def _checked(seconds: float, original: object) -> float:
    if math.isnan(seconds):
        raise InvalidKeepAlive(f"keep_alive is {original!r}; expected {FORM}")
    if seconds < 0:
        return FOREVER
    if seconds > MAX_SECONDS:
        raise InvalidKeepAlive(
            f"keep_alive is {original!r}, over {MAX_SECONDS:.0f} seconds; use -1 to keep the "
            "model loaded for ever"
        )
    return seconds


def describe_keep_alive(seconds: float) -> str:
    """`forever`, or the duration in the largest whole unit (`5m`, `90s`, `1.5s`)."""
    if seconds == FOREVER:
        return "forever"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
