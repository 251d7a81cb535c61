"""GET /api/v1/usage: the calling key's token use and budgets, local and remote."""

from __future__ import annotations

import msgspec
from quart import Blueprint, Response

from appliance.http.app import current_key, runtime

blueprint = Blueprint("usage", __name__, url_prefix="/api/v1")


@blueprint.get("/usage")
async def usage() -> Response:
    state, key = runtime(), current_key()
    settings = state.settings
    per_day = key.tokens_per_day if key.tokens_per_day is not None else settings.tokens_per_day
    per_month = (
        key.tokens_per_month if key.tokens_per_month is not None else settings.tokens_per_month
    )
    body = {
        "key": {"id": key.id, "name": key.name, "scope": key.scope},
        "enforced": settings.budget_enforce,
        "local": await state.budgets.usage(key.id, "local", per_day or None, per_month or None),
        "remote": await state.budgets.usage(key.id, "remote", None, None),
    }
    return Response(msgspec.json.encode(body), mimetype="application/json")
