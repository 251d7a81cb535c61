"""Embeddings in the inference worker: a second llama.cpp context on the loaded model.

The context is made with embeddings on the first time a request asks (its memory is spent
only by boxes that embed) and pools each input into one vector: by the pooling the GGUF
names, else the mean of its tokens' hidden states. Inputs go through it in batches of at
most EMBED_PACK tokens (one decode each, several inputs as sequences of their own; a
longer input alone, up to `n_batch`), so the worker can run a generation step between
two batches: a long embedding request slows the
running generations a little, it never stops them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import llama_cpp as llama
import numpy as np

# Tokens of one embedding decode at most, and so the longest input (llama.cpp pools an
# input only within one batch).
EMBED_BATCH: Final = 2048
# Inputs of one decode at most (sequences of the embedding context).
EMBED_SEQUENCES: Final = 64
# Tokens of several inputs packed into one decode, at most: attention spans the whole
# batch, so its cost grows with the square of what is packed (2048 tokens of short texts
# in one decode are several times slower than four decodes of 512).
EMBED_PACK: Final = 512


class EmbedInputError(ValueError):
    """An input the model cannot embed; the message names it by its index."""


@dataclass(frozen=True)
class Part:
    """The vectors of inputs `first` .. `first + count - 1` (float32, count x dims)."""

    first: int
    count: int
    dims: int
    vectors: bytes
    tokens: int


class Embedder:
    """Embeddings of one loaded model (`model` is llama-cpp-python's LlamaModel)."""

    def __init__(self, model: Any, *, n_ctx: int, n_threads: int) -> None:
        from llama_cpp._internals import LlamaContext  # untyped library

        self.n_batch = min(EMBED_BATCH, n_ctx)
        self.dims: int = llama.llama_model_n_embd(model.model)
        self.n_vocab: int = llama.llama_vocab_n_tokens(model.vocab)
        params = llama.llama_context_default_params()
        params.n_ctx = self.n_batch
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = min(EMBED_SEQUENCES, llama.llama_max_parallel_sequences())
        params.kv_unified = True
        params.embeddings = True
        params.n_threads = params.n_threads_batch = n_threads
        if not _pools(model):
            params.pooling_type = llama.LLAMA_POOLING_TYPE_MEAN
        self._seqs = params.n_seq_max
        self._context: Any = LlamaContext(model=model, params=params, verbose=True)
        self._ctx = self._context.ctx
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(self.n_batch, 0, 1)

    def close(self) -> None:
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        self._context.close()

    def check(self, inputs: list[list[int]]) -> None:
        """EmbedInputError for an input that is empty, too long or holds unknown tokens."""
        for index, tokens in enumerate(inputs):
            if not tokens:
                raise EmbedInputError(f"input[{index}] is empty; send text or token ids")
            if len(tokens) > self.n_batch:
                raise EmbedInputError(
                    f"input[{index}] is {len(tokens)} tokens; this model embeds at most "
                    f"{self.n_batch} tokens an input. Split it"
                )
            if min(tokens) < 0 or max(tokens) >= self.n_vocab:
                raise EmbedInputError(
                    f"input[{index}] holds a token id outside this model's vocabulary "
                    f"(0 to {self.n_vocab - 1})"
                )

    def parts(self, inputs: list[list[int]]) -> Iterator[Part]:
        """The inputs' vectors, one batch (one decode) at a time."""
        first = 0
        while first < len(inputs):
            count, used = 0, 0
            # At least one input a decode, however long (up to n_batch).
            while (
                first + count < len(inputs)
                and count < self._seqs
                and (count == 0 or used + len(inputs[first + count]) <= EMBED_PACK)
            ):
                used += len(inputs[first + count])
                count += 1
            yield self._decode(inputs[first : first + count], first)
            first += count

    def _decode(self, inputs: list[list[int]], first: int) -> Part:
        batch = self._batch
        batch.n_tokens = 0
        for seq, tokens in enumerate(inputs):
            for position, token in enumerate(tokens):
                i = batch.n_tokens
                batch.token[i] = token
                batch.pos[i] = position
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = True
                batch.n_tokens = i + 1
        llama.llama_memory_clear(self._memory, True)
        status = llama.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} for embeddings")
        vectors = np.empty((len(inputs), self.dims), dtype="<f4")
        for seq in range(len(inputs)):
            pointer = llama.llama_get_embeddings_seq(self._ctx, seq)
            if not pointer:
                raise RuntimeError("llama.cpp pooled no embedding")
            vectors[seq] = np.ctypeslib.as_array(pointer, shape=(self.dims,))
        return Part(first, len(inputs), self.dims, vectors.tobytes(), sum(map(len, inputs)))


def _pools(model: Any) -> bool:
    """Whether the GGUF names a pooling of its own (an embedding model)."""
    metadata: dict[str, str] = model.metadata()
    arch = metadata.get("general.architecture", "")
    pooling = metadata.get(f"{arch}.pooling_type")
    return pooling not in (None, "", "0")
