"""Properties of the remote LLM's stream reader: a valid stream gives the same text and end
however the network cuts it, and any other bytes give `RemoteError`, never another
exception.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from itertools import pairwise
from typing import Any

import httpx
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

from appliance.llm.remote.errors import RemoteError
from appliance.llm.remote.stream import RemoteStream, Upstream
from appliance.llm.remote.wire import (
    RemoteDelta,
    RemoteDone,
    SSEDecoder,
    SSEEvent,
    decode_chunk,
    decode_completion,
)
from tests.conftest import examples

UPSTREAM = Upstream(timeout=30.0, origin="https://api.example.com", host="api.example.com",
                    price_per_1k=0.5)  # fmt: skip
SENT = [{"role": "user", "content": "hello"}]
LIMIT = 4096


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted(min(p, len(data)) for p in points), len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


def read_stream(pieces: list[bytes]) -> tuple[list[RemoteDelta], RemoteError | None]:
    """Everything a RemoteStream makes of a body that arrives as `pieces`."""
    deltas: list[RemoteDelta] = []
    failure: RemoteError | None = None

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async def main() -> None:
        nonlocal failure
        response = httpx.Response(200, content=body())
        with trio.fail_after(10):
            async with RemoteStream(UPSTREAM, response, SENT, lambda s: s, 0.0) as stream:
                try:
                    async for delta in stream:
                        deltas.append(delta)
                except RemoteError as error:
                    failure = error

    trio.run(main, clock=trio.testing.MockClock())
    return deltas, failure


def decode_events(pieces: list[bytes]) -> list[SSEEvent] | None:
    """The events of a body, or None when the decoder refuses it (as malformed)."""
    decoder = SSEDecoder(LIMIT)
    events: list[SSEEvent] = []
    try:
        for piece in pieces:
            events += decoder.feed(piece)
        events += decoder.close()
    except RemoteError as error:
        assert error.code == "remote_malformed"
        return None
    return events


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[str], str, dict[str, int] | None]:
    """A stream as OpenAI-compatible servers send it: its body, text pieces, finish reason
    and usage."""
    texts = draw(st.lists(st.text(min_size=1, max_size=20), max_size=6))
    finish = draw(st.sampled_from(["stop", "length", "content_filter", "tool_calls", "other"]))
    usage = draw(
        st.none()
        | st.fixed_dictionaries(
            {"prompt_tokens": st.integers(1, 10**6), "completion_tokens": st.integers(1, 10**6)}
        )
    )
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    events: list[str] = [": keep-alive"]
    for text in texts:
        chunk = {"choices": [{"delta": {"content": text}, "finish_reason": None}]}
        events.append("data: " + json.dumps(chunk, ensure_ascii=draw(st.booleans())))
    last: dict[str, Any] = {"choices": [{"delta": {}, "finish_reason": finish}]}
    if usage is not None:
        last["usage"] = usage
    events.append("data: " + json.dumps(last))
    if draw(st.booleans()):
        events.append("data: [DONE]")
    body = newline.join(e + newline for e in events)
    return body.encode(), texts, finish, usage


@settings(max_examples=examples(150), deadline=None)
@given(stream=streams(), points=st.lists(st.integers(0, 3000), max_size=10))
def test_a_stream_reads_the_same_however_it_is_cut(
    stream: tuple[bytes, list[str], str, dict[str, int] | None], points: list[int]
) -> None:
    body, texts, finish, usage = stream
    deltas, failure = read_stream(cut(body, points))
    assert failure is None
    *pieces, done = deltas
    assert [p.text for p in pieces if not isinstance(p, RemoteDone)] == texts
    assert isinstance(done, RemoteDone)
    assert done.finish_reason == (finish if finish != "other" else "stop")
    if usage is not None:
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        assert not done.usage.estimated
    assert deltas == read_stream([body])[0]


SSE_BYTES = st.lists(
    st.sampled_from([b"data: ", b"data:", b"event: ", b"error", b":", b"\n", b"\r", b"\r\n", b" "])
    | st.binary(max_size=8)
    | st.just(b"x" * (LIMIT + 1)),
    max_size=20,
).map(b"".join)


@settings(max_examples=examples(300), deadline=None)
@given(body=SSE_BYTES, points=st.lists(st.integers(0, 5000), max_size=8))
@example(body=b":" + b"x" * (LIMIT + 1) + b"\n", points=[LIMIT + 1])  # a long comment
def test_events_do_not_depend_on_how_the_body_is_cut(body: bytes, points: list[int]) -> None:
    whole = decode_events([body])
    chunked = decode_events(cut(body, points))
    assert (whole is None) == (chunked is None)
    if whole is not None:
        assert whole == chunked
        assert all(len(event.data) <= LIMIT for event in whole)


@settings(max_examples=examples(300), deadline=None)
@given(body=SSE_BYTES | st.binary(max_size=300), points=st.lists(st.integers(0, 500), max_size=4))
def test_any_stream_body_gives_text_or_a_remote_error(body: bytes, points: list[int]) -> None:
    deltas, failure = read_stream(cut(body, points))
    if failure is None:
        assert isinstance(deltas[-1], RemoteDone)
    else:
        assert failure.status in (502, 504)
        assert "\n" not in failure.message


JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["choices", "delta", "content", "usage", "error", "message", "x"]),
            inner,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=examples(400), deadline=None)
@given(
    raw=st.binary(max_size=100)
    | JSON.map(lambda v: json.dumps(v).encode())
    # JSON with a byte that is not UTF-8 somewhere (inside a string, often)
    | st.tuples(JSON.map(lambda v: json.dumps(v, ensure_ascii=False).encode()), st.integers()).map(
        lambda pair: (
            pair[0][: pair[1] % (len(pair[0]) + 1)]
            + b"\xff"
            + pair[0][pair[1] % (len(pair[0]) + 1) :]
        )
    ),
    event=st.sampled_from(["", "error", "message"]),
)
@example(raw=b'{"error": "\xff"}', event="")
@example(raw=b'{"choices": [{"message": {"content": "\xff"}}]}', event="")
def test_any_payload_decodes_or_gives_a_remote_error(raw: bytes, event: str) -> None:
    for decode in (lambda r: decode_chunk(r, lambda s: s, event), decode_completion):
        try:
            decode(raw)
        except RemoteError as error:
            assert error.status == 502
            assert error.code in ("remote_malformed", "remote_failed")
