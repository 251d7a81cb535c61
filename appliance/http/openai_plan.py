"""What an OpenAI request asks of a generation: its messages, its grammar, its samplers.

Everything a request may get wrong is refused here by name (400, with `param`) before any
model runs: a field that cannot apply, a tool choice naming no tool, a schema feature the
grammar cannot express, a `remote:` model asked for what is not forwarded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from appliance.http.errors import ApiError
from appliance.http.openai_wire import (
    ChatCompletionRequest,
    CompletionLogprobs,
    ContentPart,
    NamedToolChoice,
    OpenAIMessage,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    SamplingFields,
    TokenLogprobOut,
    TopLogprobOut,
)
from appliance.llm.grammar import JSON_OBJECT_SCHEMA, SchemaError, schema_to_grammar
from appliance.llm.protocol import ChatMessage, SamplingOptions, TokenLogprob
from appliance.llm.tools import Call, Function, Turn, answer_schema, instructions, render

# What the model is told when the answer must be JSON (OpenAI asks callers to say so;
# a small model follows the grammar better when it is also told).
JSON_HINT: Final = "Answer with one JSON object only."
SCHEMA_HINT: Final = "Answer with one JSON object that follows this JSON schema:\n"


@dataclass
class ChatPlan:
    """A chat request, ready for `generate`."""

    messages: list[ChatMessage]
    options: SamplingOptions
    # Tools are on: the answer is in the generic tool format (appliance.llm.tools).
    tools: bool = False
    # The reply is JSON (response_format), inside the tool format or alone.
    json_reply: bool = False
    remote_params: dict[str, Any] = field(default_factory=dict)


def refuse(param: str, message: str, code: str = "unsupported_field") -> ApiError:
    return ApiError(400, code, message, param=param)


def sampling_options(
    body: SamplingFields, *, top_logprobs: int | None, grammar: str | None = None
) -> SamplingOptions:
    bias: list[tuple[int, float]] = []
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit() or len(key) > 9:
            raise refuse(
                "logit_bias",
                f"logit_bias keys are token ids (whole numbers as strings); got {key[:32]!r}",
                "invalid_field",
            )
        bias.append((int(key), value))
    return SamplingOptions(
        grammar=grammar if grammar is not None else body.grammar,
        close_json=grammar is not None,
        logit_bias=bias,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        top_logprobs=top_logprobs,
    )


def _text(message: OpenAIMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(_part_text(part, index, j) for j, part in enumerate(content))


def _part_text(part: ContentPart, index: int, position: int) -> str:
    if part.type != "text":
        raise refuse(
            f"messages[{index}].content[{position}].type",
            f"content parts of type {part.type[:32]!r} are not supported: the models here "
            "read text only; send text parts",
            "unsupported_content",
        )
    return part.text or ""


def _turns(body: ChatCompletionRequest) -> list[Turn]:
    turns: list[Turn] = []
    for index, message in enumerate(body.messages):
        for name in ("audio", "function_call"):
            if getattr(message, name) is not None:
                raise refuse(
                    f"messages[{index}].{name}",
                    f"messages[{index}].{name} is not supported; use text content"
                    + (" and tool_calls" if name == "function_call" else ""),
                )
        role = "system" if message.role == "developer" else message.role
        if role == "tool" and not message.tool_call_id:
            raise refuse(
                f"messages[{index}].tool_call_id",
                f"messages[{index}] has role tool and needs tool_call_id: the id of the call "
                "it answers",
                "invalid_field",
            )
        if message.tool_calls and role != "assistant":
            raise refuse(
                f"messages[{index}].tool_calls",
                "only assistant messages carry tool_calls",
                "invalid_field",
            )
        calls = tuple(
            Call(call.id, call.function.name, call.function.arguments)
            for call in message.tool_calls or []
        )
        turns.append(Turn(role, _text(message, index), calls, message.tool_call_id))
    return turns


def _refuse_inapplicable(body: ChatCompletionRequest) -> None:
    if body.audio is not None:
        raise refuse("audio", "audio output is not supported: the models here write text")
    if body.modalities is not None and body.modalities != ["text"]:
        raise refuse("modalities", 'modalities other than ["text"] are not supported')
    for name in ("functions", "function_call"):
        if getattr(body, name) is not None:
            raise refuse(name, f"{name} is OpenAI's older form; send tools and tool_choice")
    if body.top_logprobs is not None and not body.logprobs:
        raise refuse("top_logprobs", "top_logprobs needs logprobs: true", "invalid_field")


def _functions(body: ChatCompletionRequest) -> list[Function]:
    functions: list[Function] = []
    seen: set[str] = set()
    for index, tool in enumerate(body.tools or []):
        definition = tool.function
        if definition.name in seen:
            raise refuse(
                f"tools[{index}].function.name",
                f"two tools are named {definition.name!r}; tool names must differ",
                "invalid_field",
            )
        seen.add(definition.name)
        parameters = definition.parameters or {"type": "object", "properties": {}}
        try:
            schema_to_grammar(parameters)
        except SchemaError as exc:
            where = f".{exc.where}" if exc.where else ""
            raise refuse(
                f"tools[{index}].function.parameters{where}", f"{exc}", "unsupported_schema"
            ) from None
        functions.append(Function(definition.name, definition.description, parameters))
    return functions


def _choice(body: ChatCompletionRequest, functions: list[Function]) -> str:
    choice = body.tool_choice
    if choice is None:
        return "auto" if functions else "none"
    if not functions:
        raise refuse("tool_choice", "tool_choice needs tools", "invalid_field")
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in {f.name for f in functions}:
            raise refuse(
                "tool_choice",
                f"tool_choice names {name!r}, which is not one of the tools",
                "invalid_field",
            )
        return name
    return choice


def _response_schema(body: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema response_format asks for, or None for free text."""
    form = body.response_format
    if isinstance(form, ResponseFormatJsonObject):
        return JSON_OBJECT_SCHEMA
    if isinstance(form, ResponseFormatJsonSchema):
        return form.json_schema.schema or JSON_OBJECT_SCHEMA
    return None


def _grammar_of(schema: dict[str, Any], param: str) -> str:
    try:
        return schema_to_grammar(schema)
    except SchemaError as exc:
        where = f".{exc.where}" if exc.where else ""
        raise refuse(f"{param}{where}", str(exc), "unsupported_schema") from None


def chat_plan(body: ChatCompletionRequest, *, remote: bool) -> ChatPlan:
    """The messages and samplers of a chat request; 400 naming what cannot apply."""
    _refuse_inapplicable(body)
    turns = _turns(body)
    functions = _functions(body)
    choice = _choice(body, functions)
    schema = _response_schema(body)
    top = (body.top_logprobs or 0) if body.logprobs else None
    if body.grammar is not None and (schema is not None or choice != "none"):
        raise refuse("grammar", "grammar cannot go with response_format or tools: send one of them")
    if remote:
        return _remote_plan(body, turns, functions, top)
    if choice != "none":
        if top is not None:
            raise refuse("logprobs", "logprobs are not available together with tools")
        parallel = body.parallel_tool_calls is not False
        answer = answer_schema(functions, choice, parallel=parallel, response=schema)
        grammar = _grammar_of(answer, "tools")
        text = instructions(functions, choice, parallel=parallel)
        if schema is not None:
            text += "\nThe reply (response) follows this JSON schema: " + json.dumps(schema)
        return ChatPlan(
            render(turns, text),
            sampling_options(body, top_logprobs=None, grammar=grammar),
            tools=True,
            json_reply=schema is not None,
        )
    if schema is not None:
        grammar = _grammar_of(schema, "response_format.json_schema.schema")
        hint = JSON_HINT if schema is JSON_OBJECT_SCHEMA else SCHEMA_HINT + json.dumps(schema)
        return ChatPlan(
            render(turns, hint),
            sampling_options(body, top_logprobs=top, grammar=grammar),
            json_reply=True,
        )
    return ChatPlan(render(turns, None), sampling_options(body, top_logprobs=top))


def _remote_plan(
    body: ChatCompletionRequest, turns: list[Turn], functions: list[Function], top: int | None
) -> ChatPlan:
    """The remote LLM gets response_format, the penalties and logit_bias as they came;
    tools, logprobs and grammar are not forwarded (refused by name)."""
    for name, asked in (
        ("tools", bool(functions)),
        ("logprobs", top is not None),
        ("grammar", body.grammar is not None),
    ):
        if asked:
            raise refuse(name, f"{name} is not forwarded to the remote model; use a local model")
    if any(turn.calls or turn.role == "tool" for turn in turns):
        raise refuse("messages", "tool calls are not forwarded to the remote model")
    params: dict[str, Any] = {}
    if body.response_format is not None:
        import msgspec

        params["response_format"] = msgspec.to_builtins(body.response_format)
    for name in ("presence_penalty", "frequency_penalty", "logit_bias"):
        value = getattr(body, name)
        if value is not None:
            params[name] = value
    messages = [ChatMessage(turn.role, turn.content) for turn in turns]
    return ChatPlan(messages, SamplingOptions(), remote_params=params)


def token_logprobs(entries: list[TokenLogprob]) -> list[TokenLogprobOut]:
    """Chat's shape: each token's text, bytes and log probability, and alternatives."""
    return [
        TokenLogprobOut(
            _shown(e.token),
            e.logprob,
            list(e.token),
            [TopLogprobOut(_shown(t.token), t.logprob, list(t.token)) for t in e.top],
        )
        for e in entries
    ]


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """Completions' shape (parallel lists); `offset` is where the text starts."""
    tokens = [_shown(e.token) for e in entries]
    offsets: list[int] = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{_shown(t.token): t.logprob for t in e.top} for e in entries],
        text_offset=offsets,
    )


def _shown(token: bytes) -> str:
    return token.decode("utf-8", "replace")
