"""GET /api/v1/usage: the calling key's token use and budgets, local and remote."""

from __future__ import annotations

import msgspec
from quart import Blueprint, Response

from appliance.auth.budgets import APPLIANCE_OWNER, Usage, key_limits
from appliance.http.context import current_key, runtime
from appliance.http.openapi_doc import document_response
from appliance.http.responses import json_response

blueprint = Blueprint("usage", __name__, url_prefix="/api/v1")


class KeyInfo(msgspec.Struct):
    id: str
    name: str
    scope: str


class RemoteSpending(msgspec.Struct):
    """The appliance's spending on the remote LLM this month, against its budget."""

    month: float
    budget_monthly: float | None
    price_per_1k_tokens: float


class UsageReport(msgspec.Struct):
    """The calling key's tokens today and this month, its budgets and when they reset."""

    key: KeyInfo
    enforced: bool
    local: Usage
    remote: Usage
    # Only while the remote LLM is on.
    remote_spending: RemoteSpending | msgspec.UnsetType = msgspec.UNSET


@blueprint.get("/usage")
@document_response(UsageReport)
async def usage() -> Response:
    """The calling key's token use (local and remote), its budgets and when they reset."""
    state, key = runtime(), current_key()
    settings = state.settings
    limits = key_limits(
        key.tokens_per_day, key.tokens_per_month, settings.tokens_per_day, settings.tokens_per_month
    )
    used = await state.budgets.report(key.id, *limits)
    body = UsageReport(
        key=KeyInfo(id=key.id, name=key.name, scope=key.scope),
        enforced=settings.budget_enforce,
        local=used["local"],
        remote=used["remote"],
    )
    if state.remote is not None:
        budget = settings.remote_budget_monthly
        body.remote_spending = RemoteSpending(
            month=await state.budgets.spending(APPLIANCE_OWNER),
            budget_monthly=budget or None,
            price_per_1k_tokens=settings.remote_price_per_1k,
        )
    return json_response(body)
