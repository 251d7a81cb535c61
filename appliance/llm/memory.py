"""How much memory a resident model needs, estimated from its GGUF header, and the budget.

A worker holds the model's weights (read into its memory when it loads the model: see
appliance.llm.huge_pages), its KV cache (`n_ctx` cells shared by every slot: the cache is
unified), llama.cpp's compute buffers and the worker process itself. llama.cpp reserves its
compute buffer for a whole batch of logits, but the batcher asks for at most one row per
slot (plus a padding row), so only that part is counted: the rest is address space never
touched. The figures are checked against real RSS in the tests
(tests/test_resident_models.py); the pool counts the larger of the estimate and a worker's
real RSS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import psutil

from appliance.llm.gguf_header import GGUFHeader

MB: Final = 1024 * 1024
# Tokens of one decode step at most (prompt chunks and next tokens of all sequences).
N_BATCH: Final = 512
# The worker process before any model: Python, llama.cpp's libraries, thread stacks.
WORKER_OVERHEAD_BYTES: Final = 64 * MB
# Weights as llama.cpp holds them: alignment, and CPU repacking of some quantizations.
WEIGHTS_FACTOR: Final = 1.1
# KV cache cells are f16.
KV_BYTES_PER_VALUE: Final = 2
# Activations of one batch, in floats per token and embedding dimension (measured on
# SmolLM2 and Gemma 3, with room to spare: RSS grows as long prompts touch more of them).
ACTIVATION_FLOATS_PER_EMBEDDING: Final = 48
FLOAT_BYTES: Final = 4
# Without a budget, resident models may use this share of the box's memory.
DEFAULT_BUDGET_SHARE: Final = 0.5


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one resident model needs, by part."""

    weights: int
    kv_cache: int
    compute: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead

    def describe(self) -> str:
        return (
            f"{mb(self.total)} MB (weights {mb(self.weights)} MB, KV cache "
            f"{mb(self.kv_cache)} MB, buffers {mb(self.compute + self.overhead)} MB)"
        )


def estimate(header: GGUFHeader, *, n_ctx: int, parallel: int, n_batch: int) -> MemoryEstimate:
    """What a worker with this model, context, slots and batch size needs at most."""
    shape = header.shape
    embedding = shape.embedding_length or 0
    heads = shape.head_count or 0
    kv_heads = shape.head_count_kv or heads
    head_size = embedding // heads if heads else 0
    key = shape.key_length or head_size
    value = shape.value_length or head_size
    layers = shape.block_count or 0
    kv_cache = layers * n_ctx * kv_heads * (key + value) * KV_BYTES_PER_VALUE
    activations = n_batch * embedding * ACTIVATION_FLOATS_PER_EMBEDDING * FLOAT_BYTES
    # Logits of one row per slot and the padding row, in the graph and in the output buffer.
    logits = header.vocab_size * (parallel + 1) * FLOAT_BYTES * 2
    return MemoryEstimate(
        weights=math.ceil(header.weights_bytes * WEIGHTS_FACTOR),
        kv_cache=kv_cache,
        compute=activations + logits,
        overhead=WORKER_OVERHEAD_BYTES,
    )


def default_budget() -> int:
    """APPLIANCE_MODEL_MEMORY when it is not set: a share of the box's memory."""
    return int(psutil.virtual_memory().total * DEFAULT_BUDGET_SHARE)


def mb(size: int) -> int:
    """Bytes in MB, rounded up (a figure an operator compares with a budget)."""
    return -(-size // MB)
