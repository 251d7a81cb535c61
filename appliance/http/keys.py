"""Admin endpoints for API keys: list them with their usage, create one (its token is in
the answer, once), revoke one. What `appliance keys` does, for the operator page."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from quart import Blueprint, Response

from appliance.auth.apikeys import ApiKey, ApiKeyError
from appliance.auth.budgets import Usage, key_limits
from appliance.http.bodies import parse_body
from appliance.http.context import current_key, runtime
from appliance.http.errors import ApiError
from appliance.http.openapi_doc import document_request, document_response, errors
from appliance.http.responses import json_response

blueprint = Blueprint("keys", __name__, url_prefix="/api/v1/admin/keys")

# Budgets above a trillion tokens are typos, not budgets.
TokenBudget = Annotated[int, msgspec.Meta(ge=0, le=10**12)]


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    """A new key: its name, scope and optional token budgets (else the defaults apply)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    scope: Literal["admin", "user"] = "user"
    tokens_per_day: TokenBudget | None = None
    tokens_per_month: TokenBudget | None = None


class CreatedKey(msgspec.Struct):
    """The new key; `token` is shown only in this answer and never stored."""

    key: ApiKey
    token: str


class KeyUsage(msgspec.Struct):
    """A key's tokens today and this month, local and remote, against its budgets."""

    local: Usage
    remote: Usage


class KeyEntry(msgspec.Struct):
    key: ApiKey
    usage: KeyUsage


class KeyList(msgspec.Struct):
    """Every active key (never a token), oldest first, with its usage."""

    keys: list[KeyEntry]


class RevokedKey(msgspec.Struct):
    """The key is refused from now on; its record stays for the audit trail."""

    revoked: ApiKey


@blueprint.get("")
@document_response(KeyList)
async def list_keys() -> Response:
    """Active API keys (id, name, scope, created, last used, budgets) and their usage."""
    state = runtime()
    settings = state.settings
    entries = []
    for key in await state.apikeys.list():
        if key.revoked is not None:
            continue
        limits = key_limits(
            key.tokens_per_day,
            key.tokens_per_month,
            settings.tokens_per_day,
            settings.tokens_per_month,
        )
        report = await state.budgets.report(key.id, *limits)
        entries.append(KeyEntry(key=key, usage=KeyUsage(report["local"], report["remote"])))
    return json_response(KeyList(keys=entries))


@blueprint.post("")
@document_request(KeyCreate)
@document_response(CreatedKey, 201)
@errors(409)
async def create_key() -> Response:
    """Create a key; the answer holds its token, which is shown only this once."""
    body = await parse_body(KeyCreate)
    try:
        key, token = await runtime().apikeys.create(
            body.name,
            body.scope,
            tokens_per_day=body.tokens_per_day,
            tokens_per_month=body.tokens_per_month,
        )
    except ApiKeyError as exc:
        status, code = (409, "name_taken") if "exists" in str(exc) else (422, "invalid_field")
        raise ApiError(status, code, str(exc), param="name") from None
    return json_response(CreatedKey(key=key, token=token), status=201)


@blueprint.delete("/<name>")
@document_response(RevokedKey)
@errors(404, 409)
async def revoke_key(name: str) -> Response:
    """Revoke a key by name. The last admin key and the key making the request are kept:
    revoking them would leave nobody able to administer the box from here."""
    apikeys = runtime().apikeys
    key = await apikeys.by_name(name)
    if key is None or key.revoked is not None:
        raise ApiError(404, "key_not_found", f"there is no active key named {name[:64]!r}")
    if key.id == current_key().id:
        raise ApiError(
            409, "own_key", "this is the key making the request; revoke it with another admin key"
        )
    admins = [k for k in await apikeys.list() if k.scope == "admin" and k.revoked is None]
    if key.scope == "admin" and len(admins) <= 1:
        raise ApiError(409, "last_admin", "this is the last admin key; create another one first")
    try:
        revoked = await apikeys.revoke(name)
    except ApiKeyError as exc:
        raise ApiError(404, "key_not_found", str(exc)) from None
    return json_response(RevokedKey(revoked=revoked))
