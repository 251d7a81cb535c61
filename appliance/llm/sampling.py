"""One sequence's C samplers: its chain, its grammar, and its log probabilities.

Every sequence has samplers of its own (llama.cpp keeps their state: penalties count the
tokens the sequence generated, a grammar knows where in the answer it is), so each holds
under continuous batching whatever the other sequences ask.

A grammar is checked the way llama.cpp's own sampler does it: the chain picks a token
from the free distribution and the grammar only checks that one token. When the grammar
refuses it, the pick is made again among the 256 likeliest tokens the grammar allows
(for greedy decoding exactly llama.cpp's answer; for sampling the same but for tokens
too unlikely to pass top-k and min-p), and over the whole masked vocabulary only when
none of those is allowed. Masking all of a 49k vocabulary with the grammar costs about
as much as a decode step, and a JSON answer meets a refusal at every other token.
"""

from __future__ import annotations

import ctypes
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import llama_cpp as llama
import numpy as np
import numpy.typing as npt

from appliance.llm import llama_log
from appliance.llm.protocol import TokenLogprob, TopLogprob

# What create_completion's sampler chain uses unless told otherwise.
TOP_K: Final = 40
MIN_P: Final = 0.05
TYPICAL_P: Final = 1.0
# Tokens a repeat penalty looks back on (llama.cpp's server's default).
PENALTY_LAST_N: Final = 64
# OpenAI's -100 "should result in a ban": it is made one (llama.cpp would only add -100).
BAN_BIAS: Final = -100.0
# While an answer cut by max_tokens is closed: what its closing tokens gain over others.
CLOSING_BIAS: Final = 1000.0
# A token the grammar refuses: the choice is made again among this many likeliest tokens
# (the whole vocabulary only when the grammar allows none of them).
GRAMMAR_FEW: Final = 256
# The characters that close JSON: the tokens that hold only them are closing tokens.
CLOSING_CHARS: Final = frozenset('"}]')
_TOKEN_DATA: Final = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class GrammarError(ValueError):
    """llama.cpp refused the grammar (its parser logs why)."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None
    close_json: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int | None = None
    top_k: int = TOP_K
    min_p: float = MIN_P
    repeat_penalty: float = 1.0


def sampler_chain(sampling: Sampling, n_vocab: int = 0, *, adjusted: bool = True) -> Any:
    """A C sampler chain like create_completion's, after the penalties and the logit bias
    unless `adjusted` is False (free it with llama_sampler_free)."""
    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    if adjusted:
        _add_adjustments(chain, sampling, n_vocab)
    _add_choice(chain, sampling)
    return chain


class FastChoice:
    """Greedy choice and the repeat penalty without llama.cpp's passes over the whole
    vocabulary: its sampling copies every logit into a candidate array and its penalties
    sampler looks each candidate up in a hash map (0.19 ms a token for SmolLM2's 49k
    tokens, 3% of a decode step; more for Gemma's 262k). Here the penalty touches only
    the tokens in its window, in place in the logits row, and greedy is one argmax: the
    same float32 arithmetic on the same values, so the same tokens. At a temperature,
    llama.cpp's choosing samplers go on to choose, from the penalized row.

    For a sequence without a grammar or log probabilities whose only adjustment is the
    repeat penalty (`for_sampling` gives None for any other)."""

    def __init__(self, sampling: Sampling, n_vocab: int) -> None:
        self._n_vocab = n_vocab
        self._greedy = sampling.temperature == 0
        # The penalty as llama.cpp holds it (a float), in a double.
        self._penalty = float(np.float32(sampling.repeat_penalty))
        self._penalized = sampling.repeat_penalty != 1.0
        self._row = ctypes.c_float * n_vocab
        # As llama.cpp's penalties sampler: the last PENALTY_LAST_N tokens, their counts.
        self._window: deque[int] = deque()
        self._counts: dict[int, int] = {}

    @staticmethod
    def for_sampling(sampling: Sampling, n_vocab: int) -> FastChoice | None:
        if (
            sampling.grammar
            or sampling.top_logprobs is not None
            or sampling.logit_bias
            or sampling.presence_penalty
            or sampling.frequency_penalty
            or (sampling.temperature != 0 and sampling.repeat_penalty == 1.0)
        ):
            return None
        return FastChoice(sampling, n_vocab)

    def choose(self, ctx: Any, row: int, chain: Any) -> int:
        """The token for batch row `row`; `chain` (sampler_chain(..., adjusted=False))
        chooses when the temperature is not 0."""
        pointer = llama.llama_get_logits_ith(ctx, row)
        self.penalize(pointer)
        if self._greedy:
            row_values = self._row.from_address(ctypes.addressof(pointer.contents))
            # The first of equal maxima, as llama.cpp's greedy sampler.
            token = int(np.ctypeslib.as_array(row_values).argmax())
        else:
            token = int(llama.llama_sampler_sample(chain, ctx, row))
        self.accept(token)
        return token

    def penalize(self, logits: Any) -> None:
        """llama.cpp's repeat penalty, in place in a row of float32 logits (a ctypes
        pointer or an array): the logit of a token in the window is divided by the penalty
        when above 0, else multiplied by it. Python's doubles round to the same float32 as
        llama.cpp's float arithmetic (a double holds more than twice a float's digits)."""
        if not self._penalized:
            return
        penalty = self._penalty
        for token in self._counts:
            value = float(logits[token])
            if value <= 0:
                logits[token] = value * penalty
            else:  # a penalty too small for a float is 0 there: C's division gives inf
                logits[token] = value / penalty if penalty else math.inf

    def accept(self, token: int) -> None:
        if not self._penalized:
            return
        counts, window = self._counts, self._window
        counts[token] = counts.get(token, 0) + 1
        if len(window) >= PENALTY_LAST_N:
            old = window.popleft()
            left = counts[old] - 1
            if left:
                counts[old] = left
            else:
                del counts[old]
        window.append(token)


def split_chains(sampling: Sampling, n_vocab: int) -> tuple[Any, Any]:
    """The same samplers as two chains, for a sequence under a grammar: what adjusts the
    logits (penalties, bias; None when there is none), then what chooses."""
    adjust = None
    if (
        sampling.presence_penalty
        or sampling.frequency_penalty
        or sampling.repeat_penalty != 1.0
        or sampling.logit_bias
    ):
        adjust = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        _add_adjustments(adjust, sampling, n_vocab)
    choose = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    _add_choice(choose, sampling)
    return adjust, choose


def _add_adjustments(chain: Any, sampling: Sampling, n_vocab: int) -> None:
    add = llama.llama_sampler_chain_add
    # llama-cpp-python declares the penalties sampler with llama.cpp's older signature
    # (n_vocab, last_n, ...) while the library may take the newer one (last_n, ...): the
    # first integer is the window either way, and the floats land in place by their type.
    if sampling.repeat_penalty != 1.0:
        # A model's repeat penalty (its defaults): over the last PENALTY_LAST_N tokens.
        add(
            chain,
            llama.llama_sampler_init_penalties(
                PENALTY_LAST_N, PENALTY_LAST_N, sampling.repeat_penalty, 0.0, 0.0
            ),
        )
    if sampling.presence_penalty or sampling.frequency_penalty:
        # Over every token the sequence generates (OpenAI's penalties count them all).
        add(
            chain,
            llama.llama_sampler_init_penalties(
                n_vocab,
                max(sampling.max_tokens, 1),
                1.0,
                sampling.frequency_penalty,
                sampling.presence_penalty,
            ),
        )
    if sampling.logit_bias:
        biases = (llama.llama_logit_bias * len(sampling.logit_bias))()
        for index, (token, bias) in enumerate(sampling.logit_bias):
            biases[index].token = token  # type: ignore[assignment]
            biases[index].bias = -math.inf if bias <= BAN_BIAS else bias
        add(chain, llama.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))


def _add_choice(chain: Any, sampling: Sampling) -> None:
    add = llama.llama_sampler_chain_add
    if sampling.temperature == 0:
        add(chain, llama.llama_sampler_init_greedy())
        return
    seed = llama.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed & 0xFFFFFFFF
    add(chain, llama.llama_sampler_init_top_k(sampling.top_k))
    add(chain, llama.llama_sampler_init_typical(TYPICAL_P, 1))
    add(chain, llama.llama_sampler_init_top_p(sampling.top_p, 1))
    add(chain, llama.llama_sampler_init_min_p(sampling.min_p, 1))
    add(chain, llama.llama_sampler_init_temp(sampling.temperature))
    add(chain, llama.llama_sampler_init_dist(seed))


def grammar_sampler(vocab: Any, grammar: str) -> Any:
    """A C grammar sampler (free it with llama_sampler_free); GrammarError if refused."""
    with llama_log.answered_elsewhere():  # the client is told; the box did nothing wrong
        sampler = llama.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise GrammarError("the grammar does not parse (GBNF, with a rule named root)")
    return sampler


class Candidates:
    """A llama_token_data_array over the whole vocabulary (numpy memory), for sampling a
    sequence by hand: a grammar check, closing a cut answer, log probabilities."""

    def __init__(self, vocab: Any, n_vocab: int) -> None:
        self.vocab = vocab
        self.n_vocab = n_vocab
        self._data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._array = llama.llama_token_data_array(
            data=self._data.ctypes.data_as(ctypes.POINTER(llama.llama_token_data)),
            size=n_vocab,
            selected=-1,
            sorted=False,
        )
        self._few = np.zeros(min(GRAMMAR_FEW, n_vocab), dtype=_TOKEN_DATA)
        self._few_array = llama.llama_token_data_array(
            data=self._few.ctypes.data_as(ctypes.POINTER(llama.llama_token_data)),
            size=len(self._few),
            selected=-1,
            sorted=False,
        )
        self._one_data = (llama.llama_token_data * 1)()
        self._one = llama.llama_token_data_array(
            data=ctypes.cast(self._one_data, ctypes.POINTER(llama.llama_token_data)),
            size=1,
            selected=-1,
            sorted=False,
        )
        self._closing: npt.NDArray[np.float32] | None = None
        self._pieces: list[bytes] | None = None

    def logits(self, ctx: Any, row: int) -> npt.NDArray[np.float32]:
        pointer = llama.llama_get_logits_ith(ctx, row)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def _fill(self, logits: npt.NDArray[np.float32]) -> None:
        data = self._data
        data["id"] = self._ids
        data["logit"] = logits
        data["p"] = 0.0
        array = self._array
        array.data = self._data.ctypes.data_as(ctypes.POINTER(llama.llama_token_data))  # type: ignore[assignment]
        array.size = self.n_vocab
        array.selected = -1
        array.sorted = False

    def _pick(self, *samplers: Any) -> int:
        array = self._array
        for sampler in samplers:
            llama.llama_sampler_apply(sampler, ctypes.byref(array))
        if array.selected < 0:
            raise RuntimeError("the sampler chain selected no token")
        return int(array.data[array.selected].id)

    def _allows(self, grammar: Any, token: int) -> bool:
        self._one_data[0].id = token  # type: ignore[assignment]
        self._one_data[0].logit = 1.0
        self._one_data[0].p = 0.0
        self._one.size = 1
        self._one.selected = -1
        llama.llama_sampler_apply(grammar, ctypes.byref(self._one))
        return not math.isinf(self._one_data[0].logit)

    def constrained(
        self,
        adjust: Any,
        choose: Any,
        grammar: Any,
        logits: npt.NDArray[np.float32],
        sample: Callable[[], int],
    ) -> int:
        """A token that `grammar` allows, by the sequence's samplers; all accept it.
        `sample` is llama.cpp's own sampling of the row by `choose` (used when nothing
        adjusts the logits: the choosing samplers keep no state a refusal could spoil)."""
        if adjust is None:
            token = sample()
        else:
            self._fill(logits)
            token = self._pick(adjust, choose)
        if not self._allows(grammar, token):
            token = self._refused(adjust, choose, grammar, logits)
        for sampler in (grammar, adjust):
            if sampler is not None:
                llama.llama_sampler_accept(sampler, token)
        if adjust is not None:
            llama.llama_sampler_accept(choose, token)
        return token

    def _refused(
        self, adjust: Any, choose: Any, grammar: Any, logits: npt.NDArray[np.float32]
    ) -> int:
        """The choice again among what the grammar allows: among the GRAMMAR_FEW likeliest
        tokens first (for greedy decoding the same token as masking them all), the whole
        vocabulary only when none of those is allowed."""
        adjusted = logits
        if adjust is not None:
            self._fill(logits)
            llama.llama_sampler_apply(adjust, ctypes.byref(self._array))
            adjusted = self._data["logit"]
        few = self._few
        likeliest = np.argpartition(-adjusted, len(few) - 1)[: len(few)]
        few["id"] = likeliest
        few["logit"] = adjusted[likeliest]
        few["p"] = 0.0
        array = self._few_array
        array.data = few.ctypes.data_as(ctypes.POINTER(llama.llama_token_data))  # type: ignore[assignment]
        array.size = len(few)
        array.selected = -1
        array.sorted = False
        llama.llama_sampler_apply(grammar, ctypes.byref(array))
        if np.isfinite(few["logit"]).any():
            llama.llama_sampler_apply(choose, ctypes.byref(array))
            if array.selected >= 0:
                return int(array.data[array.selected].id)
        self._fill(logits)
        return self._pick(*(s for s in (adjust, grammar, choose) if s is not None))

    def closing(self, chain: Any, grammar: Any, logits: npt.NDArray[np.float32]) -> int:
        """The likeliest token the grammar allows, closing tokens (and the end) first: an
        answer past max_tokens ends in the fewest tokens that leave it whole."""
        self._fill(logits + self._closing_bias())
        # The grammar masks in place (-inf), without reordering the array.
        llama.llama_sampler_apply(grammar, ctypes.byref(self._array))
        token = int(self._data["id"][int(np.argmax(self._data["logit"]))])
        llama.llama_sampler_accept(grammar, token)
        llama.llama_sampler_accept(chain, token)
        return token

    def _closing_bias(self) -> npt.NDArray[np.float32]:
        if self._closing is None:
            bias = np.zeros(self.n_vocab, dtype=np.float32)
            for token, piece in enumerate(self.pieces()):
                closes = bool(piece) and all(chr(c) in CLOSING_CHARS for c in piece)
                if closes or llama.llama_vocab_is_eog(self.vocab, token):
                    bias[token] = CLOSING_BIAS
            self._closing = bias
        return self._closing

    def pieces(self) -> list[bytes]:
        """Every token's bytes, once (log probabilities name tokens by them)."""
        if self._pieces is None:
            buffer = ctypes.create_string_buffer(256)
            pieces: list[bytes] = []
            for token in range(self.n_vocab):
                size = llama.llama_token_to_piece(self.vocab, token, buffer, 256, 0, True)
                pieces.append(buffer.raw[: max(size, 0)])
            self._pieces = pieces
        return self._pieces

    def logprob(self, logits: npt.NDArray[np.float32], token: int, top: int) -> TokenLogprob:
        """`token`'s log probability under the model (before sampling settings), and the
        `top` likeliest tokens'."""
        shifted = logits - np.max(logits)
        normalizer = float(np.log(np.sum(np.exp(shifted, dtype=np.float64))))
        pieces = self.pieces()
        alternatives: list[TopLogprob] = []
        if top > 0:
            best = np.argpartition(-shifted, top - 1)[:top]
            best = best[np.argsort(-shifted[best])]
            alternatives = [
                TopLogprob(pieces[int(i)], float(shifted[int(i)]) - normalizer) for i in best
            ]
        return TokenLogprob(pieces[token], float(shifted[token]) - normalizer, alternatives)
