"""The GGUF header check at its exact boundaries: each limit's last allowed value passes and
the next one is refused with the limit named, and each value type is skipped by its own size.

Files are written by hand with `struct`; numbers are spelled out here rather than imported
from the checker, so that a changed limit or element size fails a test.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import pytest

from appliance.llm.gguf_header import GGUFHeader, GGUFHeaderError, check_gguf_header

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
# GGUF value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = range(10)
UINT64, INT64, FLOAT64 = 10, 11, 12
SIZES = {
    UINT8: 1,
    INT8: 1,
    UINT16: 2,
    INT16: 2,
    UINT32: 4,
    INT32: 4,
    FLOAT32: 4,
    BOOL: 1,
    UINT64: 8,
    INT64: 8,
    FLOAT64: 8,
}
NAMES = {
    UINT8: "UINT8",
    INT8: "INT8",
    UINT16: "UINT16",
    INT16: "INT16",
    UINT32: "UINT32",
    INT32: "INT32",
    FLOAT32: "FLOAT32",
    BOOL: "BOOL",
    STRING: "STRING",
    ARRAY: "ARRAY",
    UINT64: "UINT64",
    INT64: "INT64",
    FLOAT64: "FLOAT64",
}
FORMATS = {
    UINT8: "<B",
    INT8: "<b",
    UINT16: "<H",
    INT16: "<h",
    UINT32: "<I",
    INT32: "<i",
    UINT64: "<Q",
    INT64: "<q",
}
F32, Q4_0 = 0, 2  # ggml types: F32 (1 element, 4 bytes a block), Q4_0 (32 elements, 18 bytes)
CORRUPT = "the file is corrupt; download or convert the model again"
REFETCH = "download or copy the model again"
INT64_MAX = 2**63 - 1
MIB = 1024 * 1024


def string(raw: str | bytes) -> bytes:
    data = raw.encode() if isinstance(raw, str) else raw
    return U64.pack(len(data)) + data


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return string(key) + U32.pack(vtype) + payload


def kv_str(key: str, value: str | bytes) -> bytes:
    return kv(key, STRING, string(value))


def array(key: str, etype: int, count: int, payload: bytes) -> bytes:
    return kv(key, ARRAY, U32.pack(etype) + U64.pack(count) + payload)


def tensor(name: str | bytes, dims: list[int], gtype: int = F32, offset: int = 0) -> bytes:
    packed = b"".join(U64.pack(d) for d in dims)
    return string(name) + U32.pack(len(dims)) + packed + U32.pack(gtype) + U64.pack(offset)


def gguf(
    kvs: list[bytes],
    tensors: tuple[bytes, ...] | list[bytes] = (),
    *,
    data: bytes = b"",
    kv_count: int | None = None,
    tensor_count: int | None = None,
    alignment: int = 32,
) -> bytes:
    head = (
        b"GGUF"
        + U32.pack(3)
        + U64.pack(len(tensors) if tensor_count is None else tensor_count)
        + U64.pack(len(kvs) if kv_count is None else kv_count)
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % alignment) + data


NAME_AFTER = kv_str("general.name", "after")  # read correctly only if all before was skipped


def passes(tmp_path: Path, data: bytes) -> GGUFHeader:
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    return check_gguf_header(path)


def refused(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFHeaderError) as caught:
        check_gguf_header(path)
    return str(caught.value)


@pytest.mark.parametrize("vtype", sorted(SIZES))
def test_every_scalar_type_is_skipped_by_its_own_size(tmp_path: Path, vtype: int) -> None:
    header = passes(tmp_path, gguf([kv("x.value", vtype, b"\1" * SIZES[vtype]), NAME_AFTER]))
    assert header.name == "after"
    # One byte short of the value is a truncated file, not a misread of the next key.
    short = gguf([kv("x.value", vtype, b"\1" * (SIZES[vtype] - 1))], alignment=1)
    message = refused(tmp_path, short)
    assert "metadata key 'x.value'" in message and "truncated" in message


@pytest.mark.parametrize("etype", sorted(SIZES))
def test_every_array_element_type_is_skipped_by_its_own_size(tmp_path: Path, etype: int) -> None:
    payload = b"\1" * (SIZES[etype] * 3)
    header = passes(tmp_path, gguf([array("x.list", etype, 3, payload), NAME_AFTER]))
    assert header.name == "after"
    message = refused(tmp_path, gguf([array("x.list", etype, 3, payload[:-1])], alignment=1))
    assert message == (
        f"metadata key 'x.list' array of 3 {NAMES[etype]} needs {SIZES[etype] * 3} bytes, "
        f"larger than the rest of the file ({SIZES[etype] * 3 - 1} bytes); the file is "
        f"truncated or corrupt; {REFETCH}"
    )


@pytest.mark.parametrize(
    ("vtype", "value"),
    [
        (UINT8, 200),
        (INT8, 100),
        (UINT16, 60_000),
        (INT16, 30_000),
        (UINT32, 4_000_000_000),
        (INT32, 2_000_000_000),
        (UINT64, 2**40 + 3),
        (INT64, 2**62),
    ],
)
def test_the_context_length_is_read_from_any_integer_type(
    tmp_path: Path, vtype: int, value: int
) -> None:
    packed = struct.pack(FORMATS[vtype], value)
    data = gguf(
        [kv_str("general.architecture", "llama"), kv("llama.context_length", vtype, packed)]
    )
    assert passes(tmp_path, data).context_length == value


@pytest.mark.parametrize(("vtype", "value"), [(INT8, -1), (INT16, -300), (INT64, 0), (UINT8, 0)])
def test_a_context_length_below_one_is_refused(tmp_path: Path, vtype: int, value: int) -> None:
    packed = struct.pack(FORMATS[vtype], value)
    data = gguf(
        [kv("llama.context_length", vtype, packed), kv_str("general.architecture", "llama")]
    )
    assert refused(tmp_path, data) == (
        f"llama.context_length is {value}; expected a positive integer; {CORRUPT}"
    )


def test_a_context_length_of_another_architecture_or_type_is_not_taken(tmp_path: Path) -> None:
    other = gguf(
        [kv_str("general.architecture", "llama"), kv("gemma.context_length", UINT32, U32.pack(9))]
    )
    assert passes(tmp_path, other).context_length is None
    assert (
        passes(tmp_path, gguf([kv("llama.context_length", UINT32, U32.pack(9))])).context_length
        is None
    )
    floating = gguf(
        [kv_str("general.architecture", "llama"), kv("llama.context_length", FLOAT32, b"\0\0\x80?")]
    )
    assert refused(tmp_path, floating) == (
        f"llama.context_length is FLOAT32; expected an integer; {CORRUPT}"
    )
    assert (
        passes(
            tmp_path,
            gguf(
                [
                    kv("llama.context_length", UINT32, U32.pack(1)),
                    kv_str("general.architecture", "llama"),
                ]
            ),
        ).context_length
        == 1
    )


def test_the_header_reports_the_strings_the_counts_and_the_data_offset(tmp_path: Path) -> None:
    data = gguf(
        [
            kv_str("general.architecture", "llama"),
            kv_str("general.name", "caf\u00e9"),
            kv_str("tokenizer.chat_template", "{{ x }}"),
        ],
        [tensor("a", [8]), tensor("b", [64], Q4_0, offset=32)],
        data=b"\0" * (32 + 36),
    )
    header = passes(tmp_path, data)
    body = len(data) - (32 + 36)
    assert (header.architecture, header.name, header.chat_template) == (
        "llama",
        "caf\u00e9",
        "{{ x }}",
    )
    assert (header.version, header.tensor_count, header.kv_count) == (3, 2, 3)
    assert (header.file_size, header.alignment, header.data_offset) == (len(data), 32, body)
    assert body % 32 == 0


def test_a_header_of_23_bytes_is_truncated_and_24_is_a_header(tmp_path: Path) -> None:
    assert refused(tmp_path, gguf([])[:23]) == (
        f"file is truncated: 23 bytes is shorter than the 24-byte GGUF header; {REFETCH}"
    )
    header = passes(tmp_path, gguf([], alignment=1))
    assert (header.file_size, header.data_offset, header.alignment) == (24, 32, 32)


@pytest.mark.parametrize(("size", "ok"), [(1 << 40, True), ((1 << 40) + 1, False)])
def test_a_file_up_to_one_tib_is_plausible(tmp_path: Path, size: int, ok: bool) -> None:
    path = tmp_path / "big.gguf"
    path.write_bytes(gguf([NAME_AFTER]))
    with path.open("r+b") as handle:
        handle.truncate(size)  # sparse: no disk is used
    if ok:
        assert check_gguf_header(path).file_size == size
    else:
        with pytest.raises(GGUFHeaderError) as caught:
            check_gguf_header(path)
        assert str(caught.value) == (
            f"file size {size} bytes is implausible (limit 1099511627776); expected a .gguf model"
        )


@pytest.mark.parametrize("version", [2, 3])
def test_versions_2_and_3_pass(tmp_path: Path, version: int) -> None:
    data = bytearray(gguf([]))
    U32.pack_into(data, 4, version)
    assert passes(tmp_path, bytes(data)).version == version


@pytest.mark.parametrize("version", [1, 4])
def test_versions_around_2_and_3_are_refused(tmp_path: Path, version: int) -> None:
    data = bytearray(gguf([]))
    U32.pack_into(data, 4, version)
    assert refused(tmp_path, bytes(data)) == (
        f"GGUF version {version} is not supported (2-3); convert the model with a current llama.cpp"
    )


@pytest.mark.parametrize("version", [2, 3])
def test_big_endian_versions_are_named(tmp_path: Path, version: int) -> None:
    data = bytearray(gguf([]))
    struct.pack_into(">I", data, 4, version)
    assert refused(tmp_path, bytes(data)).startswith("big-endian GGUF is not supported")


def test_the_tensor_count_limit_is_100000(tmp_path: Path) -> None:
    assert refused(tmp_path, gguf([], tensor_count=100_001)) == (
        f"tensor count 100001 is implausible (limit 100000); {CORRUPT}"
    )
    # 100000 is not refused by the limit: the file then ends where the first tensor begins.
    assert refused(tmp_path, gguf([], tensor_count=100_000, alignment=1)).startswith(
        "file is truncated: tensor 0 name length ends at byte 32"
    )


def test_the_metadata_count_limit_is_100000(tmp_path: Path) -> None:
    assert refused(tmp_path, gguf([], kv_count=100_001)) == (
        f"metadata count 100001 is implausible (limit 100000); {CORRUPT}"
    )
    kvs = [kv(f"k{i}", UINT8, b"\0") for i in range(100_000)]
    assert passes(tmp_path, gguf(kvs)).kv_count == 100_000


def test_the_array_length_limit_is_ten_million(tmp_path: Path) -> None:
    ten_million = array("x.big", UINT8, 10_000_000, bytes(10_000_000))
    assert passes(tmp_path, gguf([ten_million, NAME_AFTER])).name == "after"
    over = array("x.big", UINT8, 10_000_001, b"")
    assert refused(tmp_path, gguf([over])) == (
        f"metadata key 'x.big' has an array of 10000001 elements (limit 10000000); {CORRUPT}"
    )


def test_the_key_length_limit_is_64_kib(tmp_path: Path) -> None:
    longest = "k" * (64 * 1024)
    assert passes(tmp_path, gguf([kv(longest, UINT8, b"\0"), NAME_AFTER])).name == "after"
    message = refused(tmp_path, gguf([kv(longest + "k", UINT8, b"\0")]))
    assert message == f"metadata key 0 is 65537 bytes long (limit 65536); {CORRUPT}"


def test_the_string_length_limit_is_16_mib(tmp_path: Path) -> None:
    longest = bytes(16 * MIB)
    assert passes(tmp_path, gguf([kv_str("x.blob", longest), NAME_AFTER])).name == "after"
    message = refused(tmp_path, gguf([kv_str("x.blob", longest + b"\0")]))
    assert message == f"metadata key 'x.blob' is 16777217 bytes long (limit 16777216); {CORRUPT}"
    in_array = array("x.strings", STRING, 2, string(b"ab") + string(longest + b"\0"))
    assert refused(tmp_path, gguf([in_array])) == (
        f"metadata key 'x.strings' element 1 is 16777217 bytes long (limit 16777216); {CORRUPT}"
    )
    ok_array = array("x.strings", STRING, 2, string(b"ab") + string(longest))
    assert passes(tmp_path, gguf([ok_array, NAME_AFTER])).name == "after"


def test_metadata_may_reach_64_mib_and_not_one_byte_more(tmp_path: Path) -> None:
    head = 24
    blob_key = kv_str("x.a", b"")  # 8 + 3 + 4 + 8 bytes before the value
    overhead = len(blob_key)
    # Three strings of 16 MiB, then one that ends exactly at 64 MiB.
    blobs = [kv_str(f"x.{c}", bytes(16 * MIB)) for c in "abc"]
    last = 64 * MIB - head - sum(len(b) for b in blobs) - overhead
    exact = gguf([*blobs, kv_str("x.d", bytes(last))], alignment=1)
    assert len(exact) == 64 * MIB
    assert passes(tmp_path, exact).kv_count == 4
    over = gguf([*blobs, kv_str("x.d", bytes(last + 1))], alignment=1)
    assert refused(tmp_path, over) == (
        f"metadata is larger than 67108864 bytes (at metadata key 'x.d'), more than any real "
        f"model has; {CORRUPT}"
    )


def test_the_tensor_name_limit_is_63_bytes(tmp_path: Path) -> None:
    assert passes(tmp_path, gguf([], [tensor("w" * 63, [8])], data=bytes(32))).tensor_count == 1
    assert refused(tmp_path, gguf([], [tensor("w" * 64, [8])], data=bytes(32))) == (
        f"tensor 0 name is 64 bytes long (limit 63); {CORRUPT}"
    )


@pytest.mark.parametrize("n_dims", [1, 2, 3, 4])
def test_one_to_four_dimensions_pass(tmp_path: Path, n_dims: int) -> None:
    data = gguf([], [tensor("w", [8] + [1] * (n_dims - 1))], data=bytes(32))
    assert passes(tmp_path, data).tensor_count == 1


def test_dimensions_up_to_int64_max_and_elements_below_it(tmp_path: Path) -> None:
    assert refused(tmp_path, gguf([], [tensor("w", [INT64_MAX + 1])])) == (
        f"tensor 'w' dimension 0 is {INT64_MAX + 1}; expected 1 or more; {CORRUPT}"
    )
    assert refused(tmp_path, gguf([], [tensor("w", [INT64_MAX])])) == (
        f"tensor 'w' has {INT64_MAX} elements, more than llama.cpp can index; {CORRUPT}"
    )
    # One element less may be indexed: it is refused only for its data, which is missing.
    assert refused(tmp_path, gguf([], [tensor("w", [INT64_MAX - 1])])).startswith(
        f"file is truncated: tensor 'w' data ends at byte {64 + (INT64_MAX - 1) * 4} "
    )


def test_tensor_data_may_end_exactly_at_the_end_of_the_file(tmp_path: Path) -> None:
    # Q4_0: 64 elements are 2 blocks of 18 bytes.
    exact = gguf([], [tensor("q", [64], Q4_0)], data=bytes(36))
    assert passes(tmp_path, exact).file_size == len(exact)
    message = refused(tmp_path, exact[:-1])
    assert message == (
        f"file is truncated: tensor 'q' data ends at byte {len(exact)} but the file has "
        f"{len(exact) - 1} bytes; {REFETCH}"
    )
    at_end = gguf([], [tensor("e", [8], offset=32)], data=bytes(32))
    assert refused(tmp_path, at_end).startswith("file is truncated: tensor 'e' data ends")
    past = gguf([], [tensor("e", [8], offset=64)], data=bytes(32))
    assert refused(tmp_path, past) == (
        f"tensor 'e' offset 64 points past the end of the file (data starts at byte 64, the "
        f"file has 96 bytes); {CORRUPT}"
    )


def test_the_default_alignment_is_32_and_a_set_one_is_used(tmp_path: Path) -> None:
    misaligned = gguf([], [tensor("w", [8], offset=16)], data=bytes(64))
    assert refused(tmp_path, misaligned) == (
        f"tensor 'w' offset 16 is not a multiple of the alignment 32; {CORRUPT}"
    )
    sixteen = kv("general.alignment", UINT32, U32.pack(16))
    header = passes(
        tmp_path, gguf([sixteen], [tensor("w", [8], offset=16)], data=bytes(48), alignment=16)
    )
    assert (header.alignment, header.data_offset % 16) == (16, 0)
    one = kv("general.alignment", UINT32, U32.pack(1))
    assert passes(tmp_path, gguf([one], alignment=1)).alignment == 1


@pytest.mark.parametrize("value", [0, 3, 48])
def test_an_alignment_that_is_not_a_power_of_two_is_refused(tmp_path: Path, value: int) -> None:
    data = gguf([kv("general.alignment", UINT32, U32.pack(value))])
    assert refused(tmp_path, data) == (
        f"general.alignment {value} is not a power of two; {CORRUPT}"
    )


@pytest.mark.parametrize(
    ("vtype", "payload"), [(INT32, struct.pack("<i", 32)), (FLOAT32, b"\0" * 4)]
)
def test_an_alignment_of_another_type_is_refused(
    tmp_path: Path, vtype: int, payload: bytes
) -> None:
    data = gguf([kv("general.alignment", vtype, payload)])
    assert refused(tmp_path, data) == (
        f"general.alignment is {NAMES[vtype]}; expected UINT32; {CORRUPT}"
    )


def test_names_in_messages_are_cut_at_80_characters(tmp_path: Path) -> None:
    key = "k" * 81
    data = gguf([kv(key, UINT8, b"\0"), kv(key, UINT8, b"\0")])
    assert refused(tmp_path, data) == (f"metadata key '{'k' * 80}...' appears twice; {CORRUPT}")
    exact = "k" * 80
    data = gguf([kv(exact, UINT8, b"\0"), kv(exact, UINT8, b"\0")])
    assert refused(tmp_path, data) == f"metadata key '{exact}' appears twice; {CORRUPT}"
    raw = gguf([kv(b"bad\xff", UINT8, b"\0"), kv(b"bad\xff", UINT8, b"\0")])
    assert refused(tmp_path, raw) == f"metadata key 'bad\\\\xff' appears twice; {CORRUPT}"


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_tokens_and_merges_must_be_string_arrays(tmp_path: Path, key: str) -> None:
    assert refused(tmp_path, gguf([array(key, INT32, 1, bytes(4))])) == (
        f"metadata key '{key}' is an array of INT32; expected strings; {CORRUPT}"
    )
    assert refused(tmp_path, gguf([kv_str(key, "a")])) == (
        f"metadata key '{key}' is STRING; expected an array; {CORRUPT}"
    )
    assert passes(tmp_path, gguf([array(key, STRING, 1, string("a")), NAME_AFTER])).name == "after"


@pytest.mark.parametrize(
    ("key", "etype"), [("tokenizer.ggml.scores", FLOAT32), ("tokenizer.ggml.token_type", INT32)]
)
def test_per_token_arrays_need_their_type_and_an_entry_per_token(
    tmp_path: Path, key: str, etype: int
) -> None:
    tokens = array("tokenizer.ggml.tokens", STRING, 3, string("a") + string("b") + string("c"))
    enough = array(key, etype, 3, bytes(12))
    assert passes(tmp_path, gguf([tokens, enough])).kv_count == 2
    more = array(key, etype, 4, bytes(16))
    assert passes(tmp_path, gguf([more, tokens])).kv_count == 2
    short = array(key, etype, 2, bytes(8))
    assert refused(tmp_path, gguf([tokens, short])) == (
        f"metadata key '{key}' has 2 entries for 3 tokens; {CORRUPT}"
    )
    other = UINT32 if etype == INT32 else INT32
    assert refused(tmp_path, gguf([tokens, array(key, other, 3, bytes(12))])) == (
        f"metadata key '{key}' is an array of {NAMES[other]}; expected {NAMES[etype]}; {CORRUPT}"
    )
    assert refused(tmp_path, gguf([kv(key, etype, bytes(4))])) == (
        f"metadata key '{key}' is {NAMES[etype]}; expected an array; {CORRUPT}"
    )
    assert passes(tmp_path, gguf([short])).kv_count == 1  # without tokens nothing is indexed
    assert passes(tmp_path, gguf([array(key, etype, 0, b"")])).kv_count == 1


@pytest.mark.parametrize("key", ["general.architecture", "general.name", "tokenizer.chat_template"])
def test_the_named_strings_must_be_strings(tmp_path: Path, key: str) -> None:
    assert refused(tmp_path, gguf([kv(key, UINT32, bytes(4))])) == (
        f"metadata key '{key}' is UINT32; expected a string; {CORRUPT}"
    )
    assert refused(tmp_path, gguf([array(key, STRING, 1, string("a"))])) == (
        f"metadata key '{key}' is ARRAY; expected a string; {CORRUPT}"
    )


def test_unknown_types_are_named_by_number(tmp_path: Path) -> None:
    assert refused(tmp_path, gguf([kv("x", 13, b"")])) == (
        f"metadata key 'x' has unknown value type 13 (0-12); {CORRUPT}"
    )
    assert refused(tmp_path, gguf([array("x", 13, 0, b"")])) == (
        f"metadata key 'x' has unknown array element value type 13; {CORRUPT}"
    )
    assert refused(tmp_path, gguf([array("x", ARRAY, 0, b"")])).startswith(
        "metadata key 'x' is an array of arrays"
    )


def test_an_array_of_strings_needs_room_for_every_length(tmp_path: Path) -> None:
    # 3 strings need at least 24 bytes of lengths; the file has 16 left.
    data = gguf([array("x.s", STRING, 3, bytes(16))], alignment=1)
    assert refused(tmp_path, data) == (
        f"metadata key 'x.s' array of 3 strings needs 24 bytes, larger than the rest of the "
        f"file (16 bytes); the file is truncated or corrupt; {REFETCH}"
    )
    empty_strings = array("x.s", STRING, 3, bytes(24))
    assert passes(tmp_path, gguf([empty_strings, NAME_AFTER])).name == "after"


def test_a_string_array_may_end_exactly_at_the_end_of_the_file(tmp_path: Path) -> None:
    ending = array("x.s", STRING, 2, string("a") + string("bc"))
    assert passes(tmp_path, gguf([ending], alignment=1)).kv_count == 1
    empty_last = array("x.s", STRING, 2, string("a") + string(""))
    assert passes(tmp_path, gguf([empty_last], alignment=1)).kv_count == 1


@pytest.mark.parametrize("padding", [0, 100_000])  # in the first read window, or a later one
def test_a_string_in_an_array_longer_than_the_rest_of_the_file_is_named(
    tmp_path: Path, padding: int
) -> None:
    pad = [kv_str("x.pad", bytes(padding))] if padding else []
    data = gguf([*pad, array("x.s", STRING, 2, string("a") + U64.pack(100) + b"abc")], alignment=1)
    assert refused(tmp_path, data) == (
        f"metadata key 'x.s' element 1 needs 100 bytes, larger than the rest of the file (3 "
        f"bytes); the file is truncated or corrupt; {REFETCH}"
    )


@pytest.mark.parametrize("last", ["scalar", "strings"])
def test_metadata_read_or_skipped_may_end_at_64_mib(tmp_path: Path, last: str) -> None:
    head = 24
    blobs = [kv_str(f"x.{c}", bytes(16 * MIB)) for c in "abc"]

    def file(extra: int) -> bytes:
        # The last entry, read (an integer) or walked (an array of strings), ends at
        # 64 MiB + extra.
        if last == "scalar":
            tail = kv("x.e", UINT8, b"\0")
        else:
            tail = array("x.e", STRING, 1, string(b"x"))  # its last byte is the string's
        fill = 64 * MIB + extra - head - sum(len(b) for b in blobs) - len(tail)
        blob = kv_str("x.d", bytes(fill - len(kv_str("x.d", b""))))
        data = gguf([*blobs, blob, tail], alignment=1)
        assert len(data) == 64 * MIB + extra
        return data

    assert passes(tmp_path, file(0)).kv_count == 5
    assert refused(tmp_path, file(1)) == (
        f"metadata is larger than 67108864 bytes (at metadata key 'x.e'), more than any real "
        f"model has; {CORRUPT}"
    )


def test_refused_non_files_leave_no_descriptor_open(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    before = len(os.listdir("/proc/self/fd"))
    for path in [tmp_path, fifo] * 20:
        with pytest.raises(GGUFHeaderError, match="not a regular file"):
            check_gguf_header(path)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_checked_header_cannot_be_changed(tmp_path: Path) -> None:
    header = passes(tmp_path, gguf([NAME_AFTER]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        header.name = "other"  # type: ignore[misc]
