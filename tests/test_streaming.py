"""The token path's building blocks: SSE templates and worker frame buffering."""

from __future__ import annotations

from typing import Any, Final

import pytest

from appliance.http.sse import SseTemplate, sse
from appliance.llm.protocol import (
    MAX_FRAME_BYTES,
    Done,
    FrameBuffer,
    FromWorker,
    ProtocolError,
    Token,
    decode_from_worker,
    encode_frame,
)

TEXTS: Final = ["", " the", 'say "hi"', "back\\slash", "line\n\ttab", "\x00\x1f", "é日本🙂"]


def _completion(text: str) -> dict[str, Any]:
    return {
        "id": "cmpl-0123",
        "object": "text_completion",
        "created": 1700000000,
        "model": "gemma",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}],
    }


@pytest.mark.parametrize("text", TEXTS)
def test_a_template_writes_the_same_bytes_as_sse(text: str) -> None:
    assert SseTemplate(_completion)(text) == sse(_completion(text))
    token = SseTemplate(lambda t: {"text": t}, event="token")
    assert token(text) == sse({"text": text}, event="token")


def test_a_template_needs_the_text_exactly_once() -> None:
    with pytest.raises(ValueError, match="exactly once"):
        SseTemplate(lambda text: {"a": "constant"})
    with pytest.raises(ValueError, match="exactly once"):
        SseTemplate(lambda text: {"a": text, "b": text})


def test_frames_come_out_whole_however_the_bytes_arrive() -> None:
    messages: list[FromWorker] = [
        Token(1, "a"),
        Token(1, "bc" * 100),
        Done(1, "length", 3, 2),
        Token(2, ""),
    ]
    data = b"".join(encode_frame(m) for m in messages)
    for step in (1, 3, 7, len(data)):
        frames = FrameBuffer()
        received = []
        for start in range(0, len(data), step):
            frames.push(data[start : start + step])
            while (body := frames.pop()) is not None:
                received.append(decode_from_worker(body))
        assert received == messages
        assert frames.pop() is None


def test_an_oversized_frame_length_is_a_protocol_error() -> None:
    frames = FrameBuffer()
    frames.push((MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"x")
    with pytest.raises(ProtocolError, match="exceeds"):
        frames.pop()
