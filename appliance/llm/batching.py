"""Continuous batching: several generations on one llama.cpp context, one decode per step.

Each `step` builds one batch: the next token of every decoding sequence and a chunk of the
prompt of each sequence still reading its prompt (at most `n_batch` tokens in all), calls
llama_decode once, and samples every sequence that got logits with its own C sampler
chain (the chain llama-cpp-python's `create_completion` builds, so a seed gives the same
answer). A sequence that joins is in the next step's batch; one that ends or is cancelled
stops at once. Slots keep their tokens in the KV cache after a sequence ends, so a
follow-up whose prompt starts with them evaluates only its new tokens: a new sequence takes
the free slot with the longest common prefix, else the least recently used one.

The KV cache is unified (all slots share `n_ctx` cells). When it is full, idle slots give
up their cached tokens first; if that is not enough the youngest running sequence ends
with a `context_full` error.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import llama_cpp as llama

from appliance.llm.protocol import TokenLogprob
from appliance.llm.sampling import (
    Candidates,
    FastChoice,
    GrammarError,
    Sampling,
    grammar_sampler,
    sampler_chain,
    split_chains,
)
from appliance.llm.text_stream import TextStream

__all__ = ["BatchFull", "Batcher", "GrammarError", "Sampling", "open_model", "sampler_chain"]

PIECE_BYTES: Final = 64
# Tokens an answer cut by max_tokens may take past it to close its JSON, at most.
CLOSING_TOKENS: Final = 256


class BatchFull(Exception):
    """Every slot is running a sequence."""


@dataclass(frozen=True)
class TokenText:
    """A piece of a sequence's answer."""

    request_id: int
    text: str
    # The tokens that made `text`, when the sequence asked for log probabilities.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """A sequence ended: why, its token counts, and how many prompt tokens came from the
    slot's cache instead of being evaluated."""

    request_id: int
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Failed:
    request_id: int
    code: str
    message: str


Event = TokenText | Finished | Failed


@dataclass
class _Running:
    request_id: int
    sampling: Sampling
    chain: Any
    text: TextStream
    prompt_tokens: int
    cached_tokens: int
    pending: list[int]  # prompt tokens not yet evaluated
    started: int  # order of joining (the youngest goes first when the cache is full)
    grammar: Any = None  # its grammar sampler, if the answer follows one
    # Under a grammar, `chain` only chooses; this adjusts the logits first (or None).
    adjust: Any = None
    # Chooses instead of `chain` (which then only chooses), where it can: see FastChoice.
    fast: FastChoice | None = None
    generated: int = 0
    next_token: int | None = None  # sampled, to be evaluated in the next step
    logits_at: int = -1  # its row in the batch being decoded, or -1
    closing: int = 0  # tokens past max_tokens spent closing a cut JSON answer
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens in the KV cache, in order
    last_used: int = 0
    running: _Running | None = None


def open_model(
    path: str, *, n_ctx: int, n_threads: int, n_gpu_layers: int, parallel: int, n_batch: int
) -> tuple[Any, Any]:
    """llama-cpp-python's LlamaModel and a LlamaContext for `parallel` sequences sharing a
    unified KV cache of `n_ctx` cells; ValueError when llama.cpp refuses."""
    from llama_cpp._internals import LlamaContext, LlamaModel  # untyped library

    model_params = llama.llama_model_default_params()
    model_params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers < 0 else n_gpu_layers
    # Read into memory, not mapped from the file: malloc'd memory can be in huge pages
    # (appliance.llm.huge_pages), which makes every decode step shorter.
    model_params.load_mode = llama.LLAMA_LOAD_MODE_NONE
    # verbose: no redirection of the process's stdout and stderr to /dev/null while it
    # loads (llama.cpp's messages go to its log callback, appliance.llm.llama_log; what
    # ggml prints itself when it aborts must reach the journal).
    model: Any = LlamaModel(path_model=path, params=model_params, verbose=True)
    params = llama.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch  # one ubatch per decode: a failure is whole
    params.n_seq_max = parallel + 1  # and one scratch sequence, for padding rows
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = n_threads
    try:
        context = LlamaContext(model=model, params=params, verbose=True)
    except BaseException:
        model.close()
        raise
    return model, context


class Batcher:
    """The sequences of one loaded model, from `open_model` (or a LlamaModel and a
    LlamaContext made with n_seq_max >= `parallel` + 1 and a unified KV cache). A sequence
    ends at an end-of-generation token or at one of `end_tokens` (the chat template's turn
    markers)."""

    def __init__(
        self,
        model: Any,
        context: Any,
        parallel: int,
        n_batch: int,
        end_tokens: frozenset[int] = frozenset(),
    ) -> None:
        self._vocab = model.vocab
        self._end_tokens = end_tokens
        self._n_vocab: int = llama.llama_vocab_n_tokens(model.vocab)
        self._candidates = Candidates(model.vocab, self._n_vocab)
        self._ctx = context.ctx
        self._memory = llama.llama_get_memory(context.ctx)
        self.n_ctx: int = llama.llama_n_ctx(context.ctx)
        self._n_batch = n_batch
        self._slots = [_Slot(seq_id) for seq_id in range(parallel)]
        # A sequence of its own for a padding row (see `_load`); emptied after each decode.
        self._scratch = parallel
        self._padded = False  # this step's batch has a row of the scratch sequence
        # Per token id, seen so far: its bytes, whether it ends a generation.
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._batch = llama.llama_batch_init(n_batch, 0, 1)
        self._clock = itertools.count(1)
        self._piece = ctypes.create_string_buffer(PIECE_BYTES)
        # Prompt tokens evaluated and taken from slot caches, since the model was loaded.
        self.evaluated_prompt_tokens = 0
        self.reused_prompt_tokens = 0

    def close(self) -> None:
        for slot in self._slots:
            if slot.running is not None:
                _free(slot.running)
                slot.running = None
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None

    @property
    def running(self) -> int:
        return sum(slot.running is not None for slot in self._slots)

    def running_ids(self) -> list[int]:
        return [slot.running.request_id for slot in self._slots if slot.running is not None]

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    def start(self, request_id: int, prompt: list[int], sampling: Sampling) -> None:
        """Join the next step. The caller has checked that prompt + max_tokens fit n_ctx.
        GrammarError when llama.cpp refuses the sequence's grammar."""
        grammar = grammar_sampler(self._vocab, sampling.grammar) if sampling.grammar else None
        try:
            slot = self._choose_slot(prompt)
        except BatchFull:
            if grammar is not None:
                llama.llama_sampler_free(grammar)
            raise
        common = _common_prefix(slot.cached, prompt)
        if common == len(prompt):
            common -= 1  # the last prompt token is evaluated again, for its logits
        llama.llama_memory_seq_rm(self._memory, slot.seq_id, common, -1)
        del slot.cached[common:]
        slot.last_used = next(self._clock)
        fast = None if grammar is not None else FastChoice.for_sampling(sampling, self._n_vocab)
        adjust, chain = (
            split_chains(sampling, self._n_vocab)
            if grammar is not None
            else (None, sampler_chain(sampling, self._n_vocab, adjusted=fast is None))
        )
        slot.running = _Running(
            request_id=request_id,
            sampling=sampling,
            chain=chain,
            adjust=adjust,
            grammar=grammar,
            fast=fast,
            text=TextStream(sampling.stop),
            prompt_tokens=len(prompt),
            cached_tokens=common,
            pending=list(prompt[common:]),
            started=slot.last_used,
        )
        self.reused_prompt_tokens += common

    def cancel(self, request_id: int) -> Finished | None:
        for slot in self._slots:
            running = slot.running
            if running is not None and running.request_id == request_id:
                return self._end(slot, "cancelled")
        return None

    def step(self) -> list[Event]:
        """One decode for every running sequence; the events it produced."""
        events: list[Event] = []
        while True:
            plan = self._plan()
            if not plan:
                return events
            self._load(plan)
            status = llama.llama_decode(self._ctx, self._batch)
            if self._padded:
                llama.llama_memory_seq_rm(self._memory, self._scratch, -1, -1)
            if status == 0:
                break
            if status != 1:
                raise RuntimeError(f"llama_decode returned {status}")
            # No room in the KV cache: idle slots give theirs up, else the youngest ends.
            if not self._evict_idle():
                events.append(self._fail_youngest())
        for slot, tokens, from_prompt in plan:
            running = slot.running
            assert running is not None
            slot.cached.extend(tokens)
            if from_prompt:
                del running.pending[: len(tokens)]
                self.evaluated_prompt_tokens += len(tokens)
            else:
                running.next_token = None
            if running.logits_at >= 0:
                events.extend(self._sample(slot, running))
        return events

    # -- the batch ----------------------------------------------------------------------

    def _plan(self) -> list[tuple[_Slot, list[int], bool]]:
        """What each running sequence puts in this step's batch (oldest first, at most
        n_batch tokens): (slot, tokens, whether they come from its prompt)."""
        plan: list[tuple[_Slot, list[int], bool]] = []
        room = self._n_batch
        running_slots = [slot for slot in self._slots if slot.running is not None]
        for slot in sorted(running_slots, key=lambda s: s.running.started if s.running else 0):
            running = slot.running
            assert running is not None
            if running.next_token is not None:
                plan.append((slot, [running.next_token], False))
                room -= 1
            elif running.pending:
                chunk = running.pending[:room]
                plan.append((slot, chunk, True))
                room -= len(chunk)
            if room == 0:
                break
        return plan

    def _load(self, plan: list[tuple[_Slot, list[int], bool]]) -> None:
        self._batch.n_tokens = 0
        for slot in self._slots:
            if slot.running is not None:
                slot.running.logits_at = -1
        for slot, tokens, from_prompt in plan:
            running = slot.running
            assert running is not None
            # Logits for a decoding token, and for the last token of a whole prompt.
            wants_logits = not from_prompt or len(tokens) == len(running.pending)
            for index, token in enumerate(tokens):
                last = index == len(tokens) - 1
                self._add(token, len(slot.cached) + index, slot.seq_id, last and wants_logits)
            if wants_logits:
                running.logits_at = self._batch.n_tokens - 1
        outputs = sum(1 for slot, _, _ in plan if slot.running and slot.running.logits_at >= 0)
        self._padded = outputs > 1 and outputs % 2 == 1 and self._batch.n_tokens < self._n_batch
        if self._padded:
            # llama.cpp's CPU kernels take a much slower path for an odd number of logits
            # rows (Gemma 270M: 3 rows 38 ms, 4 rows 29 ms): one more row, thrown away
            # (out of the cache again after the decode).
            self._add(plan[0][1][0], 0, self._scratch, True)

    def _add(self, token: int, position: int, seq_id: int, logits: bool) -> None:
        batch, i = self._batch, self._batch.n_tokens
        batch.token[i] = token
        batch.pos[i] = position
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits
        batch.n_tokens = i + 1

    def _sample(self, slot: _Slot, running: _Running) -> list[Event]:
        token = self._choose(running)
        # A turn marker of the chat template (`<|im_start|>`, `<start_of_turn>`...) is never
        # part of an answer: the answer ends there, as at the end-of-turn token.
        if self._ends_generation(token) or token in self._end_tokens:
            return self._ending(slot, "length" if running.closing else "stop")
        running.generated += 1
        events: list[Event] = []
        text = running.text.feed(self._piece_of(token))
        if text:
            events.append(self._text(running, text))
        if running.text.stopped:
            return [*events, *self._ending(slot, "stop")]
        full = len(slot.cached) + 1 >= self.n_ctx
        if running.closing:
            running.closing += 1
            if running.closing > CLOSING_TOKENS or full:
                return [*events, *self._ending(slot, "length")]
        elif running.generated >= running.sampling.max_tokens or full:
            if not (running.sampling.close_json and running.grammar is not None) or full:
                return [*events, *self._ending(slot, "length")]
            running.closing = 1  # go on, closing the JSON: it must still parse
        running.next_token = token
        return events

    def _choose(self, running: _Running) -> int:
        """The sequence's next token, by its own samplers (and its log probability)."""
        sampling = running.sampling
        row = running.logits_at
        if running.fast is not None:
            return running.fast.choose(self._ctx, row, running.chain)
        if running.grammar is None and sampling.top_logprobs is None:
            return int(llama.llama_sampler_sample(running.chain, self._ctx, row))
        candidates = self._candidates
        logits = candidates.logits(self._ctx, row)
        if running.grammar is None:
            token = int(llama.llama_sampler_sample(running.chain, self._ctx, row))
        elif running.closing:
            token = candidates.closing(running.chain, running.grammar, logits)
            if running.adjust is not None:
                llama.llama_sampler_accept(running.adjust, token)
        else:
            chain, ctx = running.chain, self._ctx
            token = candidates.constrained(
                running.adjust,
                chain,
                running.grammar,
                logits,
                lambda: int(llama.llama_sampler_sample(chain, ctx, row)),
            )
        if sampling.top_logprobs is not None and not self._ends_generation(token):
            running.logprobs.append(candidates.logprob(logits, token, sampling.top_logprobs))
        return token

    def _text(self, running: _Running, text: str) -> TokenText:
        logprobs = tuple(running.logprobs)
        running.logprobs.clear()
        return TokenText(running.request_id, text, logprobs)

    def _piece_of(self, token: int) -> bytes:
        """A token's bytes (llama.cpp's, kept: a token's piece never changes)."""
        piece = self._pieces.get(token)
        if piece is not None:
            return piece
        size = llama.llama_token_to_piece(self._vocab, token, self._piece, PIECE_BYTES, 0, False)
        if size < 0:  # a piece longer than the buffer: ask again with room for it
            buffer = ctypes.create_string_buffer(-size)
            size = llama.llama_token_to_piece(self._vocab, token, buffer, -size, 0, False)
            piece = buffer.raw[:size]
        else:
            piece = self._piece.raw[:size]
        self._pieces[token] = piece
        return piece

    def _ends_generation(self, token: int) -> bool:
        """An end-of-generation token of the vocabulary (kept, as the pieces are)."""
        ends = self._eog.get(token)
        if ends is None:
            ends = self._eog[token] = bool(llama.llama_vocab_is_eog(self._vocab, token))
        return ends

    def _ending(self, slot: _Slot, reason: str) -> list[Event]:
        running = slot.running
        assert running is not None
        rest = running.text.finish()
        events: list[Event] = [self._text(running, rest)] if rest else []
        return [*events, self._end(slot, reason)]

    def _end(self, slot: _Slot, reason: str) -> Finished:
        running = slot.running
        assert running is not None
        slot.running = None
        slot.last_used = next(self._clock)
        _free(running)
        return Finished(
            running.request_id,
            reason,
            running.prompt_tokens,
            running.generated,
            running.cached_tokens,
        )

    # -- slots and the cache ------------------------------------------------------------

    def _choose_slot(self, prompt: list[int]) -> _Slot:
        free = [slot for slot in self._slots if slot.running is None]
        if not free:
            raise BatchFull(f"all {len(self._slots)} slots are running")
        return max(free, key=lambda s: (_common_prefix(s.cached, prompt), -s.last_used))

    def _evict_idle(self) -> bool:
        evicted = False
        for slot in sorted(self._slots, key=lambda s: s.last_used):
            if slot.running is None and slot.cached:
                llama.llama_memory_seq_rm(self._memory, slot.seq_id, 0, -1)
                slot.cached.clear()
                evicted = True
        return evicted

    def _fail_youngest(self) -> Failed:
        slot = max(
            (s for s in self._slots if s.running is not None),
            key=lambda s: s.running.started if s.running else 0,
        )
        running = slot.running
        assert running is not None
        self._end(slot, "cancelled")
        # Its cache goes too: the others need the room.
        llama.llama_memory_seq_rm(self._memory, slot.seq_id, 0, -1)
        slot.cached.clear()
        return Failed(
            running.request_id,
            "context_full",
            "the model's context is full with the requests running now; retry shortly",
        )


def _free(running: _Running) -> None:
    llama.llama_sampler_free(running.chain)
    if running.adjust is not None:
        llama.llama_sampler_free(running.adjust)
        running.adjust = None
    if running.grammar is not None:
        llama.llama_sampler_free(running.grammar)
        running.grammar = None


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    count = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        count += 1
    return count
