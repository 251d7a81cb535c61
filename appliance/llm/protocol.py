"""The supervisor <-> inference worker protocol: length-prefixed msgpack frames.

Each frame is a 4-byte big-endian length followed by one msgspec-encoded, tagged Struct.
The supervisor sends Load, Generate, Embed, Attach and Cancel; the worker answers Loaded,
Token, Attached, Detached, Done, Embedded and Error. Requests are matched by `id`.

An Attach frame comes with a descriptor (SCM_RIGHTS): the client's connection of a
streamed answer, on which the worker then writes the token events itself
(appliance.llm.direct_writes).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final, TypeVar

import msgspec

MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
T = TypeVar("T")
_LENGTH = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame; the connection is unusable."""


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class Load(msgspec.Struct, frozen=True, tag="load"):
    id: int
    model: str
    path: str
    n_ctx: int
    n_threads: int
    n_gpu_layers: int = 0
    # Generations the worker runs at once (continuous batching).
    parallel: int = 1


class SamplingOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What OpenAI's sampling fields ask of a generation, beyond temperature and top_p."""

    # A GBNF grammar the answer must follow (structured output, tool calls, `grammar`).
    grammar: str | None = None
    # The answer is JSON under `grammar`: cut by max_tokens, it is closed (the fewest
    # tokens the grammar allows) so that it still parses.
    close_json: bool = False
    # (token id, bias) pairs; a bias of -100 bans the token.
    logit_bias: list[tuple[int, float]] = []
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: no log probabilities; else each token's, with this many alternatives (0-20).
    top_logprobs: int | None = None


class Sampling(msgspec.Struct, frozen=True, kw_only=True):
    """What a request asks of a generation's sampling, from the API to the engine. Fields
    left None take the model's defaults (its manifest), then the appliance's."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    # Grammar, logit bias, penalties, log probabilities (the local model's samplers).
    options: SamplingOptions | None = None


class Generate(msgspec.Struct, frozen=True, tag="generate"):
    """One generation; `messages` are rendered with the model's chat template, else `prompt`."""

    id: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str] = []
    seed: int | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # The rest of the sampler chain (a model's defaults may set them; 0 / 1.0 is off).
    # `presence_penalty` here is the one that applies (the request's, else the model's);
    # the one in `options` is what the request said.
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    options: SamplingOptions | None = None


class Embed(msgspec.Struct, frozen=True, tag="embed"):
    """Embeddings of several inputs: texts, or token id lists (one of the two)."""

    id: int
    texts: list[str] = []
    tokens: list[list[int]] = []


class Cancel(msgspec.Struct, frozen=True, tag="cancel"):
    id: int


class Attach(msgspec.Struct, frozen=True, tag="attach"):
    """Write this generation's token events to the connection sent with this frame, from
    its token event number `written` on (the supervisor wrote those before it), each as
    `head` + the event's text as a JSON string + `tail`, in HTTP/1.1 chunked framing;
    answer Attached, then send no Token frames until Detached."""

    id: int
    written: int
    head: bytes
    tail: bytes


class Loaded(msgspec.Struct, frozen=True, tag="loaded"):
    id: int
    model: str
    n_ctx: int
    chat_template: bool
    load_seconds: float


class TopLogprob(msgspec.Struct, frozen=True, array_like=True):
    token: bytes
    logprob: float


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One generated token's bytes and log probability, and the likeliest alternatives."""

    token: bytes
    logprob: float
    top: list[TopLogprob] = []


class Token(msgspec.Struct, frozen=True, tag="token", omit_defaults=True):
    id: int
    text: str
    # The tokens that made `text`, when log probabilities were asked for.
    logprobs: list[TokenLogprob] = []


class Attached(msgspec.Struct, frozen=True, tag="attached"):
    """The worker writes the token events from here on, those of every Token frame sent
    before this one included."""

    id: int


class Detached(msgspec.Struct, frozen=True, tag="detached"):
    """The worker stopped writing (the connection would have blocked, or failed): `pending`
    is framed bytes it could not write, for the supervisor to write first; Token frames
    follow for later token events."""

    id: int
    pending: bytes = b""
    # The text of the token events the worker wrote or gave back, and how many.
    written_text: str = ""
    written_events: int = 0


class Done(msgspec.Struct, frozen=True, tag="done"):
    id: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens taken from a slot's cache (an earlier turn) rather than evaluated.
    cached_tokens: int = 0
    # Turns of the conversation left out of the prompt to fit the context.
    left_out: int = 0
    # The text of the token events the worker wrote to the connection itself, and how
    # many there were (the supervisor had no Token frames for them).
    written_text: str = ""
    written_events: int = 0


class Embedded(msgspec.Struct, frozen=True, tag="embedded"):
    """The vectors of inputs `first` to `first + count - 1` of an Embed, as little-endian
    float32 (`count * dims` of them); `last` on the final part."""

    id: int
    first: int
    count: int
    dims: int
    vectors: bytes
    tokens: int
    last: bool


class Error(msgspec.Struct, frozen=True, tag="error"):
    """`code` is stable for programs; `message` is safe to show to a client."""

    id: int
    code: str
    message: str


ToWorker = Load | Generate | Embed | Cancel | Attach
FromWorker = Loaded | Token | Attached | Detached | Done | Embedded | Error

_ENCODER = msgspec.msgpack.Encoder()
_TO_WORKER: msgspec.msgpack.Decoder[ToWorker] = msgspec.msgpack.Decoder(ToWorker)
_FROM_WORKER: msgspec.msgpack.Decoder[FromWorker] = msgspec.msgpack.Decoder(FromWorker)


def encode_frame(message: ToWorker | FromWorker) -> bytes:
    body = _ENCODER.encode(message)
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _LENGTH.pack(len(body)) + body


class FrameBuffer:
    """Accumulates bytes from a stream and gives back complete frames' bodies."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def push(self, data: bytes) -> None:
        self._buffer += data

    def pop(self) -> bytes | None:
        """The next complete frame's body, or None until more bytes are pushed."""
        buffer = self._buffer
        if len(buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(buffer)
        if length > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame length {length} exceeds {MAX_FRAME_BYTES}")
        end = _LENGTH.size + length
        if len(buffer) < end:
            return None
        body = bytes(buffer[_LENGTH.size : end])
        del buffer[:end]
        return body

    def feed(self, data: bytes) -> Iterator[bytes]:
        self.push(data)
        while (body := self.pop()) is not None:
            yield body


def _decode(decoder: msgspec.msgpack.Decoder[T], body: bytes) -> T:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"invalid frame: {exc}") from None
    except UnicodeDecodeError:  # msgspec lets a string that is not UTF-8 through as this
        raise ProtocolError("invalid frame: a string is not UTF-8") from None


def decode_to_worker(body: bytes) -> ToWorker:
    return _decode(_TO_WORKER, body)


def decode_from_worker(body: bytes) -> FromWorker:
    return _decode(_FROM_WORKER, body)
