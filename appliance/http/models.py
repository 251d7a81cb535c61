"""`GET /api/v1/models`: installed models with their state, and which one is loaded."""

from __future__ import annotations

import msgspec
import trio
from quart import Blueprint, Response

from appliance.http.app import runtime

blueprint = Blueprint("models", __name__, url_prefix="/api/v1")


@blueprint.get("/models")
async def list_models() -> Response:
    state = runtime()
    records = await trio.to_thread.run_sync(state.registry.list)
    default = await trio.to_thread.run_sync(
        state.registry.default_name, state.settings.default_model or None
    )
    body = {
        "models": [
            {**msgspec.to_builtins(record), "loaded": record.name == state.engine.loaded_model}
            for record in records
        ],
        "default": default,
        "loaded": state.engine.loaded_model,
    }
    return Response(msgspec.json.encode(body), mimetype="application/json")
