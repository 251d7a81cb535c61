"""Requests for the remote LLM: which model names mean it, and its answer as engine events.

Clients ask for the remote model as `remote:<APPLIANCE_REMOTE_LLM_MODEL>` (or by the bare
configured name, when no local model has it). Local model names cannot hold a colon, so
`remote:` is never a local model: with REMOTE_LLM_ENABLED=false such a request gets a 403
saying the feature is off, and nothing is contacted. The remote's deltas become the same
`Token`/`Done` events a local generation yields, so the chat and OpenAI endpoints serve
both alike.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Final

from appliance.http.errors import ApiError
from appliance.llm.protocol import ChatMessage, Done, Token
from appliance.llm.remote import RemoteDone, RemoteError, RemoteLLM, RemoteStream, RemoteText
from appliance.privacy.redaction import Redactor

REMOTE_PREFIX: Final = "remote:"


def remote_model(remote: RemoteLLM | None, name: str) -> RemoteLLM:
    """The remote LLM serving `name`: 403 when the feature is off, 404 for another model."""
    if remote is None:
        raise ApiError(
            403,
            "remote_llm_disabled",
            f"model {name[:140]!r} is a remote model, and the remote LLM is off on this "
            "appliance (REMOTE_LLM_ENABLED=false); use a local model (see GET /v1/models)",
            param="model",
        )
    if name not in (REMOTE_PREFIX + remote.model, remote.model):
        raise ApiError(
            404,
            "model_not_found",
            f"model {name[:140]!r} is not served here; the remote model is "
            f"{REMOTE_PREFIX + remote.model!r}",
            param="model",
        )
    return remote


def as_api_error(error: RemoteError) -> ApiError:
    return ApiError(error.status, error.code, error.message, headers=error.headers)


async def open_remote_stream(
    remote: RemoteLLM,
    redactor: Redactor,
    messages: list[ChatMessage],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: list[str] | None,
    seed: int | None,
    extra: dict[str, Any] | None = None,
) -> AsyncGenerator[Token | Done, None]:
    """The remote's answer as events, once the remote has accepted the request (a refusal
    is raised here as ApiError, before any response starts). Every message is redacted at
    PRIVACY_REDACT_AGGRESSIVENESS before it leaves the box. `extra`: OpenAI fields passed
    on as they are (response_format, penalties, logit_bias)."""
    params = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stop": stop or None,
        "seed": seed,
        **(extra or {}),
    }
    try:
        stream = await remote.stream(
            [{"role": m.role, "content": m.content} for m in messages],
            params,
            redact=lambda text: redactor.redact(text).text,
        )
    except RemoteError as error:
        raise as_api_error(error) from None
    return _events(stream)


async def _events(stream: RemoteStream) -> AsyncGenerator[Token | Done, None]:
    try:
        async for delta in stream:
            if isinstance(delta, RemoteText):
                yield Token(0, delta.text)
            elif isinstance(delta, RemoteDone):
                usage = delta.usage
                yield Done(0, delta.finish_reason, usage.prompt_tokens, usage.completion_tokens)
    except RemoteError as error:
        raise as_api_error(error) from None
    finally:
        await stream.aclose()
