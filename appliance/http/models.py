"""Models under /api/v1 (admin scope): installed models and their defaults, the resident
ones with load and unload, pulls; and `GET /api/v1/openapi.json`, the API's OpenAPI
document. This is the gate's admin blueprint under /api/v1."""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec
import trio
from quart import Blueprint, Response, request

from appliance.http.bodies import parse_body
from appliance.http.context import runtime
from appliance.http.errors import ApiError
from appliance.http.generation import KeepAlive, as_api_error, keep_alive_of
from appliance.http.openapi_doc import (
    document_request,
    document_response,
    errors,
    openapi_response,
    optional_body,
)
from appliance.http.responses import json_response
from appliance.llm.errors import InferenceError
from appliance.llm.manifest import ModelRecord
from appliance.llm.model_defaults import MAX_STOP, MAX_STOP_CHARS, InvalidDefault
from appliance.llm.pull import PullRefused
from appliance.llm.pulls import PullBusy, PullJob
from appliance.llm.registry import (
    InvalidModelName,
    ModelExists,
    RegistryError,
    UnknownModel,
    validate_model_name,
)
from appliance.metrics_snapshot import ResidentModel

blueprint = Blueprint("models", __name__, url_prefix="/api/v1")

MAX_URL_CHARS: Final = 4096


class InstalledModel(ModelRecord, frozen=True, kw_only=True):
    """One installed model: the registry's record (with its defaults), and whether it is
    resident and loaded now."""

    loaded: bool


class InstalledModels(msgspec.Struct):
    """The models in the models directory, the default one and the most recently used
    resident one."""

    models: list[InstalledModel]
    default: str | None
    loaded: str | None


class ResidentModels(msgspec.Struct):
    """The resident models and the memory they use of the budget."""

    models: list[ResidentModel]
    memory_budget_bytes: int
    memory_used_bytes: int


class LoadRequest(msgspec.Struct, forbid_unknown_fields=True):
    """How long the model stays resident once idle (default APPLIANCE_KEEP_ALIVE)."""

    keep_alive: KeepAlive | None = None


class Unloaded(msgspec.Struct):
    """`unloaded` false: the model is busy and goes when its requests end."""

    name: str
    unloaded: bool
    message: str


_Stop = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_STOP_CHARS)]
_Stops = Annotated[list[_Stop], msgspec.Meta(min_length=1, max_length=MAX_STOP)]


class DefaultsChange(msgspec.Struct, forbid_unknown_fields=True):
    """Defaults to set; null clears one, a key left out stays as it is."""

    system: str | msgspec.UnsetType | None = msgspec.UNSET
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | msgspec.UnsetType | None = (
        msgspec.UNSET
    )
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | msgspec.UnsetType | None = msgspec.UNSET
    top_k: Annotated[int, msgspec.Meta(ge=0, le=1000)] | msgspec.UnsetType | None = msgspec.UNSET
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | msgspec.UnsetType | None = msgspec.UNSET
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0, le=2)] | msgspec.UnsetType | None = (
        msgspec.UNSET
    )
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | msgspec.UnsetType | None = (
        msgspec.UNSET
    )
    stop: (
        Annotated[list[_Stop], msgspec.Meta(min_length=1, max_length=MAX_STOP)]
        | msgspec.UnsetType
        | None
    ) = msgspec.UNSET
    context_size: Annotated[int, msgspec.Meta(ge=128)] | msgspec.UnsetType | None = msgspec.UNSET


class PullRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A GGUF file to download (https:// off the box, to hosts in APPLIANCE_PULL_HOSTS);
    `sha256` is checked when given, `name` defaults to the URL's file name."""

    url: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_URL_CHARS)]
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{64}$")] | None = None
    name: str | None = None


class PullList(msgspec.Struct):
    """Pulls since the daemon started (the last 20), newest last."""

    pulls: list[PullJob]


class OpenAPIDocument(msgspec.Struct):
    """An OpenAPI 3.1 document (what docs/openapi.json holds)."""

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]
    components: dict[str, Any]
    security: list[dict[str, list[str]]]


def _registry_error(exc: RegistryError) -> ApiError:
    if isinstance(exc, UnknownModel):
        return ApiError(404, "model_not_found", str(exc), param="name")
    if isinstance(exc, InvalidModelName):
        return ApiError(422, "invalid_field", str(exc), param="name")
    if isinstance(exc, ModelExists | PullBusy):
        return ApiError(409, "model_exists" if isinstance(exc, ModelExists) else "busy", str(exc))
    if isinstance(exc, PullRefused):
        return ApiError(422, "pull_refused", str(exc), param="url")
    return ApiError(503, "model_unavailable", str(exc))


def _name(name: str) -> str:
    try:
        return validate_model_name(name)
    except InvalidModelName as exc:
        raise ApiError(422, "invalid_field", str(exc), param="name") from None


@blueprint.get("/models")
@document_response(InstalledModels)
async def list_models() -> Response:
    """Installed models: state, reason, size, SHA-256, defaults, which are resident and the
    default one."""
    state = runtime()
    records = await trio.to_thread.run_sync(state.registry.list)
    default = await trio.to_thread.run_sync(
        state.registry.default_name, state.settings.default_model or None
    )
    workers = state.engine.workers
    body = InstalledModels(
        models=[
            InstalledModel(
                **msgspec.structs.asdict(record),
                loaded=record.name in workers and workers[record.name].ready,
            )
            for record in records
        ],
        default=default,
        loaded=state.engine.loaded_model,
    )
    return json_response(body)


def _resident() -> ResidentModels:
    engine = runtime().engine
    return ResidentModels(
        models=[
            msgspec.convert(engine.describe(worker), ResidentModel)
            for worker in list(engine.workers.values())
        ],
        memory_budget_bytes=engine.budget,
        memory_used_bytes=engine.used_memory(),
    )


@blueprint.get("/models/resident")
@document_response(ResidentModels)
async def resident_models() -> Response:
    """The resident models (`appliance models ps`): memory (estimated and RSS), context,
    slots and what runs on them, idle time and keep-alive."""
    return json_response(_resident())


@blueprint.post("/models/<name>/load")
@optional_body
@document_request(LoadRequest)
@document_response(ResidentModel)
@errors(404, 504, 507)
async def load_model(name: str) -> Response:
    """Load a model now (or keep it resident), and answer once it is loaded; may unload
    idle models to make room. 507 when it alone needs more than APPLIANCE_MODEL_MEMORY."""
    state = runtime()
    model = _name(name)
    body = await parse_body(LoadRequest) if request.content_length else LoadRequest()
    keep_alive = keep_alive_of(body.keep_alive)
    try:
        await trio.to_thread.run_sync(state.registry.get, model)
    except RegistryError as exc:
        raise _registry_error(exc) from None
    try:
        worker = await state.engine.load(
            model,
            keep_alive=keep_alive,
            deadline=trio.current_time() + state.settings.request_timeout,
        )
    except InferenceError as exc:
        raise as_api_error(exc) from None
    return json_response(msgspec.convert(state.engine.describe(worker), ResidentModel))


@blueprint.post("/models/<name>/unload")
@document_response(Unloaded)
@document_response(Unloaded, 202)
@errors(404, 422)
async def unload_model(name: str) -> Response:
    """Unload a resident model: at once when idle (200), else when its requests end (202)."""
    engine = runtime().engine
    model = _name(name)
    try:
        done = await engine.unload(model)
    except LookupError:
        resident = ", ".join(engine.workers) or "none"
        raise ApiError(
            404, "not_resident", f"model {model!r} is not resident; resident: {resident}"
        ) from None
    if done:
        return json_response(Unloaded(name=model, unloaded=True, message=f"{model} unloaded"))
    return json_response(
        Unloaded(
            name=model,
            unloaded=False,
            message=f"{model} is busy; it is unloaded when its running requests end",
        ),
        status=202,
    )


@blueprint.patch("/models/<name>/defaults")
@document_request(DefaultsChange)
@document_response(InstalledModel)
@errors(404)
async def set_defaults(name: str) -> Response:
    """Set a model's defaults (`appliance models set`): what a request that does not say
    otherwise gets. `context_size` applies at the model's next load."""
    state = runtime()
    model = _name(name)
    body = await parse_body(DefaultsChange)
    changes = {
        field: value
        for field in body.__struct_fields__
        if (value := getattr(body, field)) is not msgspec.UNSET
    }
    try:
        record = await trio.to_thread.run_sync(state.registry.set_defaults, model, changes)
    except InvalidDefault as exc:
        raise ApiError(422, "invalid_field", str(exc)) from None
    except RegistryError as exc:
        raise _registry_error(exc) from None
    worker = state.engine.workers.get(model)
    return json_response(
        InstalledModel(**msgspec.structs.asdict(record), loaded=bool(worker and worker.ready))
    )


@blueprint.post("/models/pull")
@document_request(PullRequest)
@document_response(PullJob, 202)
@errors(409)
async def pull_model() -> Response:
    """Start downloading a GGUF model (`appliance models pull`); follow it with
    `GET /api/v1/models/pulls/<id>`. 422 when the URL is refused (outbound policy, not a
    file name) or the name is invalid; 409 when the name is taken."""
    state = runtime()
    body = await parse_body(PullRequest)
    try:
        job = await state.pulls.start(body.url, body.name, body.sha256)
    except RegistryError as exc:
        raise _registry_error(exc) from None
    return json_response(job, status=202)


@blueprint.get("/models/pulls")
@document_response(PullList)
async def list_pulls() -> Response:
    """The pulls since the daemon started: progress, and how each ended."""
    return json_response(PullList(pulls=list(runtime().pulls.jobs.values())))


@blueprint.get("/models/pulls/<pull_id>")
@document_response(PullJob)
@errors(404)
async def get_pull(pull_id: str) -> Response:
    """One pull: bytes done of the total, state, SHA-256 once done, or why it failed."""
    job = runtime().pulls.jobs.get(pull_id)
    if job is None:
        raise ApiError(404, "not_found", f"there is no pull {pull_id[:40]!r}")
    return json_response(job)


@blueprint.get("/openapi.json")
@document_response(OpenAPIDocument)
async def openapi() -> Response:
    """This API's OpenAPI document."""
    return openapi_response()
