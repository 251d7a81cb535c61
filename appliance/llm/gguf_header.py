"""Check a GGUF file's header with a bounded parser before llama.cpp is given the file.

llama.cpp trusts the lengths in a GGUF file: a hostile or corrupt file can make it allocate
without bound, abort on an assertion (an empty key, a `general.alignment` that is not a
uint32), or read past the end of a vocabulary array. `gguf.GGUFReader` is no safer (it can
hang on a huge array length). So every file goes through `check_gguf_header` first: it walks
the header, all metadata and every tensor description through a small read window, checks
each length against a limit and against the bytes left in the file before acting on it, and
never allocates more than a limit allows. It reads only metadata (a few MiB even for a model
with a 262k-token vocabulary), never tensor data.

Versions: llama.cpp reads GGUF 2 and 3 (the same layout for little-endian files; 3 added
big-endian files). Version 1 used 32-bit counts and llama.cpp dropped it in 2023, so a v1 file
is refused here with a message that says to reconvert it, rather than failing at load.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from gguf.constants import GGML_QUANT_SIZES, GGUFValueType

GGUF_MAGIC: Final = b"GGUF"
MIN_VERSION: Final = 2
MAX_VERSION: Final = 3
HEADER_BYTES: Final = 24  # magic, version (u32), tensor count (u64), metadata count (u64)

# Limits well above any real model (hundreds to a few thousand tensors, tens of keys, vocabularies
# up to ~262k tokens, chat templates of tens of KiB) and far below what would hurt the box.
MAX_TENSORS: Final = 100_000
MAX_KV: Final = 100_000
MAX_KEY_BYTES: Final = 64 * 1024
MAX_STRING_BYTES: Final = 16 * 1024 * 1024
MAX_ARRAY_LEN: Final = 10_000_000
# Bounds the parse time too: every string in an array costs a loop turn. Real models carry
# 1-10 MiB of metadata (vocabulary, merges and tensor descriptions).
MAX_METADATA_BYTES: Final = 64 * 1024 * 1024
MAX_FILE_BYTES: Final = 1 << 40  # 1 TiB; the largest public models are a few hundred GiB
MAX_TENSOR_NAME_BYTES: Final = 63  # llama.cpp's GGML_MAX_NAME is 64 including the NUL
MAX_DIMS: Final = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT: Final = 32
INT64_MAX: Final = (1 << 63) - 1

_WINDOW: Final = 64 * 1024
_CORRUPT: Final = "the file is corrupt; download or convert the model again"
_REFETCH: Final = "download or copy the model again"

_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")

_STRING: Final = int(GGUFValueType.STRING)
_ARRAY: Final = int(GGUFValueType.ARRAY)
_UINT32: Final = int(GGUFValueType.UINT32)
_INT32: Final = int(GGUFValueType.INT32)
_FLOAT32: Final = int(GGUFValueType.FLOAT32)
# Fixed-size value types: their size, and how to decode the integer ones we need.
_VALUE_SIZES: Final[dict[int, int]] = {
    int(GGUFValueType.UINT8): 1,
    int(GGUFValueType.INT8): 1,
    int(GGUFValueType.UINT16): 2,
    int(GGUFValueType.INT16): 2,
    int(GGUFValueType.UINT32): 4,
    int(GGUFValueType.INT32): 4,
    int(GGUFValueType.FLOAT32): 4,
    int(GGUFValueType.BOOL): 1,
    int(GGUFValueType.UINT64): 8,
    int(GGUFValueType.INT64): 8,
    int(GGUFValueType.FLOAT64): 8,
}
_INT_FORMATS: Final[dict[int, struct.Struct]] = {
    int(GGUFValueType.UINT8): struct.Struct("<B"),
    int(GGUFValueType.INT8): struct.Struct("<b"),
    int(GGUFValueType.UINT16): struct.Struct("<H"),
    int(GGUFValueType.INT16): struct.Struct("<h"),
    int(GGUFValueType.UINT32): struct.Struct("<I"),
    int(GGUFValueType.INT32): struct.Struct("<i"),
    int(GGUFValueType.UINT64): struct.Struct("<Q"),
    int(GGUFValueType.INT64): struct.Struct("<q"),
}
# ggml type -> (name, elements per block, bytes per block), from gguf-py (llama.cpp's own).
_GGML_TYPES: Final[dict[int, tuple[str, int, int]]] = {
    int(t): (t.name, block, size) for t, (block, size) in GGML_QUANT_SIZES.items()
}

_KEY_ALIGNMENT: Final = "general.alignment"
_KEY_ARCH: Final = "general.architecture"
_KEY_NAME: Final = "general.name"
_KEY_TEMPLATE: Final = "tokenizer.chat_template"
_STRING_KEYS: Final = frozenset({_KEY_ARCH, _KEY_NAME, _KEY_TEMPLATE})
_KEY_TOKENS: Final = "tokenizer.ggml.tokens"
_KEY_MERGES: Final = "tokenizer.ggml.merges"
# llama.cpp indexes these by token id without checking their type or length.
_PER_TOKEN_KEYS: Final[dict[str, int]] = {
    "tokenizer.ggml.scores": _FLOAT32,
    "tokenizer.ggml.token_type": _INT32,
}


class GGUFHeaderError(ValueError):
    """The file is not a GGUF model llama.cpp can safely be given.

    The message is one line that says what is wrong and what to do; it never names a path
    (callers add the model name).
    """


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The architecture's sizes that decide the KV cache and the compute buffers."""

    block_count: int | None = None
    embedding_length: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None


# `<architecture>.<suffix>` keys read into ModelShape (integer scalars only: a per-layer
# array, as some models have for head_count_kv, leaves the field None).
_SHAPE_KEYS: Final = {
    "block_count": "block_count",
    "embedding_length": "embedding_length",
    "attention.head_count": "head_count",
    "attention.head_count_kv": "head_count_kv",
    "attention.key_length": "key_length",
    "attention.value_length": "value_length",
}
_SHAPE_SUFFIXES: Final = tuple(f".{suffix}" for suffix in _SHAPE_KEYS)


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    """What the header says, once every length and offset in it has been checked."""

    version: int
    tensor_count: int
    kv_count: int
    architecture: str | None
    name: str | None
    context_length: int | None
    chat_template: str | None
    file_size: int
    alignment: int
    data_offset: int
    # What a memory estimate needs (appliance.llm.memory); absent keys are None.
    weights_bytes: int = 0
    vocab_size: int = 0
    shape: ModelShape = field(default_factory=ModelShape)


def check_gguf_header(path: Path) -> GGUFHeader:
    """Check the GGUF file at `path` and return its header, or raise `GGUFHeaderError`.

    Blocking (a few reads, milliseconds for a real model): run it in a thread.
    """
    try:
        # O_NONBLOCK so a FIFO put in place of a model cannot block the open forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise GGUFHeaderError(
            f"cannot open the file ({exc.strerror}); check that it exists and is readable"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise GGUFHeaderError("not a regular file; expected a .gguf model")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", buffering=0) as file:
            fd = -1  # the file object owns it now
            size = os.fstat(file.fileno()).st_size
            return _parse(_Reader(file, size))
    except OSError as exc:
        raise GGUFHeaderError(f"cannot read the file ({exc.strerror}); check the disk") from None
    finally:
        if fd >= 0:
            os.close(fd)


def _show(raw: bytes | str) -> str:
    """A key or tensor name for a one-line message: quoted, escaped, cut short."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    return repr(text[:80] + "..." if len(text) > 80 else text)


def _type_name(vtype: int) -> str:
    return (
        GGUFValueType(vtype).name
        if vtype in _VALUE_SIZES or vtype in (_STRING, _ARRAY)
        else str(vtype)
    )


class _Reader:
    """Reads a file through a small window; every read is checked against the file's end first.

    `_pos` may run past the window after a skip; the next read refills from there.
    """

    __slots__ = ("_base", "_buf", "_file", "_pos", "size")

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file = file
        self.size = size
        self._buf = b""
        self._base = 0  # file offset of _buf[0]
        self._pos = 0

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _need(self, n: int, what: str) -> None:
        end = self._base + self._pos + n
        if end > self.size:
            raise GGUFHeaderError(
                f"file is truncated: {what} ends at byte {end} but the file has {self.size} bytes;"
                f" {_REFETCH}"
            )
        if end > MAX_METADATA_BYTES:
            raise _metadata_too_large(what)
        if self._pos + n > len(self._buf):
            self._refill(n)

    def _refill(self, n: int) -> None:
        start = self._base + self._pos
        self._file.seek(start)
        want = max(n, _WINDOW)
        data = self._file.read(want)
        while len(data) < n:  # a raw read may return less; only EOF ends it
            more = self._file.read(want - len(data))
            if not more:
                raise GGUFHeaderError(
                    f"file changed while being checked (it now ends at byte {start + len(data)});"
                    " wait until it is completely copied"
                )
            data += more
        self._buf, self._base, self._pos = data, start, 0

    def check_length(self, n: int, what: str) -> None:
        """A length field: refuse it before acting on it if the file cannot hold that much."""
        left = self.size - self.offset
        if n > left:
            raise GGUFHeaderError(
                f"{what} needs {n} bytes, larger than the rest of the file ({left} bytes);"
                f" the file is truncated or corrupt; {_REFETCH}"
            )

    def read(self, n: int, what: str) -> bytes:
        self._need(n, what)
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def unpack(self, fmt: struct.Struct, what: str) -> int:
        self._need(fmt.size, what)
        (value,) = fmt.unpack_from(self._buf, self._pos)
        self._pos += fmt.size
        return int(value)

    def u32(self, what: str) -> int:
        return self.unpack(_U32, what)

    def u64(self, what: str) -> int:
        return self.unpack(_U64, what)

    def skip(self, n: int, what: str) -> None:
        self.check_length(n, what)
        self._pos += n
        if self.offset > MAX_METADATA_BYTES:
            raise _metadata_too_large(what)

    def string_length(self, what: str, limit: int) -> int:
        n = self.u64(f"{what} length")
        if n > limit:
            raise GGUFHeaderError(f"{what} is {n} bytes long (limit {limit}); {_CORRUPT}")
        self.check_length(n, what)
        return n

    def skip_strings(self, count: int, what: str) -> None:
        """Skip `count` strings, checking each length, in a tight loop (vocabularies are big)."""
        unpack = _U64.unpack_from
        done = 0
        while done < count:
            self._need(8, f"{what} element {done} length")  # refills the window
            buf, pos = self._buf, self._pos
            stop = len(buf) - 8
            left = self.size - self._base  # the file's end, relative to the window
            while done < count and pos <= stop:
                (n,) = unpack(buf, pos)
                pos += 8
                if n > MAX_STRING_BYTES or n > left - pos:
                    self._pos = pos
                    self.check_length(n, f"{what} element {done}")
                    raise GGUFHeaderError(
                        f"{what} element {done} is {n} bytes long (limit {MAX_STRING_BYTES});"
                        f" {_CORRUPT}"
                    )
                pos += n
                done += 1
            self._pos = pos
        if self.offset > MAX_METADATA_BYTES:
            raise _metadata_too_large(what)


def _metadata_too_large(what: str) -> GGUFHeaderError:
    return GGUFHeaderError(
        f"metadata is larger than {MAX_METADATA_BYTES} bytes (at {what}), more than any real"
        f" model has; {_CORRUPT}"
    )


@dataclass(slots=True)
class _Tensor:
    label: str
    offset: int
    nbytes: int


def _parse(r: _Reader) -> GGUFHeader:
    size = r.size
    if size == 0:
        raise GGUFHeaderError("file is empty; expected a .gguf model")
    if size > MAX_FILE_BYTES:
        raise GGUFHeaderError(
            f"file size {size} bytes is implausible (limit {MAX_FILE_BYTES});"
            " expected a .gguf model"
        )
    magic = r.read(min(size, len(GGUF_MAGIC)), "magic")
    if not GGUF_MAGIC.startswith(magic):
        raise GGUFHeaderError(f"not a GGUF file (bad magic {magic!r}); expected a .gguf model")
    if size < HEADER_BYTES:
        raise GGUFHeaderError(
            f"file is truncated: {size} bytes is shorter than the {HEADER_BYTES}-byte GGUF"
            f" header; {_REFETCH}"
        )

    version = r.u32("version")
    if not MIN_VERSION <= version <= MAX_VERSION:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if MIN_VERSION <= swapped <= MAX_VERSION:
            raise GGUFHeaderError(
                "big-endian GGUF is not supported; convert the model to little-endian"
                " (gguf-convert-endian)"
            )
        raise GGUFHeaderError(
            f"GGUF version {version} is not supported ({MIN_VERSION}-{MAX_VERSION});"
            " convert the model with a current llama.cpp"
        )
    tensor_count = r.u64("tensor count")
    if tensor_count > MAX_TENSORS:
        raise GGUFHeaderError(
            f"tensor count {tensor_count} is implausible (limit {MAX_TENSORS}); {_CORRUPT}"
        )
    kv_count = r.u64("metadata count")
    if kv_count > MAX_KV:
        raise GGUFHeaderError(
            f"metadata count {kv_count} is implausible (limit {MAX_KV}); {_CORRUPT}"
        )

    meta = _read_metadata(r, kv_count)
    alignment = meta.alignment
    tensors = _read_tensor_infos(r, tensor_count)

    data_offset = -(-r.offset // alignment) * alignment  # the data section starts aligned
    for tensor in tensors:
        if tensor.offset % alignment:
            raise GGUFHeaderError(
                f"{tensor.label} offset {tensor.offset} is not a multiple of the alignment"
                f" {alignment}; {_CORRUPT}"
            )
        start = data_offset + tensor.offset
        if start > size:
            raise GGUFHeaderError(
                f"{tensor.label} offset {tensor.offset} points past the end of the file (data"
                f" starts at byte {data_offset}, the file has {size} bytes); {_CORRUPT}"
            )
        end = start + tensor.nbytes
        if end > size:
            raise GGUFHeaderError(
                f"file is truncated: {tensor.label} data ends at byte {end} but the file has"
                f" {size} bytes; {_REFETCH}"
            )

    context_length: int | None = None
    if meta.architecture is not None:
        key = f"{meta.architecture}.context_length"
        found = meta.context_lengths.get(key)
        if found is not None:
            vtype, value = found
            if value is None:
                raise GGUFHeaderError(
                    f"{key} is {_type_name(vtype)}; expected an integer; {_CORRUPT}"
                )
            if value <= 0:
                raise GGUFHeaderError(f"{key} is {value}; expected a positive integer; {_CORRUPT}")
            context_length = value

    return GGUFHeader(
        version=version,
        tensor_count=tensor_count,
        kv_count=kv_count,
        architecture=meta.architecture,
        name=meta.name,
        context_length=context_length,
        chat_template=meta.chat_template,
        file_size=size,
        alignment=alignment,
        data_offset=data_offset,
        weights_bytes=sum(tensor.nbytes for tensor in tensors),
        vocab_size=meta.vocab_size,
        shape=_shape(meta),
    )


def _shape(meta: _Metadata) -> ModelShape:
    prefix = f"{meta.architecture}."
    values: dict[str, int] = {}
    for key, value in meta.integers.items():
        suffix = key.removeprefix(prefix)
        if key.startswith(prefix) and suffix in _SHAPE_KEYS and 0 < value < 1 << 31:
            values[_SHAPE_KEYS[suffix]] = value
    return ModelShape(**values)


@dataclass(slots=True)
class _Metadata:
    alignment: int = DEFAULT_ALIGNMENT
    architecture: str | None = None
    name: str | None = None
    chat_template: str | None = None
    # every "<something>.context_length": (value type, value if an integer); the architecture
    # that picks one may come later in the file.
    context_lengths: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    # Integer scalars whose key ends like one of _SHAPE_KEYS (the architecture may come later).
    integers: dict[str, int] = field(default_factory=dict)
    vocab_size: int = 0


def _read_metadata(r: _Reader, kv_count: int) -> _Metadata:
    meta = _Metadata()
    seen: set[bytes] = set()
    arrays: dict[str, tuple[int, int]] = {}  # tokenizer arrays: (element type, count)
    for index in range(kv_count):
        where = f"metadata key {index}"
        n = r.string_length(where, MAX_KEY_BYTES)
        if n == 0:  # llama.cpp aborts the process on an empty key
            raise GGUFHeaderError(f"{where} is empty; {_CORRUPT}")
        raw = r.read(n, where)
        if raw in seen:
            raise GGUFHeaderError(f"metadata key {_show(raw)} appears twice; {_CORRUPT}")
        seen.add(raw)
        key = raw.decode("utf-8", "backslashreplace")
        label = f"metadata key {_show(key)}"
        vtype = r.u32(f"{label} type")
        value: int | None = None  # set for integer scalars

        if vtype == _ARRAY:
            etype = r.u32(f"{label} element type")
            count = r.u64(f"{label} element count")
            if etype == _ARRAY:  # llama.cpp refuses arrays of arrays; nothing writes them
                raise GGUFHeaderError(
                    f"{label} is an array of arrays, which llama.cpp cannot read;"
                    " convert the model with a current llama.cpp"
                )
            if etype != _STRING and etype not in _VALUE_SIZES:
                raise GGUFHeaderError(
                    f"{label} has unknown array element value type {etype}; {_CORRUPT}"
                )
            if count > MAX_ARRAY_LEN:
                raise GGUFHeaderError(
                    f"{label} has an array of {count} elements (limit {MAX_ARRAY_LEN}); {_CORRUPT}"
                )
            if etype == _STRING:
                r.check_length(8 * count, f"{label} array of {count} strings")
                r.skip_strings(count, label)
            else:
                r.skip(_VALUE_SIZES[etype] * count, f"{label} array of {count} {_type_name(etype)}")
            if key in (_KEY_TOKENS, _KEY_MERGES) or key in _PER_TOKEN_KEYS:
                arrays[key] = (etype, count)
        elif vtype == _STRING:
            length = r.string_length(label, MAX_STRING_BYTES)
            if key in _STRING_KEYS:
                try:
                    text = r.read(length, label).decode("utf-8")
                except UnicodeDecodeError:
                    raise GGUFHeaderError(f"{label} is not valid UTF-8; {_CORRUPT}") from None
                if key == _KEY_ARCH:
                    meta.architecture = text
                elif key == _KEY_NAME:
                    meta.name = text
                else:
                    meta.chat_template = text
            else:
                r.skip(length, label)
        elif vtype in _VALUE_SIZES:
            fmt = _INT_FORMATS.get(vtype)
            if fmt is None:  # floats and bools: nothing here needs their value
                r.skip(_VALUE_SIZES[vtype], label)
            else:
                value = r.unpack(fmt, label)
        else:
            raise GGUFHeaderError(f"{label} has unknown value type {vtype} (0-12); {_CORRUPT}")
        if key == _KEY_ALIGNMENT:
            meta.alignment = _check_alignment(vtype, value)
        elif key.endswith(".context_length"):
            meta.context_lengths[key] = (vtype, value)
        elif value is not None and key.endswith(_SHAPE_SUFFIXES):
            meta.integers[key] = value
        if vtype != _ARRAY and key in (_KEY_TOKENS, _KEY_MERGES, *_PER_TOKEN_KEYS):
            raise GGUFHeaderError(f"{label} is {_type_name(vtype)}; expected an array; {_CORRUPT}")
        if vtype != _STRING and key in _STRING_KEYS:
            raise GGUFHeaderError(f"{label} is {_type_name(vtype)}; expected a string; {_CORRUPT}")
    _check_tokenizer_arrays(arrays)
    meta.vocab_size = arrays[_KEY_TOKENS][1] if _KEY_TOKENS in arrays else 0
    return meta


def _check_alignment(vtype: int, value: int | None) -> int:
    # llama.cpp reads it with gguf_get_val_u32, which aborts the process on any other type.
    if vtype != _UINT32 or value is None:
        raise GGUFHeaderError(
            f"{_KEY_ALIGNMENT} is {_type_name(vtype)}; expected UINT32; {_CORRUPT}"
        )
    if value == 0 or value & (value - 1):
        raise GGUFHeaderError(f"{_KEY_ALIGNMENT} {value} is not a power of two; {_CORRUPT}")
    return value


def _check_tokenizer_arrays(arrays: dict[str, tuple[int, int]]) -> None:
    """llama.cpp reads these without checking type or length: a mismatch reads out of bounds."""
    for key in (_KEY_TOKENS, _KEY_MERGES):
        if key in arrays and arrays[key][0] != _STRING:
            raise GGUFHeaderError(
                f"metadata key {_show(key)} is an array of {_type_name(arrays[key][0])};"
                f" expected strings; {_CORRUPT}"
            )
    n_tokens = arrays[_KEY_TOKENS][1] if _KEY_TOKENS in arrays else 0
    for key, etype in _PER_TOKEN_KEYS.items():
        if key not in arrays:
            continue
        got, count = arrays[key]
        if got != etype:
            raise GGUFHeaderError(
                f"metadata key {_show(key)} is an array of {_type_name(got)}; expected"
                f" {_type_name(etype)}; {_CORRUPT}"
            )
        if count < n_tokens:
            raise GGUFHeaderError(
                f"metadata key {_show(key)} has {count} entries for {n_tokens} tokens; {_CORRUPT}"
            )


def _read_tensor_infos(r: _Reader, tensor_count: int) -> list[_Tensor]:
    tensors: list[_Tensor] = []
    names: set[bytes] = set()
    for index in range(tensor_count):
        where = f"tensor {index} name"
        raw = r.read(r.string_length(where, MAX_TENSOR_NAME_BYTES), where)
        if raw in names:
            raise GGUFHeaderError(f"tensor {_show(raw)} appears twice; {_CORRUPT}")
        names.add(raw)
        label = f"tensor {_show(raw)}"
        n_dims = r.u32(f"{label} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFHeaderError(f"{label} has {n_dims} dimensions (1-{MAX_DIMS}); {_CORRUPT}")
        dims = [r.u64(f"{label} dimension {j}") for j in range(n_dims)]
        elements = 1
        for j, dim in enumerate(dims):
            # llama.cpp keeps dimensions as int64 and rejects their product reaching INT64_MAX.
            if not 1 <= dim <= INT64_MAX:
                raise GGUFHeaderError(
                    f"{label} dimension {j} is {dim}; expected 1 or more; {_CORRUPT}"
                )
            elements *= dim
        if elements >= INT64_MAX:
            raise GGUFHeaderError(
                f"{label} has {elements} elements, more than llama.cpp can index; {_CORRUPT}"
            )
        gtype = r.u32(f"{label} type")
        known = _GGML_TYPES.get(gtype)
        if known is None:
            raise GGUFHeaderError(
                f"{label} has unknown ggml type {gtype}; the model needs a newer llama.cpp or"
                " the file is corrupt"
            )
        type_name, block, type_size = known
        if dims[0] % block:
            raise GGUFHeaderError(
                f"{label} rows of {dims[0]} elements are not a multiple of the {type_name}"
                f" block size {block}; {_CORRUPT}"
            )
        offset = r.u64(f"{label} offset")
        tensors.append(_Tensor(label, offset, elements // block * type_size))
    return tensors
