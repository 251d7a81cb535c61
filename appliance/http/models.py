"""`GET /api/v1/models`: installed models with their state, and which one is loaded; and
`GET /api/v1/openapi.json`, the API's OpenAPI document. Both are admin-scoped: this is
the gate's admin blueprint under /api/v1."""

from __future__ import annotations

from typing import Any

import msgspec
import trio
from quart import Blueprint, Response

from appliance.http.app import runtime
from appliance.http.openapi_doc import document_response, openapi_response
from appliance.llm.manifest import ModelRecord

blueprint = Blueprint("models", __name__, url_prefix="/api/v1")


class InstalledModel(ModelRecord, frozen=True, kw_only=True):
    """One installed model: the registry's record, and whether it is the loaded one."""

    loaded: bool


class InstalledModels(msgspec.Struct):
    """The models in the models directory, the default one and the loaded one."""

    models: list[InstalledModel]
    default: str | None
    loaded: str | None


class OpenAPIDocument(msgspec.Struct):
    """An OpenAPI 3.1 document (what docs/openapi.json holds)."""

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]
    components: dict[str, Any]
    security: list[dict[str, list[str]]]


@blueprint.get("/models")
@document_response(InstalledModels)
async def list_models() -> Response:
    """Installed models: state, reason, size, SHA-256, which is loaded and the default."""
    state = runtime()
    records = await trio.to_thread.run_sync(state.registry.list)
    default = await trio.to_thread.run_sync(
        state.registry.default_name, state.settings.default_model or None
    )
    loaded = state.engine.loaded_model
    body = InstalledModels(
        models=[
            InstalledModel(**msgspec.structs.asdict(record), loaded=record.name == loaded)
            for record in records
        ],
        default=default,
        loaded=loaded,
    )
    return Response(msgspec.json.encode(body), mimetype="application/json")


@blueprint.get("/openapi.json")
@document_response(OpenAPIDocument)
async def openapi() -> Response:
    """This API's OpenAPI document."""
    return openapi_response()
