"""Check a GGUF file's header against the file before any reader trusts it.

gguf-py's GGUFReader believes what a header says: a string length of 2^63 or a tensor count of
2^40 sends it reading past the end, and a tensor whose offset or size runs past the file only fails
when its data is used, with a numpy error that names neither. This walk over the header (the
layout of llama.cpp's gguf.cpp) checks every count, length, shape and offset against the bytes that
are there, so a truncated or hostile file is one ValueError naming the file and what is wrong, in
time and memory bounded by the file's size.

    magic "GGUF", version u32 (2 or 3), tensor_count u64, kv_count u64
    kv_count x   key (u64 length + UTF-8), value type u32, value (arrays: type u32, count u64, items)
    tensor_count x   name, n_dims u32 (<= 4), dims u64 x n_dims, ggml type u32, offset u64
    padding to general.alignment (32), then the tensor data, each tensor at data start + offset
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
INT64_MAX = (1 << 63) - 1
DEFAULT_ALIGNMENT = 32
_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_INTEGERS = {t for t in _SCALARS if t not in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)}
_INTEGERS.discard(GGUFValueType.BOOL)
# The metadata the qwen2 reader turns into numbers (export/gguf_reader.py, gguf_tokenizer.py): a value
# of another type would fail there with an error that does not name the file.
_INTEGER_KEYS = {
    "general.alignment",
    "qwen2.context_length",
    "qwen2.embedding_length",
    "qwen2.block_count",
    "qwen2.feed_forward_length",
    "qwen2.attention.head_count",
    "qwen2.attention.head_count_kv",
    "qwen2.attention.key_length",
    "qwen2.rope.dimension_count",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.eot_token_id",
}
_FLOAT_KEYS = {"qwen2.attention.layer_norm_rms_epsilon", "qwen2.rope.freq_base", "qwen2.rope.scaling.factor"}
_STRING_KEYS = {
    "general.architecture",
    "general.name",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.chat_template",
    "qwen2.rope.scaling.type",
}
_STRING_ARRAY_KEYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"}


class _Header:
    """A cursor over the file's bytes that refuses to read past their end."""

    def __init__(self, data: mmap.mmap | bytes, path: Path) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path} is not a valid GGUF file: {what} (truncated or corrupted)")

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes, {len(self.data) - self.pos} remain")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def scalar(self, fmt: str, what: str) -> int | float | bool:
        value: int | float | bool = struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]
        return value

    def count(self, what: str, item_bytes: int) -> int:
        """A u64 count of items at least `item_bytes` each, checked against the bytes left."""
        n = int(self.scalar("<Q", what))
        if n * item_bytes > len(self.data) - self.pos:
            raise self.fail(f"{what} is {n}, more than the {len(self.data) - self.pos} bytes left can hold")
        return n

    def string(self, what: str) -> str:
        raw = self.take(self.count(f"the length of {what}", 1), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None


def check_gguf_header(path: Path) -> None:
    """ValueError naming the file and the fault unless its whole header is consistent with its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        data: mmap.mmap | bytes = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    try:
        _walk(_Header(data, path))
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def _walk(h: _Header) -> None:
    if h.take(4, "the magic") != b"GGUF":
        raise h.fail("it does not start with b'GGUF'")
    version = h.scalar("<I", "the version")
    if version not in SUPPORTED_VERSIONS:
        raise h.fail(f"version {version}; edge-qwen reads GGUF versions 2 and 3")
    tensor_count = int(h.scalar("<Q", "the tensor count"))
    kv_count = h.count("the metadata count", 8 + 4 + 1)  # the smallest entry: empty key, type, a byte
    alignment = DEFAULT_ALIGNMENT
    for i in range(kv_count):
        key = h.string(f"metadata key {i}")
        value = _value(h, key, nested=False)
        if key.startswith("qwen2.") and key in _INTEGER_KEYS and int(value) < 1:  # type: ignore[call-overload]
            raise h.fail(f"{key} is {value}: a size or count of the model must be positive")
        if key == "general.alignment":
            alignment = int(value)
            if alignment <= 0 or alignment & (alignment - 1):
                raise h.fail(f"general.alignment {alignment} is not a power of two")
    if tensor_count * (8 + 4 + 4 + 8) > len(h.data) - h.pos:
        raise h.fail(f"the tensor count is {tensor_count}, more than the rest of the file can describe")
    tensors = [_tensor_info(h, i) for i in range(tensor_count)]
    data_start = -(-h.pos // alignment) * alignment
    data_bytes = len(h.data) - data_start
    names: set[str] = set()
    for name, offset, nbytes in tensors:
        if name in names:
            raise h.fail(f"tensor {name} appears twice")
        names.add(name)
        if offset % alignment:
            raise h.fail(f"tensor {name} starts at offset {offset}, not a multiple of {alignment}")
        if offset + nbytes > data_bytes:
            raise h.fail(
                f"tensor {name} claims bytes {offset}..{offset + nbytes} of the data, which has {data_bytes}"
            )


def _value(h: _Header, key: str, nested: bool) -> object:
    """Skip one metadata value, checking it; returns scalars (for general.alignment)."""
    kind = _value_type(h, f"the type of {key}")
    _check_key_type(h, key, kind, None)
    if kind == GGUFValueType.STRING:
        return h.string(key)
    if kind != GGUFValueType.ARRAY:
        return h.scalar(_SCALARS[kind], key)
    if nested:
        raise h.fail(f"{key} nests arrays in arrays")
    item = _value_type(h, f"the item type of {key}")
    _check_key_type(h, key, kind, item)
    if item == GGUFValueType.STRING:
        for i in range(h.count(f"the length of {key}", 8)):
            h.string(f"{key}[{i}]")
    elif item == GGUFValueType.ARRAY:
        raise h.fail(f"{key} nests arrays in arrays")
    else:
        itemsize = struct.calcsize(_SCALARS[item])
        h.take(h.count(f"the length of {key}", itemsize) * itemsize, key)
    return None


def _value_type(h: _Header, what: str) -> GGUFValueType:
    code = int(h.scalar("<I", what))
    try:
        return GGUFValueType(code)
    except ValueError:
        raise h.fail(f"{what} is {code}, not a GGUF value type") from None


def _check_key_type(h: _Header, key: str, kind: GGUFValueType, item: GGUFValueType | None) -> None:
    expected = (
        "an integer"
        if key in _INTEGER_KEYS and kind not in _INTEGERS
        else "a number"
        if key in _FLOAT_KEYS and kind not in _SCALARS
        else "a string"
        if key in _STRING_KEYS and kind != GGUFValueType.STRING
        else "an array of strings"
        if key in _STRING_ARRAY_KEYS and kind != GGUFValueType.ARRAY
        else None
    )
    if key in _STRING_ARRAY_KEYS and item is not None and item != GGUFValueType.STRING:
        expected = "an array of strings"
    if expected:
        raise h.fail(f"{key} is a {(item or kind).name}, not {expected}")


def _tensor_info(h: _Header, i: int) -> tuple[str, int, int]:
    """(name, offset, bytes) of the i-th tensor, its shape and type checked."""
    name = h.string(f"the name of tensor {i}")
    n_dims = int(h.scalar("<I", f"the rank of {name}"))
    if not 1 <= n_dims <= MAX_DIMS:
        raise h.fail(f"tensor {name} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
    dims = [int(h.scalar("<Q", f"a dimension of {name}")) for _ in range(n_dims)]
    code = int(h.scalar("<I", f"the type of {name}"))
    offset = int(h.scalar("<Q", f"the offset of {name}"))
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(code)]
    except (ValueError, KeyError):
        raise h.fail(f"tensor {name} has ggml type {code}, which is not one gguf knows") from None
    if any(d > INT64_MAX for d in dims) or math.prod(dims) > INT64_MAX:
        raise h.fail(f"tensor {name} has shape {dims}, whose size overflows")
    if dims[0] % block:
        raise h.fail(f"tensor {name} has rows of {dims[0]}, not a multiple of its {block}-value blocks")
    return name, offset, math.prod(dims) // block * type_size
