"""Write a tiny, valid llama-architecture GGUF model with random weights.

Tests and benchmarks need a real GGUF that llama.cpp loads in well under a second and decodes
with the same code paths as a real model (so a broken llama.cpp build fails at once), without
downloading hundreds of megabytes. The output is gibberish; only the plumbing is real.

Run as a script to write one: ``python tests/tiny_gguf.py /tmp/tiny.gguf``.
"""

from __future__ import annotations

import pathlib
import sys

import gguf
import numpy as np
import numpy.typing as npt

# Common English words. Each becomes a "▁word" piece (SentencePiece marks a leading space with ▁),
# along with every prefix ("▁w", "▁wo", ...): SentencePiece builds a word by merging adjacent
# pieces, so a word is only reachable as one token if each intermediate merge is in the vocab.
_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have this from
or had by hot word but what some we can out other were all there when up use your how said an
each she which do their time if will way about many then them write would like so these her long
make thing see him two has look more day could go come did number sound no most people my over
know water than call first who may down side been now find any new work part take get place made
live where after back hello assistant question answer blue model test yes
"""

_SPECIAL = ("<unk>", "<s>", "</s>")


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Build a SentencePiece-style vocabulary: specials, 256 byte tokens, then word pieces."""
    tokens: list[str] = list(_SPECIAL)
    scores: list[float] = [0.0, 0.0, 0.0]
    types: list[int] = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for byte in range(256):  # byte fallback: any text tokenizes, even with this tiny vocab
        tokens.append(f"<0x{byte:02X}>")
        scores.append(0.0)
        types.append(gguf.TokenType.BYTE)

    pieces: list[str] = ["▁"]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += list(".,!?'-:;()0123456789")
    pieces += [f"▁{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    pieces += [f"▁{word[:n]}" for word in _WORDS.split() for n in range(1, len(word) + 1)]
    seen: set[str] = set(tokens)
    for piece in pieces:
        if piece in seen:
            continue
        seen.add(piece)
        tokens.append(piece)
        scores.append(-float(len(tokens)))  # SentencePiece convention: earlier = more frequent
        types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def write_tiny_llama(
    path: pathlib.Path,
    *,
    seed: int = 0,
    n_embd: int = 64,
    n_layer: int = 2,
    chat_template: str | None = None,
    context_length: int = 512,
) -> pathlib.Path:
    """Write a tiny random-weight llama GGUF to ``path`` and return ``path``.

    The same ``seed`` gives the same weights. There are 4 query heads sharing 2 KV heads
    (grouped-query attention, as in current llama models). numpy shapes are (rows, cols) and
    GGUF stores dimensions reversed, so ``attn_q`` is numpy ``(n_head * head_dim, n_embd)``.
    """
    path = pathlib.Path(path)
    n_head = 4
    if n_embd % n_head or (n_embd // n_head) % 2:
        raise ValueError(f"n_embd must be a multiple of {2 * n_head}, got {n_embd}")
    n_head_kv = 2
    head_dim = n_embd // n_head
    n_embd_kv = n_head_kv * head_dim
    n_ff = 2 * n_embd
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> npt.NDArray[np.float32]:
        # Scaled by 1/sqrt(fan_in) so activations stay in a sane range through the layers.
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)

    def norm() -> npt.NDArray[np.float32]:
        return np.ones(n_embd, dtype=np.float32)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama-test")
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    # Embedding scaled up a little so random logits are not all near zero.
    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd) * 4.0)
    for i in range(n_layer):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", norm())
        writer.add_tensor(f"{blk}.attn_q.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"{blk}.attn_k.weight", weight(n_embd_kv, n_embd))
        writer.add_tensor(f"{blk}.attn_v.weight", weight(n_embd_kv, n_embd))
        writer.add_tensor(f"{blk}.attn_output.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"{blk}.ffn_norm.weight", norm())
        writer.add_tensor(f"{blk}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(n_vocab, n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUTPUT.gguf")
    print(write_tiny_llama(pathlib.Path(sys.argv[1])))
