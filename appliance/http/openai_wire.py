"""The bodies of the OpenAI-compatible API, as OpenAI defines them.

Requests are strict: a field that is not here is a 400 naming it. Fields that OpenAI
defines but that cannot apply here (`n` > 1, `audio`, `modalities`, image and audio
content parts, `echo`, `best_of`, `suffix`) are declared so that the handler refuses them
by name. `user`, `metadata`, `store` and `service_tier` are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from appliance.http.generation import (
    BudgetExhausted,
    KeepAlive,
    MaxTokens,
    Seed,
    TokenUsage,
    TurnsLeftOut,
)

MAX_STOP: Final = 4
MAX_TOP_LOGPROBS: Final = 20
MAX_TOOLS: Final = 128

_Stop = Annotated[str, msgspec.Meta(extra_json_schema={"minLength": 1})]
_Penalty = Annotated[
    float,
    msgspec.Meta(ge=-2, le=2, description="-2 to 2; llama.cpp's penalty sampler applies it"),
]
_Ignored = msgspec.Meta(description="accepted for compatibility and ignored")
FunctionName = Annotated[str, msgspec.Meta(pattern="^[a-zA-Z0-9_-]{1,64}$")]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool | None = None


class ImageUrl(msgspec.Struct):
    url: str = ""


class ContentPart(msgspec.Struct, forbid_unknown_fields=True):
    """A part of a message's content; only `text` parts are taken (others: 400)."""

    type: Annotated[str, msgspec.Meta(extra_json_schema={"enum": ["text"]})]
    text: str | None = None
    # Declared only to be refused by name: this appliance serves text models.
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class FunctionCall(msgspec.Struct, forbid_unknown_fields=True):
    name: FunctionName
    arguments: str


class ToolCall(msgspec.Struct, forbid_unknown_fields=True):
    """A call the model made (in the history, or in an answer)."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class OpenAIMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # Assistant turns: the calls it made. Tool turns: which call this is the result of.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: Annotated[str | None, _Ignored] = None
    annotations: Annotated[list[Any] | None, _Ignored] = None
    # Must be null (text models only).
    audio: Any = None
    function_call: Any = None


class FunctionDefinition(msgspec.Struct, forbid_unknown_fields=True):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: FunctionName


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    description: str | None = None
    # The answer's JSON schema (absent: any JSON object).
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormatText(msgspec.Struct, tag_field="type", tag="text", forbid_unknown_fields=True):
    pass


class ResponseFormatJsonObject(
    msgspec.Struct, tag_field="type", tag="json_object", forbid_unknown_fields=True
):
    pass


class ResponseFormatJsonSchema(
    msgspec.Struct, tag_field="type", tag="json_schema", forbid_unknown_fields=True
):
    json_schema: JsonSchemaFormat


ResponseFormat = ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema


class SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    stop: (
        _Stop
        | Annotated[
            list[_Stop], msgspec.Meta(extra_json_schema={"minItems": 1, "maxItems": MAX_STOP})
        ]
        | None
    ) = None
    seed: Seed | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1, description="1 only")] | None = None
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]],
            msgspec.Meta(
                description="token id (as a string) -> bias from -100 to 100; -100 bans the "
                "token. Token ids are the model's own",
                extra_json_schema={"maxProperties": 1024},
            ),
        ]
        | None
    ) = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    # How long the model stays resident once idle (Ollama's keep_alive; docs/models.md).
    keep_alive: KeepAlive | None = None
    grammar: (
        Annotated[
            str,
            msgspec.Meta(
                max_length=256 * 1024,
                description="an extension, as llama.cpp's server has it: a GBNF grammar "
                "(with a rule named root) that the answer follows",
            ),
        ]
        | None
    ) = None
    user: Annotated[str | None, _Ignored] = None
    metadata: Annotated[dict[str, str] | None, _Ignored] = None
    store: Annotated[bool | None, _Ignored] = None
    service_tier: Annotated[str | None, _Ignored] = None


class ChatCompletionRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    """OpenAI's chat completion request (`n` must be 1; text content only)."""

    messages: Annotated[list[OpenAIMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Declared only to be refused by name.
    audio: Any = None
    modalities: list[str] | None = None
    functions: Any = None
    function_call: Any = None


class CompletionRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    """OpenAI's completion request, for one prompt."""

    prompt: (
        str | Annotated[list[str], msgspec.Meta(extra_json_schema={"minItems": 1, "maxItems": 1})]
    )
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # Declared only to be refused by name (unless they ask for nothing).
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


# -- answers --------------------------------------------------------------------------


class TopLogprobOut(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprobOut]


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


ChatFinishReason = Literal["stop", "length", "tool_calls"]
FinishReason = Literal["stop", "length"]


class ChatCompletionMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET
    refusal: None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatCompletionMessage
    finish_reason: ChatFinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(msgspec.Struct):
    """OpenAI's chat completion, and (only when they apply) two fields of the appliance's:
    `turns_left_out` and `budget_exhausted`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: TokenUsage
    turns_left_out: TurnsLeftOut | msgspec.UnsetType = msgspec.UNSET
    budget_exhausted: BudgetExhausted | msgspec.UnsetType = msgspec.UNSET


class FunctionDelta(msgspec.Struct):
    name: str | msgspec.UnsetType = msgspec.UNSET
    arguments: str = ""


class ToolCallDelta(msgspec.Struct):
    """A piece of a streamed call: its id, type and name first, then its arguments."""

    index: int
    function: FunctionDelta
    id: str | msgspec.UnsetType = msgspec.UNSET
    type: Literal["function"] | msgspec.UnsetType = msgspec.UNSET


class ChunkDelta(msgspec.Struct):
    role: Literal["assistant"] | msgspec.UnsetType = msgspec.UNSET
    content: str | msgspec.UnsetType = msgspec.UNSET
    tool_calls: list[ToolCallDelta] | msgspec.UnsetType = msgspec.UNSET


class ChunkChoice(msgspec.Struct):
    index: int
    delta: ChunkDelta
    finish_reason: ChatFinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct):
    """One SSE `data:` line of a streamed chat completion (`[DONE]` ends the stream)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    # Only in the last chunk, with `stream_options: {"include_usage": true}`.
    usage: TokenUsage | msgspec.UnsetType = msgspec.UNSET
    # Only in the chunk with the finish_reason, and only when they apply.
    turns_left_out: TurnsLeftOut | msgspec.UnsetType = msgspec.UNSET
    budget_exhausted: BudgetExhausted | msgspec.UnsetType = msgspec.UNSET


class TextChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class TextCompletion(msgspec.Struct):
    """OpenAI's text completion; streamed, each SSE `data:` line is one (the last, with
    `stream_options: {"include_usage": true}`, has no choices and the usage; `[DONE]` ends
    the stream). `budget_exhausted` only when a budget cut the answer."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: TokenUsage | msgspec.UnsetType = msgspec.UNSET
    budget_exhausted: BudgetExhausted | msgspec.UnsetType = msgspec.UNSET


Capability = Literal["chat", "completions", "embeddings", "tools", "structured_output"]


class OpenAIModel(msgspec.Struct):
    """A model in OpenAI's shape; `capabilities` says what it serves here."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: Literal["appliance", "remote"]
    capabilities: list[Capability]


class ModelList(msgspec.Struct):
    """The usable models (local, and the remote one when it is on)."""

    object: Literal["list"]
    data: list[OpenAIModel]
