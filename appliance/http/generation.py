"""What the chat and OpenAI endpoints share: model choice, limits, deadlines, errors (the
SSE framing of their streams is appliance.http.sse's)."""

from __future__ import annotations

import contextlib
import datetime
import math
from collections.abc import AsyncGenerator, Callable
from typing import Annotated, Any, Final, Literal

import msgspec
import trio

from appliance.auth.apikeys import ApiKey
from appliance.auth.budgets import MICROS, BudgetExceeded, Budgets, Kind, Reservation, key_limits
from appliance.config import InvalidKeepAlive, parse_keep_alive
from appliance.http.context import Runtime, current_key
from appliance.http.errors import ApiError
from appliance.http.remote_generation import REMOTE_PREFIX, open_remote_stream, remote_model
from appliance.llm.engine import RETRY_AFTER_SECONDS
from appliance.llm.errors import DeadlineExceeded, InferenceError, QueueFull, WorkerCrashed
from appliance.llm.handoff import Handoff
from appliance.llm.protocol import ChatMessage, Detached, Done, Sampling, Token
from appliance.llm.registry import InvalidModelName, ModelUnavailable, RegistryError, UnknownModel

# A model name quoted back in an error, at most (the name is the client's own text).
MAX_SHOWN_NAME: Final = 64
# What a remote model gets when the request names no temperature or top_p (OpenAI's).
REMOTE_TEMPERATURE: Final = 1.0
REMOTE_TOP_P: Final = 1.0


async def resolve_model(state: Runtime, requested: str | None) -> str:
    """The usable model a request names, or the default one; 404/503 otherwise. The remote
    model is `remote:<name>`; its bare name means it only when no local model has it."""
    registry = state.registry
    if requested and requested.startswith(REMOTE_PREFIX):
        return REMOTE_PREFIX + remote_model(state.remote, requested).model
    try:
        if requested:
            record = await trio.to_thread.run_sync(registry.usable, requested)
            return record.name
        name = await trio.to_thread.run_sync(
            registry.default_name, state.settings.default_model or None
        )
    except (UnknownModel, InvalidModelName) as exc:
        if state.remote is not None and requested == state.remote.model:
            return REMOTE_PREFIX + state.remote.model
        message = str(exc)
        if isinstance(exc, UnknownModel) and not _sees_all_models():
            message = f"model {_shown(requested)} is not installed; {await _usable_models(state)}"
        raise ApiError(404, "model_not_found", message, param="model") from None
    except ModelUnavailable as exc:
        message = str(exc)
        if not _sees_all_models():
            message = f"model {_shown(requested)} is unavailable; {await _usable_models(state)}"
        raise ApiError(503, "model_unavailable", message, param="model") from None
    except RegistryError as exc:
        raise ApiError(503, "model_unavailable", str(exc), param="model") from None
    if name is None:
        raise ApiError(
            503,
            "no_model",
            "no usable model is installed; import one with: appliance models import PATH",
            param="model",
        )
    return name


def _sees_all_models() -> bool:
    """Admin keys see every installed model and why one failed (as GET /api/v1/models shows
    them); a user key is told only of the models it may use."""
    return current_key().scope == "admin"


def _shown(name: str | None) -> str:
    return repr((name or "")[:MAX_SHOWN_NAME])


async def _usable_models(state: Runtime) -> str:
    records = await trio.to_thread.run_sync(state.registry.list)
    names = [record.name for record in records if record.ok]
    if state.remote is not None:
        names.append(REMOTE_PREFIX + state.remote.model)
    if not names:
        return "no model is usable now"
    return "the models this key may use: " + ", ".join(names)


def max_tokens_for(state: Runtime, requested: int | None, param: str = "max_tokens") -> int:
    settings = state.settings
    if requested is None:
        return settings.default_max_tokens
    if requested < 1:
        raise ApiError(422, "invalid_field", f"{param} must be 1 or more", param=param)
    if requested > settings.max_tokens_limit:
        raise ApiError(
            422,
            "invalid_field",
            f"{param} is {requested}; the most this appliance allows is "
            f"{settings.max_tokens_limit} (APPLIANCE_MAX_TOKENS)",
            param=param,
        )
    return requested


def keep_alive_of(value: str | float | None) -> float | None:
    """A request's `keep_alive` in seconds (None: not given); 422 naming the field."""
    if value is None:
        return None
    try:
        return parse_keep_alive(value)
    except InvalidKeepAlive as exc:
        raise ApiError(422, "invalid_field", str(exc), param="keep_alive") from None


# The request field that a worker's refusal is about.
_ERROR_PARAMS: Final = {
    "invalid_logit_bias": "logit_bias",
    "invalid_grammar": "grammar",
    "invalid_input": "input",
}


def as_api_error(exc: InferenceError, timeout: float | None = None) -> ApiError:
    """The API's error for an engine's failure; a request's deadline (`timeout` seconds,
    if given) is named with the setting that sets it."""
    retry = isinstance(exc, QueueFull | WorkerCrashed) or exc.code == "context_full"
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if retry else {}
    param = _ERROR_PARAMS.get(exc.code)
    message = str(exc)
    if isinstance(exc, DeadlineExceeded) and timeout is not None:
        message = f"{message} ({timeout:.0f} s, APPLIANCE_REQUEST_TIMEOUT)"
    return ApiError(exc.status, exc.code, message, param=param, headers=headers)


class Events:
    """The engine's events for one request, under its deadline; failures become ApiError.

    An async iterator over the engine's generator rather than another generator around
    it: one layer less on every token. Close it (`aclose`) when done with it early. The
    generation lets go of its slot as soon as its Done comes, however slowly the client
    reads the rest. With a budget reservation, the tokens used are settled when the
    generation ends (or is closed); a generation cut short by the reservation ends like
    one that reached max_tokens ("length"), and `budget_cut` says which budget cut it.
    """

    __slots__ = (
        "_budget",
        "_events",
        "_first",
        "_parts",
        "_release",
        "_seen",
        "_timeout",
        "budget_cut",
        "handoff",
    )

    def __init__(
        self,
        events: AsyncGenerator[Token | Detached | Done, None],
        timeout: float,
        budget: BudgetUse | None = None,
        release: Callable[[], None] | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        self._events = events
        self._timeout = timeout
        self._first: Token | Done | None = None
        self._budget = budget
        self._release = release
        self._seen = 0
        self.budget_cut: str | None = None
        # A streamed local generation's offer to let its worker write the token events
        # (appliance.llm.handoff): the route and the response each give their part.
        self.handoff = handoff
        # The answer's text in order, whoever wrote it to the client.
        self._parts: list[str] = []

    def __aiter__(self) -> Events:
        return self

    async def __anext__(self) -> Token | Done:
        first = self._first
        if first is not None:
            self._first = None
            return first
        while True:
            try:
                event = await self._events.__anext__()
            except InferenceError as exc:
                raise as_api_error(exc, self._timeout) from None
            if isinstance(event, Token):
                self._seen += 1
                self._parts.append(event.text)
                return event
            if not isinstance(event, Detached):
                break
            # The worker gave the stream back: what it could not write goes first.
            self._parts.append(event.written_text)
            if event.pending:
                assert self.handoff is not None and self.handoff.write_back is not None
                await self.handoff.write_back(event.pending)
        self._parts.append(event.written_text)
        # Done: the engine's generator has nothing more to give; closing it now frees the
        # slot before the client has read the end of the answer.
        await self._events.aclose()
        if self._budget is not None:
            self.budget_cut = await self._budget.finish(event)
        return event

    async def start(self) -> None:
        """Wait for the first event before a response starts, so that a full queue, an
        unknown model or a prompt too long still get their own status code (429, 404,
        400) rather than an error inside a 200 stream."""
        try:
            self._first = await self.__anext__()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.aclose()
            raise

    def __del__(self) -> None:
        # A response that never started its body (the client left first) never closes its
        # events; the key's stream slot must not stay taken.
        release = self._release
        if release is not None:
            self._release = None
            release()

    async def aclose(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
        await self._events.aclose()
        if self._budget is not None:
            written = self.handoff.worker_events if self.handoff is not None else 0
            with trio.CancelScope(shield=True):
                await self._budget.abandon(self._seen + written)

    def answer_text(self) -> str:
        """The text of the answer's token events so far (all of it once Done came)."""
        return "".join(self._parts)


class BudgetUse:
    """One request's reservation: settled once, with what the generation really used."""

    def __init__(
        self,
        budgets: Budgets,
        reservation: Reservation,
        requested: int,
        granted_tokens: int,
        spending: Reservation | None = None,
        micros_per_token: float = 0.0,
    ) -> None:
        self.budgets = budgets
        self.reservation = reservation
        self.requested = requested
        self.granted_tokens = granted_tokens
        # A remote request also holds part of the appliance's monthly spending budget.
        self.spending = spending
        self.micros_per_token = micros_per_token
        self.settled = False
        # What a cut names: the budget that granted the fewest tokens.
        self.limited_by = f"{reservation.kind} token budget of this key"

    async def finish(self, done: Done) -> str | None:
        """Charge what the generation used; why the budget cut it short, if it did."""
        await self._settle(done.prompt_tokens + done.completion_tokens)
        # Stopped for length below what the client asked for: the reservation's cap did it
        # (the model's context may have cut it first: then the budget did not).
        cut = (
            self.granted_tokens < self.requested
            and done.finish_reason == "length"
            and done.completion_tokens >= self.granted_tokens
        )
        if not cut:
            return None
        return (
            f"the {self.limited_by} ran out after {done.completion_tokens} tokens; "
            "see: GET /api/v1/usage"
        )

    async def abandon(self, tokens_seen: int) -> None:
        # Closed early: the prompt's share is not known here; charge what was reserved
        # for it plus the tokens that were sent.
        await self._settle(self.reservation.granted - self.granted_tokens + tokens_seen)

    async def _settle(self, used: int) -> None:
        if self.settled:
            return
        self.settled = True
        await self.budgets.settle(self.reservation, used)
        if self.spending is not None:
            cost = math.ceil(used * self.micros_per_token)
            await self.budgets.settle(self.spending, cost)
            await self.budgets.record_spending(self.reservation.key_id, cost)


def _prompt_estimate(messages: list[ChatMessage] | None, prompt: str | None) -> int:
    """Tokens a prompt will take, estimated high (4 characters a token, plus framing)."""
    text = prompt or ""
    if messages:
        text = "".join(message.content for message in messages)
        return len(text) // 3 + 8 * len(messages) + 8
    return len(text) // 3 + 8


async def reserve_budget(
    state: Runtime, key: ApiKey, prompt_tokens: int, max_tokens: int, kind: Kind = "local"
) -> BudgetUse:
    """Reserve prompt + max_tokens (at least prompt + 1) or refuse with 429 naming the budget;
    a remote request also reserves their price from the appliance's spending budget."""
    settings = state.settings
    limits = key_limits(
        key.tokens_per_day, key.tokens_per_month, settings.tokens_per_day, settings.tokens_per_month
    )
    budgets = state.budgets
    try:
        reservation = await budgets.reserve(
            key.id, kind, prompt_tokens + max_tokens, prompt_tokens + 1, *limits
        )
    except BudgetExceeded as exc:
        raise ApiError(429, "budget_exhausted", str(exc), headers=_reset_header(exc)) from None
    granted = reservation.granted
    per_token = settings.remote_price_per_1k * 1000  # micros per token
    if kind == "remote" and per_token > 0:
        limit = round(settings.remote_budget_monthly * MICROS) or None
        try:
            spending = await budgets.reserve_spending(
                math.ceil(granted * per_token), math.ceil((prompt_tokens + 1) * per_token), limit
            )
        except BudgetExceeded as exc:
            with trio.CancelScope(shield=True):
                await budgets.settle(reservation, 0)
            raise ApiError(429, "budget_exhausted", str(exc), headers=_reset_header(exc)) from None
        affordable = math.floor(spending.granted / per_token)
        use = BudgetUse(
            budgets,
            reservation,
            max_tokens,
            min(granted, affordable) - prompt_tokens,
            spending,
            per_token,
        )
        if affordable < granted:
            use.limited_by = (
                "monthly remote spending budget of this appliance (APPLIANCE_REMOTE_BUDGET_MONTHLY)"
            )
        return use
    return BudgetUse(budgets, reservation, max_tokens, granted - prompt_tokens)


def _open_stream(state: Runtime, key: ApiKey) -> Callable[[], None]:
    """Count a streamed generation of `key` (429 beyond APPLIANCE_MAX_STREAMS_PER_KEY); the
    returned callable ends it."""
    limit = state.settings.max_streams_per_key
    streams = state.streams
    open_now = streams.get(key.id, 0)
    if limit and open_now >= limit:
        raise ApiError(
            429,
            "too_many_streams",
            f"this key already has {open_now} streamed generations open; the limit is {limit} "
            "(APPLIANCE_MAX_STREAMS_PER_KEY): wait for one to end",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    streams[key.id] = open_now + 1

    def release() -> None:
        left = streams.get(key.id, 1) - 1
        if left > 0:
            streams[key.id] = left
        else:
            streams.pop(key.id, None)

    return release


def _reset_header(exc: BudgetExceeded) -> dict[str, str]:
    wait = max(1, int((exc.resets - datetime.datetime.now(datetime.UTC)).total_seconds()))
    return {"Retry-After": str(wait)}


async def generate(
    state: Runtime,
    model: str,
    *,
    sampling: Sampling,
    messages: list[ChatMessage] | None = None,
    prompt: str | None = None,
    stream: bool = False,
    keep_alive: float | None = None,
    remote_params: dict[str, Any] | None = None,
) -> Events:
    """The events of a local generation (engine) or of the remote LLM (`remote:` models),
    under the request deadline, the key's token budget and its stream limit. Sampling
    fields left None take the model's defaults; `keep_alive` (seconds) replaces how long
    the model stays resident once idle. `sampling.options` (grammar, logit bias,
    penalties, log probabilities) are the local model's samplers; `remote_params` are
    OpenAI fields forwarded as they are to the remote LLM."""
    remote = remote_model(state.remote, model) if model.startswith(REMOTE_PREFIX) else None
    if remote is not None and messages is None:
        raise ApiError(
            422,
            "unsupported_for_remote",
            "the remote model serves chat completions only; use POST /v1/chat/completions",
            param="model",
        )
    key = current_key()
    release = _open_stream(state, key) if stream else None
    budget: BudgetUse | None = None
    handoff: Handoff | None = None
    events: AsyncGenerator[Token | Detached | Done, None]
    try:
        if state.gate.enabled:
            estimate = _prompt_estimate(messages, prompt)
            options = sampling.options
            if options is not None and options.grammar:
                # The grammar (a schema's, a tool's) weighs on the answer's side as well.
                estimate += len(options.grammar) // 16
            if remote is None:
                # A longer conversation leaves turns out of the prompt (appliance.llm.fitting).
                estimate = min(estimate, state.settings.context_size)
            budget = await reserve_budget(
                state,
                key,
                estimate,
                sampling.max_tokens,
                "remote" if remote is not None else "local",
            )
        granted = sampling.max_tokens
        if budget is not None:
            granted = min(granted, budget.granted_tokens)
        timeout = state.settings.request_timeout
        if remote is not None:
            assert messages is not None  # refused above
            events = await open_remote_stream(
                remote,
                state.redactor,
                messages,
                max_tokens=granted,
                temperature=(
                    REMOTE_TEMPERATURE if sampling.temperature is None else sampling.temperature
                ),
                top_p=REMOTE_TOP_P if sampling.top_p is None else sampling.top_p,
                stop=sampling.stop,
                seed=sampling.seed,
                extra=remote_params,
            )
        else:
            handoff = Handoff() if stream else None
            events = state.engine.generate(
                model,
                deadline=trio.current_time() + timeout,
                sampling=msgspec.structs.replace(sampling, max_tokens=granted),
                messages=messages,
                prompt=prompt,
                owner=key.id,
                keep_alive=keep_alive,
                handoff=handoff,
            )
    except BaseException:
        if release is not None:
            release()
        if budget is not None:
            with trio.CancelScope(shield=True):
                await budget.abandon(0)
        raise
    return Events(events, timeout, budget, release, handoff)


async def collect(events: Events) -> tuple[str, Done]:
    parts: list[str] = []
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, Token):
                parts.append(event.text)
            else:
                return "".join(parts), event
    raise ApiError(503, "worker_crashed", "model worker crashed; retry")


FinishReason = Literal["stop", "length"]


def finish_reason(done: Done) -> FinishReason:
    return "length" if done.finish_reason == "length" else "stop"


class TokenUsage(msgspec.Struct):
    """Tokens of the prompt and of the answer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def token_usage(done: Done) -> TokenUsage:
    return TokenUsage(
        done.prompt_tokens, done.completion_tokens, done.prompt_tokens + done.completion_tokens
    )


TurnsLeftOut = Annotated[
    int,
    msgspec.Meta(
        ge=0,
        description="messages of the conversation (other than system ones) left out of the "
        "prompt, oldest first, so that it fits the model's context with room for the answer; "
        "a stored conversation keeps them all",
    ),
]
BudgetExhausted = Annotated[
    str,
    msgspec.Meta(
        description="present when a token budget ended the answer (finish_reason `length`): "
        "which budget ran out; only what was generated is charged",
    ),
]


# What a request may ask for as `max_tokens` (documented; the checks are max_tokens_for's,
# whose upper bound is the setting APPLIANCE_MAX_TOKENS).
MaxTokens = Annotated[
    int,
    msgspec.Meta(
        description="1 to APPLIANCE_MAX_TOKENS (4096 by default)",
        extra_json_schema={"minimum": 1},
    ),
]

# Ollama's `keep_alive` (checked by keep_alive_of: msgspec takes the string or number).
KeepAlive = Annotated[
    str | float,
    msgspec.Meta(
        description="how long the model stays resident after this request: a duration "
        "such as 5m, 1h30m, 90s or a number of seconds; 0 unloads it once idle, a negative "
        "value keeps it loaded (Ollama's semantics; default APPLIANCE_KEEP_ALIVE)",
        examples=["5m", 0, -1],
    ),
]

# OpenAI's range for `seed` (a signed 64-bit integer); llama.cpp uses its low 32 bits.
Seed = Annotated[
    int,
    msgspec.Meta(
        ge=-(2**63),
        le=2**63 - 1,
        description="a whole number from -2^63 to 2^63-1: the same seed, prompt and "
        "settings give the same answer",
    ),
]
