"""The API's OpenAPI document, generated from the code with quart-schema.

Each handler documents what is its own with quart-schema's documentation-only decorators
(`document_request`, `document_response`, `document_querystring`) and the helpers here
(`errors`, `event_stream`, `plain_text`, `optional_body`). What every route shares comes
from the rules the app really applies: bearer auth and the gate's 401/403/429 (public
paths and admin blueprints from appliance.auth.gate), the body limit's 413, the storage
errors, 500, and `X-Request-ID` on every answer.

quart-schema is used for the document only: it is not initialised on the app, so it
changes no response and serves none of its own pages (no unauthenticated docs). The
document is served to admins at `GET /api/v1/openapi.json` and kept in the repository as
docs/openapi.json; `python -m appliance.http.openapi_file` (`make openapi`) rewrites it.
"""

from __future__ import annotations

import http
import inspect
import json
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar

import msgspec
from quart import Quart, Response, current_app
from quart_schema import HttpSecurityScheme, Info, OpenAPIProvider, QuartSchema
from quart_schema import document_querystring as _document_querystring
from quart_schema import document_request as _document_request
from quart_schema import document_response as _document_response
from quart_schema.validation import (
    QUART_SCHEMA_QUERYSTRING_ATTRIBUTE,
    QUART_SCHEMA_REQUEST_ATTRIBUTE,
    QUART_SCHEMA_RESPONSE_ATTRIBUTE,
)
from werkzeug.routing.rules import Rule

from appliance import __version__
from appliance.auth.gate import ADMIN_BLUEPRINTS, PUBLIC_PATHS

F = TypeVar("F", bound=Callable[..., Any])

SECURITY_SCHEME: Final = "bearerAuth"
REF_TEMPLATE: Final = "#/components/schemas/{name}"
_EXTENSION_KEY: Final = "appliance.openapi"
_STREAM_ATTRIBUTE: Final = "_appliance_event_stream"
_TEXT_ATTRIBUTE: Final = "_appliance_plain_text"
_OPTIONAL_BODY_ATTRIBUTE: Final = "_appliance_optional_body"
_LINKS_ATTRIBUTE: Final = "_appliance_links"

DESCRIPTION: Final = (
    "The HTTP API of the appliance: a private AI assistant on an edge box. Every endpoint "
    "but `GET /api/v1/health/live` and `/ready` needs `Authorization: Bearer <key>` (keys "
    "look like `ak-<id>.<secret>`; `appliance keys create` makes them). Admin endpoints "
    "need a key with scope `admin`. Errors are JSON in one shape (OpenAI's): "
    '`{"error": {"message", "type", "param", "code", "request_id"}}`.'
)


class ErrorDetail(msgspec.Struct):
    """What went wrong: a message that says what to do, and a stable `code`."""

    message: str
    type: str
    param: str | None
    code: str
    request_id: str | None


class ErrorBody(msgspec.Struct):
    """An error, in OpenAI's shape (so that OpenAI clients read it)."""

    error: ErrorDetail


# Why each error status is given, for the responses every route shares.
_WHY: Final = {
    400: "the body is not JSON, or is empty, or a parameter is malformed",
    401: "the API key is missing, wrong or revoked (`invalid_api_key`)",
    403: "the endpoint needs a key with scope admin (`admin_scope_required`)",
    404: "no such resource",
    409: (
        "another backup or restore is running (`busy`), the store is an external Redis "
        "that Redis' own persistence backs up (`external_store`), or restores have moved "
        "aside APPLIANCE_RESTORE_PREVIOUS_KEEP dirs of data (`previous_data_full`)"
    ),
    413: "the body is larger than APPLIANCE_MAX_BODY_BYTES (`request_too_large`)",
    422: "a field is out of range or unknown; `param` names it",
    429: (
        "too many failed key attempts from this address, APPLIANCE_RATE_LIMIT, a token "
        "budget, APPLIANCE_MAX_STREAMS_PER_KEY or a full queue; see `Retry-After`"
    ),
    500: "an internal error; the log has details under the request id",
    502: "the remote LLM cannot be reached, refused or broke off",
    503: (
        "storage, the model or its worker is unavailable, or the KV cache is full "
        "(`context_full`); retry shortly"
    ),
    504: "the generation passed APPLIANCE_REQUEST_TIMEOUT (or the remote LLM's timeout)",
    507: (
        "storage is full (APPLIANCE_REDIS_MAXMEMORY reached, or no space left on the state "
        "dir's disk); nothing was written"
    ),
}


def errors(*statuses: int) -> Callable[[F], F]:
    """Document the error statuses a handler gives itself; the common ones (auth, limits,
    storage, 500) are added to every route when the document is built."""

    def decorator(func: F) -> F:
        for status in statuses:
            func = document_response(ErrorBody, status)(func)
        return func

    return decorator


# quart-schema's documentation-only decorators, typed for this package's handlers (they
# record the models on the function; nothing is validated or converted at request time).


def document_response(model: Any, status: int = 200) -> Callable[[F], F]:
    decorate: Callable[[F], F] = _document_response(model, status)
    return decorate


def document_request(model: Any) -> Callable[[F], F]:
    """The JSON body a handler reads with `parse_body(model)`."""
    decorate: Callable[[F], F] = _document_request(model)
    return decorate


def document_querystring(model: Any) -> Callable[[F], F]:
    decorate: Callable[[F], F] = _document_querystring(model)
    return decorate


def event_stream(
    description: str, events: dict[str, type[msgspec.Struct]], *, done: str | None = None
) -> Callable[[F], F]:
    """The 200 answer may also be Server-Sent Events (`stream: true`). `events` maps each
    event type (`message` for events without an `event:` line) to the JSON its `data:`
    holds; `done` is a last `data:` line that is not JSON (OpenAI's `[DONE]`)."""

    def decorator(func: F) -> F:
        setattr(func, _STREAM_ATTRIBUTE, (description, events, done))
        return func

    return decorator


def _event_schema(
    description: str, events: dict[str, type[msgspec.Struct]], done: str | None
) -> dict[str, Any]:
    """One event of a stream as `{"event", "data"}` (the schema of a text/event-stream
    describes each event; `data` is JSON of the named schema)."""

    def event(name: str, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["event", "data"],
            "properties": {"event": {"const": name}, "data": data},
        }

    choices = [
        event(
            name,
            {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": _ref(model),
            },
        )
        for name, model in events.items()
    ]
    if done is not None:
        choices.append(event("message", {"const": done}))
    return {"description": description, "anyOf": choices}


def plain_text(description: str) -> Callable[[F], F]:
    """The 200 answer may also be `text/plain` (Prometheus' text format)."""

    def decorator(func: F) -> F:
        setattr(func, _TEXT_ATTRIBUTE, description)
        return func

    return decorator


def links(**targets: dict[str, str]) -> Callable[[F], F]:
    """OpenAPI links of the 200 answer: operation id -> its parameters, each taken from
    the answer (`$response.body#/field`)."""

    def decorator(func: F) -> F:
        setattr(func, _LINKS_ATTRIBUTE, targets)
        return func

    return decorator


def optional_body(func: F) -> F:
    """The documented request body may be left out (every other body is required)."""
    setattr(func, _OPTIONAL_BODY_ATTRIBUTE, True)
    return func


def _schemas(*models: Any) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(models, ref_template=REF_TEMPLATE)
    return components


def _models_of(func: Callable[..., Any]) -> list[Any]:
    """The models a handler documents (quart-schema keeps only the top one of each in the
    document; the Structs they refer to are added from these)."""
    found = [getattr(func, QUART_SCHEMA_QUERYSTRING_ATTRIBUTE, None)]
    found.append((getattr(func, QUART_SCHEMA_REQUEST_ATTRIBUTE, None) or (None,))[0])
    found += [model for model, _ in getattr(func, QUART_SCHEMA_RESPONSE_ATTRIBUTE, {}).values()]
    return [model for model in found if model is not None]


def _tidy(value: Any) -> Any:
    """Docstrings as descriptions without their source indentation."""
    if isinstance(value, dict):
        return {
            key: inspect.cleandoc(item)
            if key == "description" and isinstance(item, str)
            else _tidy(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_tidy(item) for item in value]
    return value


def _ref(model: type[msgspec.Struct]) -> dict[str, str]:
    return _ref_named(model.__name__)


def _ref_named(name: str) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(name=name)}


def _header(description: str, *, required: bool = False) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": "string"}}


REQUEST_ID: Final = "X-Request-ID"
_HEADERS: Final = {
    REQUEST_ID: _header("this request's id (the caller's when sane)", required=True),
    "Retry-After": _header("seconds to wait before trying again"),
    "WWW-Authenticate": _header("`Bearer`"),
}
_ERROR_RESPONSE: Final = {"content": {"application/json": {"schema": _ref(ErrorBody)}}}


def _error_name(status: int) -> str:
    return f"Error{status}"


def _error_response(status: int) -> dict[str, Any]:
    headers = [REQUEST_ID]
    if status == 401:
        headers.append("WWW-Authenticate")
    if status in (429, 503):
        headers.append("Retry-After")
    return {
        "description": f"{http.HTTPStatus(status).phrase}: {_WHY[status]}",
        "headers": {name: {"$ref": f"#/components/headers/{name}"} for name in headers},
        **_ERROR_RESPONSE,
    }


class _Provider(OpenAPIProvider):
    """quart-schema's provider, completed with what the app applies to every route."""

    def generate_rules(self) -> Iterable[Rule]:
        # Quart's static route serves nothing here (the package has no static folder), and
        # the web console's pages are not API operations.
        return (
            rule
            for rule in super().generate_rules()
            if rule.endpoint != "static" and not rule.endpoint.startswith("console.")
        )

    def operation_id(self, method: str, path: str, func: Callable[..., Any]) -> str:
        # The handlers' names are unique across the API.
        return func.__name__

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        func = self._app.view_functions[rule.endpoint]
        blueprint = rule.endpoint.rpartition(".")[0]
        components.update(_schemas(*_models_of(func)))
        for path_item in paths.values():
            for operation in path_item.values():
                self._complete(operation, func, rule.rule, blueprint, components)
        return paths, components

    def _complete(
        self,
        operation: dict[str, Any],
        func: Callable[..., Any],
        path: str,
        blueprint: str,
        components: dict[str, Any],
    ) -> None:
        public = path in PUBLIC_PATHS
        admin = blueprint in ADMIN_BLUEPRINTS
        operation["tags"] = [blueprint]
        scope = "none (public)" if public else "admin" if admin else "any (user or admin)"
        description = operation.get("description", "").strip()
        operation["description"] = (description + "\n\n" if description else "") + (
            f"Key scope: {scope}."
        )
        if not operation["parameters"]:
            del operation["parameters"]
        responses = operation["responses"] = dict(operation["responses"])
        common = {413, 500}
        if public:
            operation["security"] = []
        else:
            common |= {401, 429, 503, 507}
            if admin:
                common.add(403)
        body = operation.get("requestBody")
        for media in [
            *(body["content"].values() if body else ()),
            *(media for r in responses.values() for media in r["content"].values()),
        ]:
            # The models themselves are in components/schemas: refer to them.
            title = media["schema"].get("title")
            if title in components:
                media["schema"] = _ref_named(title)
        if body is not None:
            body["required"] = not getattr(func, _OPTIONAL_BODY_ATTRIBUTE, False)
            common |= {400, 422}
        for status in sorted(common):
            responses.setdefault(status, _ERROR_RESPONSE)
        for status, response in list(responses.items()):
            if response["content"]["application/json"]["schema"] == _ref(ErrorBody):
                responses[status] = {"$ref": f"#/components/responses/{_error_name(status)}"}
                continue
            response = responses[status] = dict(response, content=dict(response["content"]))
            response["description"] = response.get("description") or http.HTTPStatus(status).phrase
            response["headers"] = {REQUEST_ID: {"$ref": f"#/components/headers/{REQUEST_ID}"}}
        stream = getattr(func, _STREAM_ATTRIBUTE, None)
        if stream is not None:
            text, events, done = stream
            components.update(_schemas(*events.values()))
            responses[200]["content"]["text/event-stream"] = {
                "schema": _event_schema(text, events, done)
            }
        targets = getattr(func, _LINKS_ATTRIBUTE, {})
        if targets:
            responses[200]["links"] = {
                target: {"operationId": target, "parameters": parameters}
                for target, parameters in targets.items()
            }
        prometheus = getattr(func, _TEXT_ATTRIBUTE, None)
        if prometheus is not None:
            responses[200]["content"]["text/plain"] = {
                "schema": {"type": "string", "description": prometheus}
            }
        operation["responses"] = {str(status): responses[status] for status in sorted(responses)}


def build_document(app: Quart) -> dict[str, Any]:
    """The OpenAPI document of `app`'s routes, as plain JSON values."""
    extension = QuartSchema(
        openapi_path=None,
        info=Info(title="appliance", version=__version__, description=DESCRIPTION),
        security_schemes={
            SECURITY_SCHEME: HttpSecurityScheme(scheme="bearer", bearer_format="ak-<id>.<secret>")
        },
        security=[{SECURITY_SCHEME: []}],
        conversion_preference="msgspec",
    )
    app.config.setdefault("QUART_SCHEMA_CONVERSION_PREFERENCE", "msgspec")
    app.config.setdefault("QUART_SCHEMA_CONVERT_CASING", False)
    document = _Provider(app, extension).schema()
    components = document["components"]
    components["schemas"].update(_schemas(ErrorBody))
    components["responses"] = {_error_name(status): _error_response(status) for status in _WHY}
    components["headers"] = _HEADERS
    plain: dict[str, Any] = _tidy(msgspec.json.decode(msgspec.json.encode(document)))
    return plain


def render(document: dict[str, Any]) -> str:
    """The document as committed: pretty-printed, sorted keys, a trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def openapi_response() -> Response:
    """The running app's document (built once per app)."""
    app: Quart = current_app._get_current_object()  # type: ignore[attr-defined]
    text: bytes | None = app.extensions.get(_EXTENSION_KEY)
    if text is None:
        text = render(build_document(app)).encode()
        app.extensions[_EXTENSION_KEY] = text
    return Response(text, mimetype="application/json")
