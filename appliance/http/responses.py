"""A JSON answer encoded by msgspec (Structs as they are, no round trip through dicts)."""

from __future__ import annotations

import msgspec
from quart import Response


def json_response(body: object, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status=status, mimetype="application/json")
