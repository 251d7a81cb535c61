"""The GGUF header check: valid models pass, malformed files fail with a named reason.

Malformed files are made from the tiny model's bytes, patched at offsets found by reading the
valid (trusted) file with `gguf.GGUFReader`, or written by hand with `struct`. llama.cpp is
never given any of them: the point of the check is that it need not be.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.llm.gguf_header import (
    MAX_ARRAY_LEN,
    MAX_KV,
    MAX_TENSORS,
    GGUFHeaderError,
    check_gguf_header,
)
from tests.conftest import examples
from tests.real_model import gemma_path
from tests.tiny_gguf import write_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
T_UINT32, T_FLOAT32, T_STRING, T_ARRAY, T_UINT64 = 4, 6, 8, 9, 10
F32 = 0  # ggml type


# --- the valid tiny model and where its fields are --------------------------------------------


@dataclass(frozen=True)
class Tiny:
    path: Path
    data: bytes
    reader: gguf.GGUFReader

    def key_type_at(self, key: str) -> int:
        """Offset of the value type field of metadata `key`."""
        field = self.reader.fields[key]
        return int(field.offset) + 8 + len(key.encode())

    def tensor_at(self, name: str) -> tuple[int, int, int]:
        """Offsets of the n_dims, ggml type and data offset fields of tensor `name`."""
        tensor = next(t for t in self.reader.tensors if t.name == name)
        n_dims_at = int(tensor.field.offset) + 8 + len(name.encode())
        type_at = n_dims_at + 4 + 8 * len(tensor.shape)
        return n_dims_at, type_at, type_at + 4

    def patched(self, at: int, fmt: struct.Struct, value: int) -> bytes:
        data = bytearray(self.data)
        fmt.pack_into(data, at, value)
        return bytes(data)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    path = write_tiny_llama(
        tmp_path_factory.mktemp("tiny") / "tiny.gguf", n_embd=16, chat_template=TEMPLATE
    )
    return Tiny(path, path.read_bytes(), gguf.GGUFReader(path))


def rejected(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFHeaderError) as info:
        check_gguf_header(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) not in message
    return message


# --- hand-written GGUFs -----------------------------------------------------------------------


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return U64.pack(len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return string(key) + U32.pack(vtype) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, T_UINT32, U32.pack(value))


def kv_str(key: str, value: str) -> bytes:
    return kv(key, T_STRING, string(value))


def tensor_info(name: str, dims: list[int], gtype: int = F32, offset: int = 0) -> bytes:
    packed = b"".join(U64.pack(d) for d in dims)
    return string(name) + U32.pack(len(dims)) + packed + U32.pack(gtype) + U64.pack(offset)


def build(
    kvs: list[bytes],
    tensors: list[bytes],
    *,
    data: bytes = b"",
    alignment: int = 32,
    version: int = 3,
) -> bytes:
    head = b"GGUF" + U32.pack(version) + U64.pack(len(tensors)) + U64.pack(len(kvs))
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % alignment) + data


ARCH = kv_str("general.architecture", "llama")
ONE_TENSOR = [tensor_info("w", [8])]  # 8 float32: 32 bytes
ONE_TENSOR_DATA = b"\0" * 32


# --- valid files --------------------------------------------------------------------------------


def test_tiny_model_passes(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "t.gguf", n_embd=16, n_layer=3, chat_template=TEMPLATE)
    reader = gguf.GGUFReader(path)
    header = check_gguf_header(path)
    assert header.version == 3
    assert header.architecture == "llama"
    assert header.name == "tiny-llama-test"
    assert header.context_length == 512
    assert header.chat_template == TEMPLATE
    assert header.tensor_count == 3 + 9 * 3  # token_embd, output_norm, output + 9 a layer
    assert header.kv_count == len(reader.fields) - 3  # the reader adds GGUF.version and counts
    assert header.file_size == path.stat().st_size
    assert header.alignment == 32
    assert header.data_offset == reader.data_offset


def test_tiny_model_without_template(tmp_path: Path) -> None:
    header = check_gguf_header(write_tiny_llama(tmp_path / "t.gguf", n_embd=16, n_layer=1))
    assert header.chat_template is None
    assert header.tensor_count == 3 + 9


def test_the_real_default_model_passes() -> None:
    header = check_gguf_header(gemma_path())
    assert header.architecture == "gemma3"
    assert header.context_length == 32768
    assert header.data_offset < header.file_size


def test_hand_written_file_passes(tmp_path: Path) -> None:
    data = build(
        [ARCH, kv_u32("general.alignment", 64), kv_u32("llama.context_length", 4096)],
        ONE_TENSOR,
        data=ONE_TENSOR_DATA,
        alignment=64,
    )
    path = tmp_path / "ok.gguf"
    path.write_bytes(data)
    header = check_gguf_header(path)
    assert (header.alignment, header.data_offset % 64, header.context_length) == (64, 0, 4096)
    assert header.name is None


def test_version_2_passes(tmp_path: Path) -> None:
    path = tmp_path / "v2.gguf"
    path.write_bytes(build([ARCH], ONE_TENSOR, data=ONE_TENSOR_DATA, version=2))
    assert check_gguf_header(path).version == 2


# --- malformed files: header ----------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    assert "empty" in rejected(tmp_path, b"")


def test_magic_only(tmp_path: Path) -> None:
    assert "truncated" in rejected(tmp_path, b"GGUF")


def test_bad_magic(tiny: Tiny, tmp_path: Path) -> None:
    assert "bad magic b'GGML'" in rejected(tmp_path, b"GGML" + tiny.data[4:])


def test_short_non_gguf(tmp_path: Path) -> None:
    assert "magic" in rejected(tmp_path, b"{}")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_version(tiny: Tiny, tmp_path: Path, version: int) -> None:
    message = rejected(tmp_path, tiny.patched(4, U32, version))
    assert f"version {version} is not supported (2-3)" in message


def test_big_endian(tiny: Tiny, tmp_path: Path) -> None:
    assert "big-endian" in rejected(tmp_path, tiny.patched(4, struct.Struct(">I"), 3))


def test_huge_tensor_count(tiny: Tiny, tmp_path: Path) -> None:
    message = rejected(tmp_path, tiny.patched(8, U64, 10_000_000_000))
    assert message.startswith(f"tensor count 10000000000 is implausible (limit {MAX_TENSORS})")


def test_huge_kv_count(tiny: Tiny, tmp_path: Path) -> None:
    message = rejected(tmp_path, tiny.patched(16, U64, 2**63))
    assert "metadata count" in message
    assert f"implausible (limit {MAX_KV})" in message


def test_header_only(tiny: Tiny, tmp_path: Path) -> None:
    assert "truncated" in rejected(tmp_path, tiny.data[:24])


# --- malformed files: metadata --------------------------------------------------------------


def test_string_longer_than_file(tiny: Tiny, tmp_path: Path) -> None:
    at = tiny.key_type_at("general.name") + 4
    message = rejected(tmp_path, tiny.patched(at, U64, len(tiny.data) * 2))
    assert "'general.name'" in message
    assert "larger than the rest of the file" in message


def test_huge_string_length(tiny: Tiny, tmp_path: Path) -> None:
    at = tiny.key_type_at("general.name") + 4
    assert "limit" in rejected(tmp_path, tiny.patched(at, U64, 2**64 - 1))


def test_key_longer_than_file(tiny: Tiny, tmp_path: Path) -> None:
    at = int(tiny.reader.fields["general.name"].offset)
    data = tiny.patched(at, U64, 60_000)[: at + 1000]  # under the key limit, over the file
    assert "larger than the rest" in rejected(tmp_path, data)


def test_huge_key_length(tiny: Tiny, tmp_path: Path) -> None:
    at = int(tiny.reader.fields["general.name"].offset)
    assert "limit 65536" in rejected(tmp_path, tiny.patched(at, U64, 2**40))


def test_huge_array_count(tiny: Tiny, tmp_path: Path) -> None:
    at = tiny.key_type_at("tokenizer.ggml.tokens") + 8
    message = rejected(tmp_path, tiny.patched(at, U64, 2**62))
    assert f"array of {2**62} elements (limit {MAX_ARRAY_LEN})" in message


def test_array_count_larger_than_file(tiny: Tiny, tmp_path: Path) -> None:
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
        at = tiny.key_type_at(key) + 8
        assert "larger than the rest" in rejected(tmp_path, tiny.patched(at, U64, MAX_ARRAY_LEN))


def test_string_in_array_longer_than_file(tiny: Tiny, tmp_path: Path) -> None:
    at = tiny.key_type_at("tokenizer.ggml.tokens") + 16  # past type, element type and count
    for _ in range(5):  # step over five tokens to the sixth one's length
        at += 8 + U64.unpack_from(tiny.data, at)[0]
    message = rejected(tmp_path, tiny.patched(at, U64, 2**32))
    assert "element 5" in message
    assert "larger than the rest" in message


def test_unknown_value_type(tiny: Tiny, tmp_path: Path) -> None:
    at = tiny.key_type_at("llama.context_length")
    message = rejected(tmp_path, tiny.patched(at, U32, 13))
    assert "'llama.context_length' has unknown value type 13" in message


def test_unknown_array_element_type(tiny: Tiny, tmp_path: Path) -> None:
    at = tiny.key_type_at("tokenizer.ggml.scores") + 4
    assert "unknown array element" in rejected(tmp_path, tiny.patched(at, U32, 0xFFFF))


def test_truncated_in_metadata(tiny: Tiny, tmp_path: Path) -> None:
    at = tiny.key_type_at("tokenizer.ggml.scores")
    for cut in (at - 3, at + 2, at + 30):
        assert "truncated" in rejected(tmp_path, tiny.data[:cut])


def test_truncated_in_tensor_infos(tiny: Tiny, tmp_path: Path) -> None:
    _, type_at, _ = tiny.tensor_at("output.weight")
    message = rejected(tmp_path, tiny.data[: type_at + 2])
    assert "file is truncated: tensor 'output.weight' type ends at byte" in message


def test_empty_key(tmp_path: Path) -> None:
    assert "is empty" in rejected(tmp_path, build([kv_u32("", 1)], []))


def test_duplicate_key(tmp_path: Path) -> None:
    message = rejected(tmp_path, build([ARCH, ARCH], []))
    assert "'general.architecture' appears twice" in message


def test_nested_array(tmp_path: Path) -> None:
    inner = U32.pack(T_UINT32) + U64.pack(1) + U32.pack(7)
    nested = kv("x.nested", T_ARRAY, U32.pack(T_ARRAY) + U64.pack(1) + inner)
    assert "array of arrays" in rejected(tmp_path, build([nested], []))


def test_architecture_not_a_string(tmp_path: Path) -> None:
    message = rejected(tmp_path, build([kv_u32("general.architecture", 1)], []))
    assert "expected a string" in message


def test_template_not_utf8(tmp_path: Path) -> None:
    template = kv("tokenizer.chat_template", T_STRING, string(b"\xff\xfe"))
    assert "UTF-8" in rejected(tmp_path, build([ARCH, template], []))


def test_context_length_not_an_integer(tmp_path: Path) -> None:
    bad = kv("llama.context_length", T_FLOAT32, struct.pack("<f", 4096.0))
    assert "expected an integer" in rejected(tmp_path, build([ARCH, bad], []))
    bad = kv_str("llama.context_length", "4096")
    assert "is STRING; expected an integer" in rejected(tmp_path, build([ARCH, bad], []))
    bad = kv("llama.context_length", 5, struct.pack("<i", -1))  # INT32
    assert "expected a positive integer" in rejected(tmp_path, build([ARCH, bad], []))


def test_scores_shorter_than_vocab(tmp_path: Path) -> None:
    # llama.cpp would read scores[2] out of bounds.
    tokens = U32.pack(T_STRING) + U64.pack(3) + string("a") + string("b") + string("c")
    scores = U32.pack(T_FLOAT32) + U64.pack(2) + struct.pack("<2f", 0.0, 0.0)
    kvs = [
        kv("tokenizer.ggml.tokens", T_ARRAY, tokens),
        kv("tokenizer.ggml.scores", T_ARRAY, scores),
    ]
    assert "2 entries for 3 tokens" in rejected(tmp_path, build(kvs, []))


def test_token_types_of_wrong_type(tiny: Tiny, tmp_path: Path) -> None:
    at = tiny.key_type_at("tokenizer.ggml.token_type") + 4  # INT32 -> UINT32, same size
    message = rejected(tmp_path, tiny.patched(at, U32, T_UINT32))
    assert "array of UINT32; expected INT32" in message


def test_tokens_not_strings(tmp_path: Path) -> None:
    tokens = kv("tokenizer.ggml.tokens", T_ARRAY, U32.pack(T_UINT32) + U64.pack(1) + U32.pack(0))
    assert "expected strings" in rejected(tmp_path, build([tokens], []))


def test_alignment_not_power_of_two(tmp_path: Path) -> None:
    data = build([kv_u32("general.alignment", 48)], ONE_TENSOR, data=ONE_TENSOR_DATA, alignment=48)
    assert "general.alignment 48 is not a power of two" in rejected(tmp_path, data)
    assert "power of two" in rejected(tmp_path, build([kv_u32("general.alignment", 0)], []))


def test_alignment_wrong_type(tmp_path: Path) -> None:
    # llama.cpp aborts the whole process on this one.
    for bad in (kv("general.alignment", T_UINT64, U64.pack(32)), kv_str("general.alignment", "32")):
        assert "expected UINT32" in rejected(tmp_path, build([bad], []))


# --- malformed files: tensors ---------------------------------------------------------------


def test_unknown_ggml_type(tiny: Tiny, tmp_path: Path) -> None:
    _, type_at, _ = tiny.tensor_at("blk.0.attn_q.weight")
    for gtype in (99, 4):  # 4 was Q4_2, removed from ggml
        message = rejected(tmp_path, tiny.patched(type_at, U32, gtype))
        assert f"'blk.0.attn_q.weight' has unknown ggml type {gtype}" in message


@pytest.mark.parametrize("n_dims", [0, 5, 9])
def test_bad_dimension_count(tiny: Tiny, tmp_path: Path, n_dims: int) -> None:
    n_dims_at, _, _ = tiny.tensor_at("blk.0.attn_norm.weight")
    message = rejected(tmp_path, tiny.patched(n_dims_at, U32, n_dims))
    assert f"has {n_dims} dimensions (1-4)" in message


def test_zero_dimension(tiny: Tiny, tmp_path: Path) -> None:
    n_dims_at, _, _ = tiny.tensor_at("blk.0.attn_q.weight")
    assert "dimension 1 is 0" in rejected(tmp_path, tiny.patched(n_dims_at + 12, U64, 0))


def test_too_many_elements(tmp_path: Path) -> None:
    data = build([], [tensor_info("w", [2**32, 2**32])])
    assert "more than llama.cpp can index" in rejected(tmp_path, data)


def test_row_not_a_multiple_of_block(tmp_path: Path) -> None:
    q4_k = int(gguf.GGMLQuantizationType.Q4_K)
    data = build([], [tensor_info("w", [100, 2], q4_k)], data=b"\0" * 4096)
    assert "not a multiple of the Q4_K block size 256" in rejected(tmp_path, data)


def test_tensor_name_too_long(tmp_path: Path) -> None:
    data = build([], [tensor_info("w" * 64, [8])], data=ONE_TENSOR_DATA)
    assert "64 bytes long (limit 63)" in rejected(tmp_path, data)


def test_duplicate_tensor(tmp_path: Path) -> None:
    data = build([], [tensor_info("w", [8]), tensor_info("w", [8], offset=32)], data=b"\0" * 64)
    assert "'w' appears twice" in rejected(tmp_path, data)


def test_offset_past_end(tiny: Tiny, tmp_path: Path) -> None:
    _, _, offset_at = tiny.tensor_at("output.weight")
    beyond = (len(tiny.data) // 32 + 1) * 32
    message = rejected(tmp_path, tiny.patched(offset_at, U64, beyond))
    assert "'output.weight'" in message
    assert "past the end of the file" in message


def test_misaligned_offset(tiny: Tiny, tmp_path: Path) -> None:
    _, _, offset_at = tiny.tensor_at("blk.1.ffn_up.weight")
    offset = U64.unpack_from(tiny.data, offset_at)[0]
    message = rejected(tmp_path, tiny.patched(offset_at, U64, offset + 4))
    assert "not a multiple of the alignment 32" in message


def test_truncated_in_tensor_data(tiny: Tiny, tmp_path: Path) -> None:
    message = rejected(tmp_path, tiny.data[:-100])
    assert message.startswith("file is truncated: tensor 'output.weight' data ends at byte")
    assert f"but the file has {len(tiny.data) - 100} bytes; download" in message


def test_no_room_for_data(tmp_path: Path) -> None:
    assert "truncated" in rejected(tmp_path, build([ARCH], ONE_TENSOR))


# --- not files at all -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFHeaderError, match="cannot open the file") as info:
        check_gguf_header(tmp_path / "missing.gguf")
    assert str(tmp_path) not in str(info.value)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(GGUFHeaderError, match="not a regular file"):
        check_gguf_header(tmp_path)


def test_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(GGUFHeaderError, match="not a regular file"):
        check_gguf_header(fifo)


def test_checker_does_not_load_llama_cpp() -> None:
    code = "import sys, appliance.llm.gguf_header; sys.exit(int('llama_cpp' in sys.modules))"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30, cwd=ROOT)


# --- random damage ------------------------------------------------------------------------------


# (kind, offset, argument): shown as data in hypothesis's report when an example fails.
Step = tuple[str, int, int | bytes]
WORDS = [0, 1, 13, 63, 64, 2**31, 2**32, 2**63, 2**64 - 1]  # plausible but wrong lengths/types


def steps(size: int, metadata_end: int) -> st.SearchStrategy[list[Step]]:
    """A few byte flips, overwritten words, truncations, insertions and deletions."""
    where = st.one_of(st.integers(0, metadata_end), st.integers(0, size - 1))  # mostly metadata
    step = st.one_of(
        st.tuples(st.just("flip"), where, st.integers(0, 7)),
        st.tuples(st.just("word"), where, st.sampled_from(WORDS)),
        st.tuples(st.just("truncate"), where, st.just(0)),
        st.tuples(st.just("insert"), where, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), where, st.integers(1, 16)),
    )
    return st.lists(step, min_size=1, max_size=4)


def mutate(valid: bytes, plan: list[Step]) -> bytes:
    data = bytearray(valid)
    for kind, at, arg in plan:
        if kind == "flip" and at < len(data):
            assert isinstance(arg, int)
            data[at] ^= 1 << arg
        elif kind == "word" and at + 8 <= len(data):
            assert isinstance(arg, int)
            U64.pack_into(data, at, arg)
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            assert isinstance(arg, bytes)
            data[at:at] = arg
        elif kind == "delete":
            assert isinstance(arg, int)
            del data[at : at + arg]
    return bytes(data)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, int]:
    folder = tmp_path_factory.mktemp("fuzz")
    source = write_tiny_llama(folder / "src.gguf", n_embd=8, n_layer=1, chat_template=TEMPLATE)
    return folder / "mutant.gguf", source.read_bytes(), gguf.GGUFReader(source).data_offset


@settings(max_examples=200, deadline=500, database=None)
@given(data=st.data())
def test_random_damage_is_refused_cleanly(
    small: tuple[Path, bytes, int], data: st.DataObject
) -> None:
    """Damaged files pass or raise GGUFHeaderError: never another exception, never a hang."""
    path, valid, metadata_end = small
    path.write_bytes(mutate(valid, data.draw(steps(len(valid), metadata_end))))
    try:
        check_gguf_header(path)
    except GGUFHeaderError as exc:
        message = str(exc)
        assert message
        assert "\n" not in message
        assert str(path.parent) not in message


def test_truncation_at_every_offset_is_refused(small: tuple[Path, bytes, int]) -> None:
    """Every byte of the header and metadata is needed, and tensor data must be complete:
    every offset in the first KiB (header, keys, the vocabulary's start), then one in 31
    through the metadata and one in 509 through the tensor data."""
    path, valid, metadata_end = small
    cuts = [*range(1024), *range(1024, metadata_end, 31), *range(metadata_end, len(valid), 509)]
    for cut in cuts:
        path.write_bytes(valid[:cut])
        with pytest.raises(GGUFHeaderError) as info:
            check_gguf_header(path)
        assert "\n" not in str(info.value)


def u64_fields(valid: bytes, reader: gguf.GGUFReader) -> list[int]:
    """Offsets of every 64-bit field of the header: counts, lengths, dimensions, offsets."""
    base = reader.data.ctypes.data
    fields = [*reader.fields.values(), *(tensor.field for tensor in reader.tensors)]
    return sorted(
        part.ctypes.data - base
        for field in fields
        for part in field.parts
        if part.dtype == np.uint64 and part.size == 1
    )


@pytest.fixture(scope="module")
def length_fields(small: tuple[Path, bytes, int]) -> list[int]:
    path, valid, _ = small
    source = path.with_name("src.gguf")
    return u64_fields(valid, gguf.GGUFReader(source))


@settings(max_examples=examples(150), deadline=None, database=None)
@given(data=st.data(), value=st.sampled_from([2**32 + 7, 2**40, 2**62, 2**63, 2**64 - 1]))
def test_a_huge_count_or_length_anywhere_is_refused_without_allocating(
    small: tuple[Path, bytes, int], length_fields: list[int], data: st.DataObject, value: int
) -> None:
    path, valid, _ = small
    at = data.draw(st.sampled_from(length_fields))
    damaged = bytearray(valid)
    U64.pack_into(damaged, at, value)
    path.write_bytes(damaged)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(GGUFHeaderError):
            check_gguf_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 1.0
    assert peak < 1024 * 1024  # a few read windows of 64 KiB at most


def test_the_length_fields_are_found(
    length_fields: list[int], small: tuple[Path, bytes, int]
) -> None:
    # Header counts, a length per key and string, and per tensor a name length, dimensions
    # and an offset: hundreds of places in the tiny model.
    assert length_fields[:2] == [8, 16]
    assert len(length_fields) > 300
