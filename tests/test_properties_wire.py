"""Properties of the supervisor <-> worker frames: every message round-trips however the
stream is cut, and any other bytes give `ProtocolError` (or wait for more), never another
exception and never a hang; the supervisor's socket reader turns a bad frame into a
restart of the worker.
"""

from __future__ import annotations

import socket
import struct
from itertools import pairwise
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.llm.errors import WorkerCrashed
from appliance.llm.protocol import (
    MAX_FRAME_BYTES,
    Attach,
    Attached,
    Cancel,
    ChatMessage,
    Detached,
    Done,
    Error,
    FrameBuffer,
    FromWorker,
    Generate,
    Load,
    Loaded,
    ProtocolError,
    Token,
    ToWorker,
    decode_from_worker,
    decode_to_worker,
    encode_frame,
)
from appliance.llm.worker_link import WorkerLink
from tests.conftest import examples

LENGTH = struct.Struct(">I")
# msgpack carries integers from -2**63 to 2**64 - 1.
INTS = st.integers(-(2**63), 2**64 - 1)
TEXT = st.text(max_size=40)
FLOATS = st.floats(allow_nan=False)

TO_WORKER: st.SearchStrategy[ToWorker] = st.one_of(
    st.builds(
        Load,
        id=INTS,
        model=TEXT,
        path=TEXT,
        n_ctx=INTS,
        n_threads=INTS,
        n_gpu_layers=INTS,
        parallel=INTS,
    ),
    st.builds(
        Generate,
        id=INTS,
        max_tokens=INTS,
        temperature=FLOATS,
        top_p=FLOATS,
        stop=st.lists(TEXT, max_size=4),
        seed=st.none() | INTS,
        prompt=st.none() | TEXT,
        messages=st.none() | st.lists(st.builds(ChatMessage, role=TEXT, content=TEXT), max_size=4),
    ),
    st.builds(Cancel, id=INTS),
    st.builds(
        Attach, id=INTS, written=INTS, head=st.binary(max_size=40), tail=st.binary(max_size=40)
    ),
)
FROM_WORKER: st.SearchStrategy[FromWorker] = st.one_of(
    st.builds(
        Loaded, id=INTS, model=TEXT, n_ctx=INTS, chat_template=st.booleans(), load_seconds=FLOATS
    ),
    st.builds(Token, id=INTS, text=TEXT),
    st.builds(Attached, id=INTS),
    st.builds(
        Detached,
        id=INTS,
        pending=st.binary(max_size=40),
        written_text=TEXT,
        written_events=INTS,
    ),
    st.builds(
        Done,
        id=INTS,
        finish_reason=TEXT,
        prompt_tokens=INTS,
        completion_tokens=INTS,
        cached_tokens=INTS,
        written_text=TEXT,
        written_events=INTS,
    ),
    st.builds(Error, id=INTS, code=TEXT, message=TEXT),
)
TAGS = [
    "load",
    "generate",
    "cancel",
    "attach",
    "loaded",
    "token",
    "attached",
    "detached",
    "done",
    "error",
    "",
    "x",
]
# Any msgpack value, for frames that are well-formed msgpack but not a message.
VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | INTS
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.sampled_from(TAGS),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10) | st.sampled_from(["type", "id", "text"]), inner)
    ),
    max_leaves=12,
)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """`data` split at `points` (any positions, repeats allowed)."""
    edges = [0, *sorted(min(p, len(data)) for p in points), len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


def bodies(pieces: list[bytes]) -> list[bytes]:
    frames = FrameBuffer()
    return [body for piece in pieces for body in frames.feed(piece)]


def decode_either(body: bytes) -> None:
    """A body decodes to a message of its direction or raises ProtocolError: nothing else."""
    for decode in (decode_to_worker, decode_from_worker):
        try:
            decode(body)
        except ProtocolError as error:
            assert str(error).startswith("invalid frame")


@settings(max_examples=examples(300), deadline=None)
@given(
    to_worker=st.lists(TO_WORKER, max_size=5),
    from_worker=st.lists(FROM_WORKER, max_size=5),
    points=st.lists(st.integers(0, 2000), max_size=8),
)
def test_messages_round_trip_however_the_stream_is_cut(
    to_worker: list[ToWorker], from_worker: list[FromWorker], points: list[int]
) -> None:
    stream = b"".join(encode_frame(m) for m in to_worker)
    assert [decode_to_worker(b) for b in bodies(cut(stream, points))] == to_worker
    stream = b"".join(encode_frame(m) for m in from_worker)
    assert [decode_from_worker(b) for b in bodies(cut(stream, points))] == from_worker


@settings(max_examples=examples(200), deadline=None)
@given(to_worker=TO_WORKER, from_worker=FROM_WORKER)
def test_a_message_is_never_taken_for_one_of_the_other_direction(
    to_worker: ToWorker, from_worker: FromWorker
) -> None:
    with pytest.raises(ProtocolError):
        decode_from_worker(encode_frame(to_worker)[LENGTH.size :])
    with pytest.raises(ProtocolError):
        decode_to_worker(encode_frame(from_worker)[LENGTH.size :])


@settings(max_examples=examples(400), deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=200),
        VALUES.map(msgspec.msgpack.encode),
        # A message with a string field's bytes made invalid UTF-8.
        st.builds(Token, id=INTS, text=st.text(min_size=1, max_size=8))
        .map(msgspec.msgpack.encode)
        .flatmap(lambda raw: st.integers(0, len(raw) - 1).map(lambda i: (raw, i)))
        .map(lambda pair: pair[0][: pair[1]] + b"\xff" + pair[0][pair[1] + 1 :]),
    )
)
def test_any_body_is_a_message_or_a_protocol_error(body: bytes) -> None:
    decode_either(body)


@settings(max_examples=examples(300), deadline=None)
@given(
    messages=st.lists(st.one_of(TO_WORKER, FROM_WORKER), min_size=1, max_size=4),
    damage=st.lists(
        st.tuples(st.sampled_from(["flip", "truncate", "insert", "delete"]), st.integers(0, 4000)),
        min_size=1,
        max_size=3,
    ),
    points=st.lists(st.integers(0, 4000), max_size=6),
)
def test_damaged_streams_fail_cleanly_and_never_hang(
    messages: list[ToWorker | FromWorker], damage: list[tuple[str, int]], points: list[int]
) -> None:
    data = bytearray(b"".join(encode_frame(m) for m in messages))
    for kind, at in damage:
        at %= len(data) + 1
        if kind == "flip" and at < len(data):
            data[at] ^= 0x5A
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = b"\xff\x00\x7f"
        elif kind == "delete":
            del data[at : at + 3]
    frames = FrameBuffer()
    try:
        for piece in cut(bytes(data), points):
            for body in frames.feed(piece):  # a loop per whole frame: it ends
                decode_either(body)
        # What is left is less than one frame: the reader waits for more rather than spin.
        assert frames.pop() is None
    except ProtocolError as error:
        assert "exceeds" in str(error)


@settings(max_examples=examples(100), deadline=None)
@given(length=st.integers(MAX_FRAME_BYTES + 1, 2**32 - 1), tail=st.binary(max_size=16))
def test_an_oversized_length_is_refused_before_its_body_arrives(length: int, tail: bytes) -> None:
    frames = FrameBuffer()
    frames.push(LENGTH.pack(length) + tail)
    with pytest.raises(ProtocolError, match=f"frame length {length} exceeds"):
        frames.pop()


@settings(max_examples=examples(100), deadline=None)
@given(message=st.one_of(TO_WORKER, FROM_WORKER), keep=st.integers(0, 10_000))
def test_a_truncated_frame_waits_for_the_rest(message: ToWorker | FromWorker, keep: int) -> None:
    frame = encode_frame(message)
    keep %= len(frame)
    frames = FrameBuffer()
    assert list(frames.feed(frame[:keep])) == []
    assert list(frames.feed(frame[keep:])) == [frame[LENGTH.size :]]


# --- the supervisor's reader on a real socket pair -------------------------------------------


BAD_UTF8 = msgspec.msgpack.encode(Token(7, "a")).replace(b"\xa1a", b"\xa1\xff")
NOT_FRAMES = [
    LENGTH.pack(3) + b"\xc1\xc1\xc1",
    LENGTH.pack(MAX_FRAME_BYTES + 1),
    LENGTH.pack(len(BAD_UTF8)) + BAD_UTF8,
]
SHORT_TAILS = [b"", b"\x00\x00", LENGTH.pack(10) + b"\x83"]


def _read_all(pieces: list[bytes]) -> tuple[list[FromWorker], BaseException | None, int]:
    """Send `pieces` from the worker's end, then close it; what the supervisor reads."""
    supervisor_end, worker_end = socket.socketpair()
    invalid: list[int] = []
    received: list[FromWorker] = []
    failure: BaseException | None = None

    async def main() -> None:
        nonlocal failure
        link = WorkerLink(supervisor_end, lambda: invalid.append(1))
        pending = link.open(7)
        for piece in pieces:
            worker_end.sendall(piece)
        worker_end.close()
        with trio.fail_after(30):
            try:
                while True:
                    received.append(await link.receive(7, pending))
            except WorkerCrashed as error:
                failure = error
        await link.aclose()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return received, failure, len(invalid)


@settings(max_examples=examples(40), deadline=None)
@given(
    messages=st.lists(FROM_WORKER.map(lambda m: msgspec.structs.replace(m, id=7)), max_size=6),
    points=st.lists(st.integers(0, 4000), max_size=6),
    garbage=st.sampled_from([*NOT_FRAMES, *SHORT_TAILS]),
)
def test_the_supervisor_reads_frames_from_any_cut_and_stops_at_a_bad_one(
    messages: list[FromWorker], points: list[int], garbage: bytes
) -> None:
    stream = b"".join(encode_frame(m) for m in messages) + garbage
    received, failure, invalid = _read_all(cut(stream, points))
    assert received == messages
    assert isinstance(failure, WorkerCrashed)
    # A frame that is not one is reported once (the worker is restarted); a short tail or
    # a clean end is just the worker going away.
    assert invalid == (1 if garbage in NOT_FRAMES else 0)
