"""One JSON error shape for every failure (OpenAI's, so OpenAI clients can read ours)."""

from __future__ import annotations

import logging
from typing import Any

import coredis
from quart import Quart, Response, g, has_app_context, jsonify
from werkzeug.exceptions import HTTPException

from appliance.llm.registry import ModelUnavailable
from appliance.store.client import StoreUnavailable
from appliance.store.conversations import UnreadableRecord

LOGGER = logging.getLogger("appliance.http")

# HTTP status -> the `type` OpenAI clients look at.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    # An unsupported Transfer-Encoding: the client's to change.
    501: "invalid_request_error",
    503: "service_unavailable",
    507: "insufficient_storage",
}


class ApiError(Exception):
    """An error with a status, a stable code and a message that says what to do."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}


def error_body(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """`request_id` defaults to the current request's; a streamed body passes its own
    (it is sent after the request context has ended)."""
    if request_id is None and has_app_context():
        request_id = g.get("request_id")
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code,
            "request_id": request_id,
        }
    }


def error_response(
    status: int, code: str, message: str, *, param: str | None = None
) -> tuple[Response, int]:
    return jsonify(error_body(status, code, message, param)), status


_MESSAGES = {
    404: "no such endpoint; see the API list in docs/api.md",
    405: "this endpoint does not accept that method",
}


def register_error_handlers(app: Quart) -> None:
    @app.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> tuple[Response, int, dict[str, str]]:
        response, status = error_response(
            error.status, error.code, error.message, param=error.param
        )
        return response, status, error.headers

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> tuple[Response, int, dict[str, str]]:
        status = error.code or 500
        code = (error.name or "error").lower().replace(" ", "_")
        message = _MESSAGES.get(status) or error.description or error.name
        if status == 413:
            # A chunked body that grew past the limit while it was read.
            code = "request_too_large"
            message = (
                f"request body is over the limit of {app.config['MAX_CONTENT_LENGTH']} bytes "
                "(APPLIANCE_MAX_BODY_BYTES)"
            )
        response, status = error_response(status, code, message)
        # A 405 names the methods the endpoint takes (RFC 9110).
        allowed = getattr(error, "valid_methods", None)
        return response, status, {"Allow": ", ".join(sorted(allowed))} if allowed else {}

    @app.errorhandler(StoreUnavailable)
    async def _store_unavailable(error: StoreUnavailable) -> tuple[Response, int]:
        return error_response(503, "store_unavailable", "storage is unavailable; retry shortly")

    @app.errorhandler(coredis.exceptions.RedisError)
    async def _redis_error(error: coredis.exceptions.RedisError) -> tuple[Response, int]:
        text = str(error)
        if "OOM" in text:
            # maxmemory with noeviction: refuse rather than silently drop stored data.
            return error_response(
                507,
                "storage_full",
                "storage is full (APPLIANCE_REDIS_MAXMEMORY reached); nothing was written. "
                "Delete old conversations or raise the limit",
            )
        if "MISCONF" in text:
            # Redis could not append to its files (a full disk): it refuses writes until
            # it can again, and takes them again by itself once space is back.
            LOGGER.warning("Redis refuses writes: it cannot write to the state dir")
            return error_response(
                507,
                "storage_full",
                "storage is full: Redis cannot write to the state directory (no space left "
                "on its disk), so writes are refused. Free space there (old backups, logs); "
                "writes are accepted again once there is room, without a restart",
            )
        LOGGER.warning("Redis error while serving a request: %s", type(error).__name__)
        return error_response(503, "store_unavailable", "storage is unavailable; retry shortly")

    @app.errorhandler(ModelUnavailable)
    async def _model_unavailable(error: ModelUnavailable) -> tuple[Response, int]:
        # The model was usable when the request chose it and failed before it ran.
        return error_response(503, "model_unavailable", str(error), param="model")

    @app.errorhandler(UnreadableRecord)
    async def _unreadable(error: UnreadableRecord) -> tuple[Response, int]:
        # Tampered or moved ciphertext: say so, return nothing of it.
        LOGGER.error("a stored record failed to open: %s", error)
        return error_response(
            500,
            "record_unreadable",
            "a stored record failed authentication (altered, moved or sealed with an unknown "
            "key); nothing of it was returned",
        )

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> tuple[Response, int]:
        # The trace goes to the log with the request id; the client gets no internals.
        LOGGER.exception("unhandled error while serving a request")
        return error_response(
            500, "internal_error", "internal error; the log has details under this request id"
        )
