"""Request bodies decoded straight into msgspec Structs, and query-string integers bounded
where they enter, with errors that name the field."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
from quart import request

from appliance.http.errors import ApiError

T = TypeVar("T")

_PATH = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")
# ASCII digits only (int() also takes other scripts' digits, spaces and underscores), and
# few enough that the value is checked against its range, not parsed at length.
_WHOLE = re.compile(r"-?[0-9]{1,19}")


async def parse_body(kind: type[T]) -> T:
    """JSON body as `kind`: 400 for bytes that are not JSON, 422 for a wrong field."""
    data = await request.get_data(cache=False)
    if not data:
        raise ApiError(400, "empty_body", "the request needs a JSON body")
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH.search(message)
        # msgspec writes a dict's values as `[...]`: the param is the dict.
        field = match.group(1).replace("[...]", "") if match else None
        reason = message.split(" - at ")[0]
        unknown = _UNKNOWN.search(reason)
        if unknown and field in (None, ""):
            known = ", ".join(f.encode_name for f in msgspec.structs.fields(kind))  # type: ignore[arg-type]
            reason = f"{reason}; the fields this endpoint takes are: {known}"
        if unknown:
            # The param is the unknown field itself, where it is (a typo is found at once).
            name = unknown.group(1)[:64]
            field = f"{field}.{name}" if field else name
            reason = f"{reason}; leave it out or correct its name"
            raise ApiError(422, "invalid_field", f"{field}: {reason}", param=field) from None
        where = f"{field}: " if field else ""
        raise ApiError(422, "invalid_field", f"{where}{reason}", param=field) from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise ApiError(
            400, "invalid_json", "the body is not valid JSON (UTF-8 encoded); check its syntax"
        ) from None


def query_int(name: str, default: int, minimum: int, maximum: int) -> int:
    """The query-string integer `name` (absent: `default`), or a 400 naming it and its range."""
    raw = request.args.get(name)
    if raw is None:
        return default
    value = int(raw) if _WHOLE.fullmatch(raw) else None
    if value is None or not minimum <= value <= maximum:
        raise ApiError(
            400,
            "invalid_parameter",
            f"{name} must be a whole number from {minimum} to {maximum}; got {raw[:32]!r}",
            param=name,
        )
    return value
