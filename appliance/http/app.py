"""The Quart-Trio application: request ids, access lines, body limit, CORS, JSON errors."""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

import quart_cors
from quart import Quart, Response, current_app, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from appliance.auth.apikeys import ApiKey, KeyStore
from appliance.auth.budgets import Budgets
from appliance.auth.gate import FAILURE_WINDOW, FAILURES_ALLOWED, Gate, Refused
from appliance.backup.service import Backups
from appliance.config import Settings
from appliance.http.console import install_console
from appliance.http.errors import ApiError, register_error_handlers
from appliance.llm.engine import InferenceService
from appliance.llm.pulls import Pulls
from appliance.llm.registry import ModelRegistry
from appliance.llm.remote import RemoteLLM
from appliance.logs import request_context
from appliance.metrics import ProcessSampler, RequestStats
from appliance.privacy.keys import Keys
from appliance.privacy.redaction import Redactor
from appliance.privacy.retention import RetentionService
from appliance.search.service import WebSearch
from appliance.store.client import Store
from appliance.store.conversations import Conversations
from appliance.supervisor import Supervisor

ACCESS_LOGGER = logging.getLogger("appliance.access")
SECURITY_LOGGER = logging.getLogger("appliance.auth")

REQUEST_ID_HEADER: Final = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
# The HTTP service's own liveness probe; its requests are not access-logged.
PROBE_USER_AGENT: Final = "appliance-self-probe"


@dataclass
class Runtime:
    """What the handlers need from the daemon; owned by the daemon, shared by reference."""

    settings: Settings
    supervisor: Supervisor
    store: Store
    registry: ModelRegistry
    engine: InferenceService
    keys: Keys
    redactor: Redactor
    conversations: Conversations
    retention: RetentionService
    backups: Backups
    apikeys: KeyStore
    gate: Gate
    budgets: Budgets
    # Model downloads started through the API (POST /api/v1/models/pull).
    pulls: Pulls
    # The remote LLM client, when REMOTE_LLM_ENABLED; None means no code path can reach it.
    remote: RemoteLLM | None = None
    # The web search client, when SEARCH_ENABLED; None means no code path can search.
    search: WebSearch | None = None
    urls: list[str] = field(default_factory=list)
    # Open streamed generations per key id (APPLIANCE_MAX_STREAMS_PER_KEY).
    streams: dict[str, int] = field(default_factory=dict)
    # llama.cpp backends built in and in use (appliance.llm.backends.backend_report).
    backend: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    sampler: ProcessSampler = field(default_factory=ProcessSampler)
    requests: RequestStats = field(default_factory=RequestStats)


def runtime() -> Runtime:
    value: Runtime = current_app.extensions["appliance"]
    return value


def current_key() -> ApiKey:
    """The API key of this request (every route but live/ready has one)."""
    key: ApiKey | None = g.get("api_key")
    if key is None:
        raise ApiError(401, "invalid_api_key", "a valid API key is needed")
    return key


def current_owner() -> str:
    """Who owns what this request stores: the key's id, so a key sees only its own."""
    return current_key().id


def request_id_from(header: str | None) -> str:
    """The caller's id when it is sane (short, printable, no spaces), else a new one."""
    if header and _SANE_REQUEST_ID.fullmatch(header):
        return header
    return f"req-{uuid.uuid4().hex}"


def register_blueprints(app: Quart) -> None:
    """Every route of the API (the OpenAPI document is built from these)."""
    from appliance.http.admin import blueprint as admin
    from appliance.http.chat import blueprint as chat
    from appliance.http.embeddings import blueprint as embeddings
    from appliance.http.health import blueprint as health
    from appliance.http.keys import blueprint as keys
    from appliance.http.models import blueprint as models
    from appliance.http.openai import blueprint as openai
    from appliance.http.privacy import blueprint as privacy
    from appliance.http.usage import blueprint as usage

    for blueprint in (health, chat, models, openai, embeddings, privacy, admin, usage, keys):
        app.register_blueprint(blueprint)


def create_app(state: Runtime) -> Quart:
    app: Quart = QuartTrio("appliance")
    # `/api/v1//admin/backups` is a 404 like any unknown path, not a 308 redirect with an
    # HTML page (Werkzeug merges slashes by redirecting; routing redirects bypass the
    # JSON error handlers). Set before any rule is added: rules read it when bound.
    app.url_map.merge_slashes = False
    app.extensions["appliance"] = state
    app.config["MAX_CONTENT_LENGTH"] = state.settings.max_body_bytes
    app.config["JSON_SORT_KEYS"] = False
    # Quart cuts any response after 60 s; a long stream is bounded by our own deadline
    # (APPLIANCE_REQUEST_TIMEOUT) instead, plus time for a slow client to read the rest.
    app.config["RESPONSE_TIMEOUT"] = state.settings.request_timeout + 60
    register_blueprints(app)
    install_console(app, state.settings.console)
    register_error_handlers(app)
    _install_request_hooks(app, state)
    origins = state.settings.allowed_origins
    if origins:
        app = quart_cors.cors(
            app,
            allow_origin="*" if "*" in origins else list(origins),
            allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            expose_headers=[REQUEST_ID_HEADER],
            max_age=600,
        )
    return app


def _install_request_hooks(app: Quart, state: Runtime) -> None:
    limit = state.settings.max_body_bytes

    @app.before_request
    async def _begin() -> None:
        g.started = time.perf_counter()
        g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        request_context.set(
            {"request_id": g.request_id, "endpoint": request.path, "method": request.method}
        )
        length = request.content_length
        if length is not None and length > limit:
            raise ApiError(
                413,
                "request_too_large",
                f"request body is {length} bytes; the limit is {limit} bytes "
                "(APPLIANCE_MAX_BODY_BYTES)",
                # The body is left unread: the connection cannot carry another request.
                headers={"Connection": "close"},
            )
        try:
            g.api_key = await state.gate.check(
                request.path,
                request.method,
                request.blueprint,
                request.headers.get("Authorization"),
                request.remote_addr or "unknown",
            )
        except Refused as refused:
            if refused.limit_reached:
                client = state.keys.client_hash(request.remote_addr or "unknown")
                SECURITY_LOGGER.warning(
                    "failed-attempt limit reached: over %d requests with a wrong or missing API "
                    "key from client %s within %d s; its further ones get 429 until the window "
                    "ends (valid keys are still served)",
                    FAILURES_ALLOWED,
                    client,
                    FAILURE_WINDOW,
                    extra={"client": client},
                )
            raise ApiError(
                refused.status, refused.code, refused.message, headers=refused.headers
            ) from None

    @app.after_request
    async def _finish(response: Response) -> Response:
        if response.status_code != 413:
            # An answer given before the request's body has all arrived (a refused key, a
            # 405, an OPTIONS) leaves hypercorn's keep-alive connection stuck: the client's
            # next request on it is never answered. Take the rest of the body in first
            # (bounded by MAX_CONTENT_LENGTH; a handler that read it already costs nothing).
            try:
                await request.get_data(cache=False)
            except HTTPException:
                response.headers["Connection"] = "close"
        request_id = g.get("request_id") or request_id_from(None)
        response.headers[REQUEST_ID_HEADER] = request_id
        state.requests.record(response.status_code)
        if request.headers.get("User-Agent") != PROBE_USER_AGENT:
            started = g.get("started")
            fields = {
                "request_id": request_id,
                "endpoint": request.path,
                "method": request.method,
                "status": response.status_code,
                # Who asked, as a keyed hash: correlatable, not identifying.
                "client": state.keys.client_hash(request.remote_addr or "unknown"),
            }

            def log_access() -> None:
                duration = (time.perf_counter() - started) * 1000 if started else 0.0
                ACCESS_LOGGER.info(
                    "%s %s %d",
                    fields["method"],
                    fields["endpoint"],
                    fields["status"],
                    extra={**fields, "duration_ms": round(duration, 2)},
                )

            # A streamed body is sent after this: its line comes at its end, with its time.
            stream = g.get("stream_body")
            if stream is not None:
                stream.after_close(log_access)
            else:
                log_access()
        return response
