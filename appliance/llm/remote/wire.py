"""What a remote OpenAI-compatible server sends, read defensively: response bodies, stream
chunks, server-sent events; and what this appliance makes of them (text, usage, cost).
Nothing here opens a connection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, NamedTuple

import msgspec

from appliance.llm.remote.errors import RemoteError, Scrub, malformed, message_of

# OpenAI's rule of thumb for English text; used only when the remote reports no usage.
CHARS_PER_TOKEN: Final = 4
# Chat framing per message (role, separators) and the reply's priming, as in OpenAI's
# cookbook counting for chat models.
MESSAGE_OVERHEAD_TOKENS: Final = 4
REPLY_PRIMING_TOKENS: Final = 3
FINISH_REASONS: Final = frozenset({"stop", "length", "content_filter", "tool_calls"})


class RemoteUsage(msgspec.Struct, frozen=True):
    """Tokens of one remote completion; `estimated` when the remote reported none (then
    counted as `estimate_prompt_tokens` / `estimate_completion_tokens` describe)."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class RemoteText(msgspec.Struct, frozen=True):
    """A piece of the assistant's text, as the remote streamed it."""

    text: str


class RemoteDone(msgspec.Struct, frozen=True):
    """The last item of a stream: why it ended, what it used and what that cost."""

    finish_reason: str
    usage: RemoteUsage
    cost: float


RemoteDelta = RemoteText | RemoteDone


# --- estimates ---------------------------------------------------------------------------


def estimate_prompt_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    """ceil(characters / 4) per message content, plus 4 per message and 3 for the reply."""
    return REPLY_PRIMING_TOKENS + sum(
        math.ceil(len(m["content"]) / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS for m in messages
    )


def estimate_completion_tokens(text: str, pieces: int = 0) -> int:
    """ceil(characters / 4), or the number of streamed pieces when that is more (servers
    send about one token per piece)."""
    return max(math.ceil(len(text) / CHARS_PER_TOKEN), pieces)


def finish_reason_of(value: str | None) -> str:
    """The upstream's reason when it is one of OpenAI's; anything else reads as "stop"."""
    return value if value in FINISH_REASONS else "stop"


def usage_of(
    wire: WireUsage | None, sent: Sequence[Mapping[str, str]], text: str, pieces: int
) -> RemoteUsage:
    """The remote's own count when it gave one, else the estimates (marked `estimated`)."""
    if wire is not None and (wire.prompt_tokens or wire.completion_tokens):
        return RemoteUsage(wire.prompt_tokens, wire.completion_tokens)
    return RemoteUsage(
        estimate_prompt_tokens(sent), estimate_completion_tokens(text, pieces), estimated=True
    )


# --- upstream bodies ---------------------------------------------------------------------


class WireUsage(msgspec.Struct):
    prompt_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    completion_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message = msgspec.field(default_factory=_Message)
    finish_reason: str | None = None


class Completion(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: WireUsage | None = None


class _Delta(msgspec.Struct):
    content: str | None = None


class _ChunkChoice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class Chunk(msgspec.Struct):
    choices: list[_ChunkChoice] | None = None
    usage: WireUsage | None = None
    error: Any = None


_COMPLETION: Final = msgspec.json.Decoder(Completion)
_CHUNK: Final = msgspec.json.Decoder(Chunk)


def decode_completion(raw: bytes) -> tuple[str, str | None, WireUsage | None]:
    """A non-streamed answer's text, finish reason and usage (if the remote counted)."""
    try:
        completion = _COMPLETION.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec lets bad UTF-8 through
        raise malformed("a response") from None
    if not completion.choices:
        raise malformed("a response without choices")
    choice = completion.choices[0]
    return choice.message.content or "", choice.finish_reason, completion.usage


def decode_chunk(raw: bytes, scrub: Scrub, event: str = "") -> Chunk:
    """One `data:` payload of the stream; an error in it (OpenAI puts it in the data, our
    own appliance sends `event: error`) fails the stream."""
    try:
        chunk = _CHUNK.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec lets bad UTF-8 through
        if event != "error":
            raise malformed("a stream chunk") from None
        chunk = Chunk(error=raw.decode("utf-8", "replace"))
    if chunk.error is not None or event == "error":
        raise RemoteError(
            502,
            "remote_failed",
            "the remote LLM reported an error mid-stream: "
            + (scrub(message_of(chunk.error)) or "no details given"),
        )
    return chunk


# --- server-sent events -------------------------------------------------------------------


class SSEEvent(NamedTuple):
    event: str
    data: bytes


class SSEDecoder:
    """Events from a text/event-stream body: `data:` lines of one event are joined with
    newlines and the event is dispatched at a blank line; comments, `id:` and `retry:` are
    ignored. A line or event longer than `limit` bytes is a malformed stream."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._event = ""
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buffer += chunk
        events: list[SSEEvent] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            if end - start > self._limit:  # as when the line arrives in pieces (below)
                raise malformed(f"a stream line over {self._limit} bytes")
            line = bytes(self._buffer[start:end])
            self._line(line[:-1] if line.endswith(b"\r") else line, events)
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > self._limit:
            raise malformed(f"a stream line over {self._limit} bytes")
        return events

    def close(self) -> list[SSEEvent]:
        """At the end of the body: a last line and event without their blank line count."""
        events: list[SSEEvent] = []
        if self._buffer:
            self._line(bytes(self._buffer).rstrip(b"\r"), events)
            self._buffer.clear()
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                events.append(SSEEvent(self._event, b"\n".join(self._data)))
            self._event, self._data, self._size = "", [], 0
            return
        if line.startswith(b":"):
            return
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._size += len(value)
            if self._size > self._limit:
                raise malformed(f"a stream event over {self._limit} bytes")
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
