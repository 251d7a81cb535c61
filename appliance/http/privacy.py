"""Privacy endpoints: show what redaction makes of a text; erase the caller's data."""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from quart import Blueprint, Response

from appliance.http.bodies import parse_body
from appliance.http.context import current_owner, runtime
from appliance.http.errors import ApiError
from appliance.http.openapi_doc import document_request, document_response
from appliance.http.responses import json_response
from appliance.privacy.redaction import LEVELS, Level, Redactor, redact_off_loop

blueprint = Blueprint("privacy", __name__, url_prefix="/api/v1/privacy")

MAX_TEXT_CHARS: Final = 100_000


class RedactRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A text to redact, at the configured level unless `level` names another."""

    text: Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS)]
    # Checked by the handler (its error names the levels); documented as the enum it is.
    level: Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(LEVELS)})] | None = None


class Finding(msgspec.Struct):
    """A span of the original text that was replaced."""

    category: str
    start: int
    end: int


class Redaction(msgspec.Struct):
    """The text with typed placeholders, how many of each category, and where they were."""

    text: str
    level: Level
    counts: dict[str, int]
    findings: list[Finding]


class Erased(msgspec.Struct):
    """What was removed of the caller's data."""

    conversations_removed: int
    messages_removed: int


@blueprint.post("/redact")
@document_request(RedactRequest)
@document_response(Redaction)
async def redact() -> Response:
    """What the configured level (or `level`) keeps of a text; nothing is stored."""
    state = runtime()
    body = await parse_body(RedactRequest)
    redactor = state.redactor
    if body.level is not None:
        if body.level not in LEVELS:
            raise ApiError(
                422, "invalid_field", "level must be off, standard or strict", param="level"
            )
        redactor = Redactor(body.level)
    result = await redact_off_loop(redactor, body.text)
    return json_response(
        Redaction(
            text=result.text,
            level=redactor.level,
            counts=result.counts,
            findings=[Finding(f.category, f.start, f.end) for f in result.findings],
        )
    )


@blueprint.delete("/data")
@document_response(Erased)
async def erase() -> Response:
    """Everything stored for the calling client, removed now (index entries included)."""
    conversations, messages = await runtime().conversations.delete_owner(current_owner())
    return json_response(Erased(conversations_removed=conversations, messages_removed=messages))
