"""OpenAI's sampling fields in each sequence's own samplers (appliance.llm.sampling), on
the real llama.cpp: each field changes the answer as it promises, and holds under
continuous batching (a constrained sequence and a free one in the same batch each give
what they give alone). The tiny model shows the samplers; SmolLM2 (the default model)
shows structured output on a real vocabulary, also when max_tokens cuts the answer.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import jsonschema
import llama_cpp
import numpy as np
import pytest

from appliance.llm.batching import Sampling, open_model
from appliance.llm.grammar import schema_to_grammar
from appliance.llm.sampling import PENALTY_LAST_N, FastChoice
from tests.harness import install_tiny_model, short_tempdir
from tests.real_model import install_smollm2
from tests.test_batching import alone, batcher_for, run, tokens_of

GREEDY = Sampling(max_tokens=24, temperature=0.0, top_p=1.0)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}},
    },
    "required": ["name", "age", "tags"],
}


@pytest.fixture(scope="module")
def tiny() -> Iterator[tuple[object, object]]:
    path = install_tiny_model(short_tempdir("sc"))
    model, context = open_model(
        str(path), n_ctx=512, n_threads=1, n_gpu_layers=0, parallel=4, n_batch=64
    )
    yield model, context
    context.close()  # type: ignore[attr-defined]
    model.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def smol() -> Iterator[tuple[object, object]]:
    path = install_smollm2(short_tempdir("sm"), "smol")
    model, context = open_model(
        str(path), n_ctx=1024, n_threads=2, n_gpu_layers=0, parallel=4, n_batch=64
    )
    yield model, context
    context.close()  # type: ignore[attr-defined]
    model.close()  # type: ignore[attr-defined]


def _token(llama: tuple[object, object], text: str) -> int:
    """The id of the token whose piece is `text` (SentencePiece writes a space as ▁)."""
    model: Any = llama[0]
    wanted = text.replace(" ", "\u2581")
    found = [i for i in range(model.n_vocab()) if model.token_get_text(i) == wanted]
    assert len(found) == 1, (text, found)
    return found[0]


def _pieces(llama: tuple[object, object], prompt: str, sampling: Sampling) -> list[bytes]:
    """The answer's tokens, as their bytes (from the log probabilities)."""
    batcher = batcher_for(llama)
    try:
        events: list[Any] = []
        batcher.start(1, tokens_of(llama, prompt), sampling)
        while batcher.running:
            events += batcher.step()
    finally:
        batcher.close()
    entries = [entry for event in events for entry in getattr(event, "logprobs", ())]
    return [entry.token for entry in entries]


def test_logit_bias_bans_and_forces_tokens(tiny: tuple[object, object]) -> None:
    free, _ = alone(tiny, "the water", GREEDY)
    assert " sid" in free  # the tiny model's greedy favourite
    sid = _token(tiny, " sid")
    banned, _ = alone(tiny, "the water", Sampling(24, 0.0, 1.0, logit_bias=((sid, -100.0),)))
    assert " sid" not in banned and banned != free
    # A strong positive bias makes the token the answer (sampled, not only greedy).
    water = _token(tiny, " water")
    forced, _ = alone(
        tiny, "the water", Sampling(6, 0.9, 1.0, seed=3, logit_bias=((water, 100.0),))
    )
    assert forced == " water" * 6


def test_penalties_make_repeats_rarer(tiny: tuple[object, object]) -> None:
    plain = _pieces(tiny, "the water", Sampling(24, 0.0, 1.0, top_logprobs=0))
    for field in ("frequency_penalty", "presence_penalty"):
        penalized = _pieces(
            tiny, "the water", Sampling(24, 0.0, 1.0, top_logprobs=0, **{field: 2.0})
        )  # type: ignore[arg-type]
        assert penalized != plain, field
        most = Counter(plain).most_common(1)[0][1]
        assert Counter(penalized).most_common(1)[0][1] < most, (field, plain, penalized)


def test_the_repeat_penalty_chooses_the_tokens_llama_cpps_samplers_choose(
    smol: tuple[object, object],
) -> None:
    """A model's repeat penalty under greedy decoding and at a temperature: the answer is
    the one llama.cpp's own penalty and choice samplers give (they run when log
    probabilities are asked for), and differs from the answer without the penalty."""
    prompt = "Repeat after me, ten times: the cat sat on the mat."
    for sampling in (
        Sampling(96, 0.0, 1.0, repeat_penalty=1.3),
        Sampling(96, 0.7, 0.95, seed=11, repeat_penalty=1.3),
    ):
        fast, _ = alone(smol, prompt, sampling)
        by_llama, _ = alone(smol, prompt, dataclasses.replace(sampling, top_logprobs=0))
        unpenalized, _ = alone(smol, prompt, dataclasses.replace(sampling, repeat_penalty=1.0))
        assert fast == by_llama, sampling
        assert fast != unpenalized, sampling


@pytest.mark.parametrize("penalty", [1.25, 0.5, 1e-50])
def test_fast_choice_penalizes_as_llama_cpps_penalties_sampler(penalty: float) -> None:
    """Logit for logit, over a window that fills and slides, positive and negative logits:
    the repeat penalty and greedy choice equal llama.cpp's penalties and greedy samplers,
    also for a penalty below 1 and one too small for a float (0 there: C divides by it)."""
    n_vocab = 512
    sampling = Sampling(1000, 0.0, 1.0, repeat_penalty=penalty)
    fast = FastChoice.for_sampling(sampling, n_vocab)
    assert fast is not None
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(
        chain,
        llama_cpp.llama_sampler_init_penalties(PENALTY_LAST_N, PENALTY_LAST_N, penalty, 0.0, 0.0),
    )
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    token_data = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
    random = np.random.default_rng(5)
    try:
        for step in range(3 * PENALTY_LAST_N):
            # A few strong tokens, so that the same ones come back and fill the window.
            logits = random.normal(0.0, 1.0, n_vocab).astype(np.float32)
            logits[random.integers(0, 24, 6)] += np.float32(random.uniform(-4.0, 6.0))
            data = np.zeros(n_vocab, dtype=token_data)
            data["id"] = np.arange(n_vocab)
            data["logit"] = logits
            array = llama_cpp.llama_token_data_array(
                data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
                size=n_vocab,
                selected=-1,
                sorted=False,
            )
            llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
            expected = int(data["id"][array.selected])
            llama_cpp.llama_sampler_accept(chain, expected)
            fast.penalize(logits)
            assert np.array_equal(logits, data["logit"]), step
            chosen = int(logits.argmax())
            fast.accept(chosen)
            assert chosen == expected, step
    finally:
        llama_cpp.llama_sampler_free(chain)
    # Anything a penalty-and-choice path cannot do alone goes through llama.cpp's chain.
    for other in (
        dataclasses.replace(sampling, top_logprobs=1),
        dataclasses.replace(sampling, grammar='root ::= "a"'),
        dataclasses.replace(sampling, presence_penalty=0.5),
        dataclasses.replace(sampling, logit_bias=((1, 2.0),)),
        Sampling(10, 0.8, 1.0),
    ):
        assert FastChoice.for_sampling(other, n_vocab) is None, other


def test_logprobs_are_the_models_and_the_greedy_choice_is_the_top_one(
    tiny: tuple[object, object],
) -> None:
    batcher = batcher_for(tiny)
    texts, _ = run(
        batcher, {0: [(1, tokens_of(tiny, "the"), Sampling(8, 0.0, 1.0, top_logprobs=5))]}
    )
    batcher.close()
    assert texts[1] == alone(tiny, "the", Sampling(8, 0.0, 1.0))[0]  # same answer as without
    pieces = _pieces(tiny, "the", Sampling(8, 0.0, 1.0, top_logprobs=5))
    assert b"".join(pieces).decode("utf-8", "replace") == texts[1]
    batcher = batcher_for(tiny)
    batcher.start(1, tokens_of(tiny, "the"), Sampling(8, 0.0, 1.0, top_logprobs=5))
    entries = []
    while batcher.running:
        entries += [e for event in batcher.step() for e in getattr(event, "logprobs", ())]
    batcher.close()
    assert len(entries) == 8
    for entry in entries:
        assert len(entry.top) == 5
        values = [top.logprob for top in entry.top]
        assert values == sorted(values, reverse=True)
        assert entry.top[0].token == entry.token and entry.top[0].logprob == entry.logprob
        assert entry.logprob <= 0 and sum(math.exp(v) for v in values) <= 1.0001


def test_a_grammar_decides_the_answer(tiny: tuple[object, object]) -> None:
    grammar = 'root ::= ("yes" | "no") "." '
    for seed in range(6):
        text, end = alone(tiny, "the", Sampling(10, 1.0, 1.0, seed=seed, grammar=grammar))
        assert text in ("yes.", "no."), text
        assert end.finish_reason == "stop"  # type: ignore[union-attr]


def test_a_constrained_and_a_free_sequence_together_give_what_they_give_alone(
    smol: tuple[object, object],
) -> None:
    prompt = "<|im_start|>user\nDescribe a person.<|im_end|>\n<|im_start|>assistant\n"
    constrained = Sampling(
        48, 0.7, 0.95, seed=11, grammar=schema_to_grammar(PERSON), close_json=True
    )
    free = Sampling(48, 0.7, 0.95, seed=11)
    tokens = list(smol[0].tokenize(prompt.encode(), add_bos=False, special=True))  # type: ignore[attr-defined]
    solo = []
    for sampling in (constrained, free):
        batcher = batcher_for(smol)
        solo.append(run(batcher, {0: [(1, tokens, sampling)]})[0][1])
        batcher.close()
    batcher = batcher_for(smol)
    texts, _ = run(batcher, {0: [(1, tokens, constrained)], 2: [(2, tokens, free)]})
    batcher.close()
    assert texts[1] == solo[0] and texts[2] == solo[1]
    jsonschema.validate(json.loads(texts[1]), PERSON)
    assert texts[2] != texts[1]


def test_a_json_answer_cut_by_max_tokens_still_parses(smol: tuple[object, object]) -> None:
    prompt = "<|im_start|>user\nDescribe a person.<|im_end|>\n<|im_start|>assistant\n"
    schema = {
        "type": "object",
        "properties": {
            "story": {"type": "string"},
            "friends": {"type": "array", "items": PERSON},
        },
        "required": ["story", "friends"],
    }
    grammar = schema_to_grammar(schema)
    tokens = list(smol[0].tokenize(prompt.encode(), add_bos=False, special=True))  # type: ignore[attr-defined]
    for max_tokens in (1, 3, 9):
        batcher = batcher_for(smol)
        sampling = Sampling(max_tokens, 0.0, 1.0, grammar=grammar, close_json=True)
        texts, ends = run(batcher, {0: [(1, tokens, sampling)]})
        batcher.close()
        text, end = texts[1], ends[1]
        assert end.finish_reason == "length", (max_tokens, text)  # type: ignore[union-attr]
        jsonschema.validate(json.loads(text), schema)
