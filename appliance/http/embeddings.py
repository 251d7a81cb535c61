"""POST /v1/embeddings: OpenAI's embeddings, made by a local model's worker.

Every local model embeds (appliance.llm.embedding: the GGUF's pooling, else the mean of
its tokens); vectors are normalized to length 1, as OpenAI's are. Inputs are texts or
token id lists; the answer is floats or, with `encoding_format: "base64"`, each vector's
little-endian float32 bytes in base64. Tokens count against the key's token budget.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Final, Literal

import msgspec
import numpy as np
import trio
from quart import Blueprint, Response

from appliance.http.bodies import parse_body
from appliance.http.context import current_key, runtime
from appliance.http.errors import ApiError
from appliance.http.generation import as_api_error, reserve_budget, resolve_model
from appliance.http.openai import strict_errors
from appliance.http.openapi_doc import document_request, document_response, errors
from appliance.http.remote_generation import REMOTE_PREFIX
from appliance.http.responses import json_response
from appliance.llm.errors import InferenceError

blueprint = Blueprint("embeddings", __name__, url_prefix="/v1")
strict_errors(blueprint)

MAX_INPUTS: Final = 2048
# All inputs' text together, at most (the worker's frames and the box's memory).
MAX_INPUT_CHARS: Final = 2_000_000


class EmbeddingRequest(msgspec.Struct, forbid_unknown_fields=True):
    """OpenAI's embeddings request: `input` is a string, a list of strings, a token id
    list or a list of token id lists (at most 2048 inputs)."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] | None = None
    # Declared only to be refused by name (vectors have the model's own size).
    dimensions: int | None = None
    user: Annotated[str | None, msgspec.Meta(description="accepted and ignored")] = None


class Embedding(msgspec.Struct):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    """One vector an input, in the inputs' order."""

    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def _inputs(raw: str | list[Any]) -> tuple[list[str], list[list[int]]]:
    """The texts, or the token id lists, of a request; 400 naming a wrong input."""
    if isinstance(raw, str):
        return [raw], []
    if not raw:
        raise _bad("input is an empty list; send at least one input")
    if len(raw) > MAX_INPUTS:
        raise _bad(f"input has {len(raw)} items; at most {MAX_INPUTS} are taken a request")
    if all(isinstance(item, str) for item in raw):
        if sum(map(len, raw)) > MAX_INPUT_CHARS:
            raise _bad(f"the inputs are over {MAX_INPUT_CHARS} characters; send fewer")
        return list(raw), []
    if all(_token_id(item) for item in raw):
        return [], [list(raw)]
    lists: list[list[int]] = []
    for index, item in enumerate(raw):
        if not isinstance(item, list) or not all(_token_id(t) for t in item):
            raise _bad(
                f"input[{index}] is neither a string nor a list of token ids; input takes a "
                "string, a list of strings, a list of token ids or a list of such lists",
                f"input[{index}]",
            )
        lists.append(item)
    if sum(map(len, lists)) > MAX_INPUT_CHARS:
        raise _bad(f"the inputs are over {MAX_INPUT_CHARS} tokens; send fewer")
    return [], lists


def _token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


def _bad(message: str, param: str = "input") -> ApiError:
    return ApiError(400, "invalid_field", message, param=param)


@blueprint.post("/embeddings")
@document_request(EmbeddingRequest)
@document_response(EmbeddingList)
@errors(400, 404, 429)
async def embeddings() -> Response:
    """OpenAI's embeddings, by a local model (`dimensions` is refused: a vector has the
    model's size). 400 for an input too long for the model or a token id it does not
    have; 404 for an unknown model; 429 when the key's token budget is spent."""
    state = runtime()
    body = await parse_body(EmbeddingRequest)
    if body.dimensions is not None:
        raise ApiError(
            400,
            "unsupported_field",
            "dimensions is not supported: vectors have the model's own size; leave it out",
            param="dimensions",
        )
    texts, tokens = _inputs(body.input)
    model = await resolve_model(state, body.model)
    if model.startswith(REMOTE_PREFIX):
        raise ApiError(
            400,
            "unsupported_for_remote",
            "embeddings are made by local models only; name one (see GET /v1/models)",
            param="model",
        )
    key = current_key()
    budget = None
    if state.gate.enabled:
        estimate = sum(len(t) for t in texts) // 3 + sum(map(len, tokens)) + len(texts) + 1
        budget = await reserve_budget(state, key, estimate, 1)
    used = 0
    try:
        timeout = state.settings.request_timeout
        try:
            parts = await state.engine.embed(
                model,
                deadline=trio.current_time() + timeout,
                texts=texts,
                tokens=tokens,
                owner=key.id,
            )
        except InferenceError as exc:
            raise as_api_error(exc, timeout) from None
        used = sum(part.tokens for part in parts)
    finally:
        if budget is not None:
            with trio.CancelScope(shield=True):
                await budget.budgets.settle(budget.reservation, used)
    data: list[Embedding] = []
    as_base64 = body.encoding_format == "base64"
    for part in parts:
        vectors = np.frombuffer(part.vectors, dtype="<f4").reshape(part.count, part.dims)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = (vectors / np.where(norms > 0, norms, 1)).astype("<f4")
        for offset, vector in enumerate(vectors):
            value: list[float] | str = (
                base64.b64encode(vector.tobytes()).decode("ascii") if as_base64 else vector.tolist()
            )
            data.append(Embedding("embedding", part.first + offset, value))
    answer = EmbeddingList("list", data, model, EmbeddingUsage(used, used))
    return json_response(answer)
