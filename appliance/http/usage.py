"""GET /api/v1/usage: the calling key's token use and budgets, local and remote."""

from __future__ import annotations

from typing import Any

import msgspec
from quart import Blueprint, Response

from appliance.auth.budgets import APPLIANCE_OWNER, key_limits
from appliance.http.app import current_key, runtime

blueprint = Blueprint("usage", __name__, url_prefix="/api/v1")


@blueprint.get("/usage")
async def usage() -> Response:
    state, key = runtime(), current_key()
    settings = state.settings
    limits = key_limits(
        key.tokens_per_day, key.tokens_per_month, settings.tokens_per_day, settings.tokens_per_month
    )
    body: dict[str, Any] = {
        "key": {"id": key.id, "name": key.name, "scope": key.scope},
        "enforced": settings.budget_enforce,
        **await state.budgets.report(key.id, *limits),
    }
    if state.remote is not None:
        budget = settings.remote_budget_monthly
        body["remote_spending"] = {
            "month": await state.budgets.spending(APPLIANCE_OWNER),
            "budget_monthly": budget or None,
            "price_per_1k_tokens": settings.remote_price_per_1k,
        }
    return Response(msgspec.json.encode(body), mimetype="application/json")
