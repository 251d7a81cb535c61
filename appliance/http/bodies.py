"""Request bodies decoded straight into msgspec Structs, with errors that name the field."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
from quart import request

from appliance.http.errors import ApiError

T = TypeVar("T")

_PATH = re.compile(r"at `\$\.?([^`]*)`")


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
        field = match.group(1) if match else None
        reason = message.split(" - at ")[0]
        where = f"{field}: " if field else ""
        raise ApiError(422, "invalid_field", f"{where}{reason}", param=field) from None
    except msgspec.DecodeError:
        raise ApiError(
            400, "invalid_json", "the body is not valid JSON (UTF-8 encoded); check its syntax"
        ) from None
