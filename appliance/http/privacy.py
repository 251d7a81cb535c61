"""Privacy endpoints: show what redaction makes of a text; erase the caller's data."""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec
import trio
from quart import Blueprint, Response

from appliance.http.app import current_owner, runtime
from appliance.http.bodies import parse_body
from appliance.http.errors import ApiError
from appliance.privacy.redaction import RedactionResult, Redactor

blueprint = Blueprint("privacy", __name__, url_prefix="/api/v1/privacy")

MAX_TEXT_CHARS: Final = 100_000


class RedactRequest(msgspec.Struct, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS)]
    level: str | None = None


# Short texts redact in well under a millisecond; longer ones go to a thread so a
# 100 KB body (tens of milliseconds, more on hostile input) never stalls the event loop.
INLINE_REDACT_CHARS: Final = 4096


async def redact_off_loop(redactor: Redactor, text: str) -> RedactionResult:
    if len(text) <= INLINE_REDACT_CHARS:
        return redactor.redact(text)
    return await trio.to_thread.run_sync(redactor.redact, text)


def _json(body: Any) -> Response:
    return Response(msgspec.json.encode(body), mimetype="application/json")


@blueprint.post("/redact")
async def redact() -> Response:
    """What the configured level (or `level`) keeps of a text; nothing is stored."""
    state = runtime()
    body = await parse_body(RedactRequest)
    redactor = state.redactor
    if body.level is not None:
        if body.level not in ("off", "standard", "strict"):
            raise ApiError(
                422, "invalid_field", "level must be off, standard or strict", param="level"
            )
        redactor = Redactor(body.level)  # type: ignore[arg-type]  # checked just above
    result = await redact_off_loop(redactor, body.text)
    return _json(
        {
            "text": result.text,
            "level": redactor.level,
            "counts": result.counts,
            "findings": [
                {"category": f.category, "start": f.start, "end": f.end} for f in result.findings
            ],
        }
    )


@blueprint.delete("/data")
async def erase() -> Response:
    """Everything stored for the calling client, removed now (index entries included)."""
    conversations, messages = await runtime().conversations.delete_owner(current_owner())
    return _json({"conversations_removed": conversations, "messages_removed": messages})
