"""Continuous batching (appliance.llm.batching) on the real llama.cpp with the tiny model.

Batching must change speed, not answers: every sequence run among others produces exactly
what it produces alone, whoever joins or leaves meanwhile; and a follow-up that starts
with a finished sequence's tokens evaluates only its new ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import llama_cpp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.llm.batching import (
    Batcher,
    BatchFull,
    Failed,
    Finished,
    Sampling,
    TokenText,
    open_model,
)
from appliance.llm.text_stream import TextStream, overlap
from tests.harness import install_tiny_model, short_tempdir

PARALLEL = 4
N_CTX = 512
PROMPTS = ["the water", "a new thing", "one time and", "the call of the"]
SAMPLINGS = [
    Sampling(max_tokens=24, temperature=0.0, top_p=1.0),
    Sampling(max_tokens=24, temperature=0.8, top_p=0.95, seed=7),
    Sampling(max_tokens=24, temperature=1.2, top_p=0.9, seed=12345),
    Sampling(max_tokens=24, temperature=0.5, top_p=1.0, seed=99),
]


@pytest.fixture(scope="module")
def llama() -> Iterator[tuple[object, object]]:
    path = install_tiny_model(short_tempdir("bt"))
    model, context = open_model(
        str(path), n_ctx=N_CTX, n_threads=1, n_gpu_layers=0, parallel=PARALLEL, n_batch=64
    )
    yield model, context
    context.close()  # type: ignore[attr-defined]
    model.close()  # type: ignore[attr-defined]


def batcher_for(llama: tuple[object, object]) -> Batcher:
    model, context = llama
    batcher = Batcher(model, context, parallel=PARALLEL, n_batch=64)
    # Each test starts from an empty cache.
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(context.ctx), True)  # type: ignore[attr-defined]
    return batcher


def tokens_of(llama: tuple[object, object], text: str) -> list[int]:
    model = llama[0]
    return list(model.tokenize(text.encode(), add_bos=True, special=False))  # type: ignore[attr-defined]


def run(
    batcher: Batcher,
    joins: dict[int, list[tuple[int, list[int], Sampling]]],
    cancel: dict[int, int] | None = None,
) -> tuple[dict[int, str], dict[int, Finished | Failed]]:
    """Step until every sequence ended; `joins[step]` start then, `cancel[step]` ends one."""
    texts: dict[int, str] = {}
    ends: dict[int, Finished | Failed] = {}
    # Sequences started before, and those that join.
    expected = batcher.running + sum(len(group) for group in joins.values())
    step = 0
    while len(ends) < expected:
        for request_id, prompt, sampling in joins.get(step, []):
            batcher.start(request_id, prompt, sampling)
        if cancel and step in cancel:
            finished = batcher.cancel(cancel[step])
            assert finished is not None
            ends[finished.request_id] = finished
        for event in batcher.step():
            if isinstance(event, TokenText):
                texts[event.request_id] = texts.get(event.request_id, "") + event.text
            else:
                ends[event.request_id] = event
        step += 1
        assert step < 1000, "the sequences never ended"
    return texts, ends


def alone(
    llama: tuple[object, object], prompt: str, sampling: Sampling
) -> tuple[str, Finished | Failed]:
    batcher = batcher_for(llama)
    try:
        texts, ends = run(batcher, {0: [(1, tokens_of(llama, prompt), sampling)]})
    finally:
        batcher.close()
    return texts.get(1, ""), ends[1]


def test_four_concurrent_sequences_answer_as_they_do_alone(llama: tuple[object, object]) -> None:
    solo = [alone(llama, p, s) for p, s in zip(PROMPTS, SAMPLINGS, strict=True)]
    assert len({text for text, _ in solo}) == 4  # different prompts and seeds differ
    batcher = batcher_for(llama)
    joins = {
        0: [
            (i, tokens_of(llama, p), s)
            for i, (p, s) in enumerate(zip(PROMPTS, SAMPLINGS, strict=True))
        ]
    }
    texts, ends = run(batcher, joins)
    batcher.close()
    for index, (text, end) in enumerate(solo):
        assert texts.get(index, "") == text
        assert isinstance(end, Finished) and ends[index] == Finished(
            index, end.finish_reason, end.prompt_tokens, end.completion_tokens, end.cached_tokens
        )


def test_a_late_joiner_and_a_cancel_disturb_nobody(llama: tuple[object, object]) -> None:
    solo = [alone(llama, p, s) for p, s in zip(PROMPTS, SAMPLINGS, strict=True)]
    batcher = batcher_for(llama)
    joins = {
        0: [(i, tokens_of(llama, PROMPTS[i]), SAMPLINGS[i]) for i in range(3)],
        5: [(3, tokens_of(llama, PROMPTS[3]), SAMPLINGS[3])],
    }
    # Sequence 1 is cancelled at step 8, while the late joiner streams.
    texts, ends = run(batcher, joins, cancel={8: 1})
    batcher.close()
    for index in (0, 2, 3):
        assert texts.get(index, "") == solo[index][0]
    assert isinstance(ends[1], Finished) and ends[1].finish_reason == "cancelled"
    assert solo[1][0].startswith(texts.get(1, ""))
    assert len(texts.get(1, "")) < len(solo[1][0])


def test_a_follow_up_evaluates_only_its_new_tokens(llama: tuple[object, object]) -> None:
    batcher = batcher_for(llama)
    first = tokens_of(llama, "the water and the time")
    greedy = Sampling(max_tokens=8, temperature=0.0, top_p=1.0)
    run(batcher, {0: [(1, first, greedy)]})
    evaluated = batcher.evaluated_prompt_tokens
    assert evaluated == len(first)
    # The next turn repeats the first prompt (in a chat: the history) and adds to it.
    follow_up = first + tokens_of(llama, " new thing")[1:]
    _, ends = run(batcher, {0: [(2, follow_up, greedy)]})
    done = ends[2]
    assert isinstance(done, Finished)
    assert done.cached_tokens == len(first)
    assert batcher.evaluated_prompt_tokens - evaluated == len(follow_up) - len(first)
    batcher.close()


def test_slots_are_limited_and_lengths_and_stops_end_sequences(
    llama: tuple[object, object],
) -> None:
    batcher = batcher_for(llama)
    greedy = Sampling(max_tokens=5, temperature=0.0, top_p=1.0)
    for request_id in range(PARALLEL):
        batcher.start(request_id, tokens_of(llama, "the"), greedy)
    with pytest.raises(BatchFull):
        batcher.start(99, tokens_of(llama, "the"), greedy)
    _, ends = run(batcher, {})
    assert len(ends) == PARALLEL
    assert all(
        isinstance(e, Finished) and e.finish_reason == "length" and e.completion_tokens == 5
        for e in ends.values()
    )
    batcher.close()
    text, _ = alone(llama, "the", Sampling(max_tokens=30, temperature=0.0, top_p=1.0))
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    cut, end = alone(
        llama, "the", Sampling(max_tokens=30, temperature=0.0, top_p=1.0, stop=(stop,))
    )
    assert isinstance(end, Finished) and end.finish_reason == "stop"
    assert cut == text[: text.index(stop)]


def test_text_stream_holds_back_partial_utf8_and_stop_prefixes() -> None:
    stream = TextStream(["END"])
    assert stream.feed("é".encode()[:1]) == ""
    assert stream.feed("é".encode()[1:] + b" E") == "é "
    assert stream.feed(b"N") == ""
    assert stream.feed(b"x") == "ENx"
    assert stream.feed(b" EN") == " "
    assert stream.feed(b"D more") == ""
    assert stream.stopped and stream.finish() == ""
    open_end = TextStream(["###"])
    assert open_end.feed(b"a #") == "a "
    assert open_end.finish() == "#"


@given(st.text("<|im_end>#E ", max_size=12), st.text("<|im_end>#E ", min_size=1, max_size=8))
def test_held_text_is_the_longest_end_that_begins_a_stop_string(text: str, stop: str) -> None:
    """What TextStream holds back, against the definition: the longest end of the text
    (shorter than the stop string) that the stop string begins with."""
    longest = max(
        (
            size
            for size in range(1, min(len(text), len(stop) - 1) + 1)
            if stop.startswith(text[-size:])
        ),
        default=0,
    )
    assert overlap(text, stop) == longest


def test_a_full_context_evicts_idle_caches_then_ends_the_youngest_sequence() -> None:
    path = install_tiny_model(short_tempdir("bf"))
    model, context = open_model(
        str(path), n_ctx=256, n_threads=1, n_gpu_layers=0, parallel=PARALLEL, n_batch=64
    )
    batcher = Batcher(model, context, parallel=PARALLEL, n_batch=64)

    def prompt(text: str) -> list[int]:
        return list(model.tokenize(text.encode(), add_bos=True, special=False))

    try:
        size = batcher.n_ctx
        quarter = Sampling(max_tokens=size // 4, temperature=0.0, top_p=1.0)
        long = Sampling(max_tokens=size * 6 // 10, temperature=0.0, top_p=1.0)
        # Three finished sequences leave three quarters of the cache to idle slots; a long
        # one gets its room by evicting them.
        run(batcher, {0: [(i, prompt(PROMPTS[i]), quarter) for i in range(3)]})
        _, ends = run(batcher, {0: [(3, prompt(PROMPTS[3]), long)]})
        alone = ends[3]
        assert isinstance(alone, Finished) and alone.completion_tokens == long.max_tokens
        # Two long ones do not fit together: the younger ends, the older finishes.
        _, ends = run(
            batcher, {0: [(4, prompt("the water"), long)], 3: [(5, prompt("a new"), long)]}
        )
    finally:
        batcher.close()
        context.close()
        model.close()
    older, younger = ends[4], ends[5]
    assert isinstance(older, Finished) and older.finish_reason == "length"
    assert older.completion_tokens == long.max_tokens
    assert isinstance(younger, Failed) and younger.code == "context_full"
    assert "retry" in younger.message
