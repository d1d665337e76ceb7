"""Embedding tables in ONNX Runtime's GatherBlockQuantized layout, shareable with a tied lm_head.

GatherBlockQuantized (com.microsoft) with uint8 `data` and attributes bits, block_size,
gather_axis=0, quantize_axis=1 reads, for a table (vocab, hidden):

    data         (vocab, hidden * bits / 8) uint8; 4-bit codes two per byte, even index in the low nibble
    scales       (vocab, ceil(hidden / block_size)) float32
    zero_points  (vocab, ceil(n_blocks * bits / 8)) uint8, packed like data; when absent the op uses
                 2^(bits-1) for uint8 data, the same default as MatMulNBits (uint4/int4-typed data
                 would default to 0 instead, so we always emit uint8 plus the bits attribute).

These are MatMulNBits' B, scales and zero_points for the same matrix seen as W (N=vocab, K=hidden):
B (vocab, n_blocks, block_size * bits / 8) holds the same bytes as data (vocab, hidden * bits / 8)
when hidden % block_size == 0, and scales and zero_points are byte-identical (including the padded
last zero-point byte for an odd n_blocks). So a tied checkpoint quantizes its table once, feeds the
QuantizedMatrix to the lm_head MatMulNBits and `embedding_view(q)` to the gather.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .blockwise import QuantError, QuantizedMatrix, check_scheme, dequantize, quantization_error, quantize
from .pack import pack_codes, unpack_codes, unpack_zero_points


@dataclass(frozen=True, eq=False)
class QuantizedEmbedding:
    """An embedding table (vocab, hidden) quantized block-wise along hidden, for GatherBlockQuantized."""

    bits: int
    block_size: int
    symmetric: bool
    shape: tuple[int, int]  # (vocab, hidden)
    data: np.ndarray  # (vocab, hidden * bits // 8) uint8
    scales: np.ndarray  # (vocab, n_blocks) float32
    zero_points: np.ndarray | None  # (vocab, ceil(n_blocks * bits / 8)) uint8; None: 2^(bits-1) implied

    def __post_init__(self) -> None:
        check_scheme(self.bits, self.block_size)
        vocab, hidden = self.shape
        n_blocks = math.ceil(hidden / self.block_size)
        expect = {
            "data": ((vocab, hidden * self.bits // 8), np.uint8),
            "scales": ((vocab, n_blocks), np.float32),
        }
        if not self.symmetric:
            expect["zero_points"] = ((vocab, math.ceil(n_blocks * self.bits / 8)), np.uint8)
        elif self.zero_points is not None:
            raise ValueError("a symmetric QuantizedEmbedding has no zero_points (2^(bits-1) is implied)")
        for name, (shape, dtype) in expect.items():
            array = getattr(self, name)
            if array is None or array.shape != shape or array.dtype != dtype:
                found = None if array is None else (array.shape, array.dtype)
                raise ValueError(f"QuantizedEmbedding.{name} must be {np.dtype(dtype)} {shape}, got {found}")

    @property
    def n_blocks(self) -> int:
        """Blocks per row, ceil(hidden / block_size)."""
        return int(self.scales.shape[1])

    def error(self, table: np.ndarray) -> QuantError:
        """Error of this quantization against the original table (vocab, hidden)."""
        return quantization_error(table, _as_matrix(self))


def quantize_embedding(
    table: np.ndarray, bits: int, block_size: int, symmetric: bool, algo: str = "rtn"
) -> QuantizedEmbedding:
    """Quantize a table (vocab, hidden) for GatherBlockQuantized (gather_axis=0, quantize_axis=1)."""
    check_scheme(bits, block_size, algo)
    table = np.asarray(table)
    if table.ndim == 2 and bits == 4 and table.shape[1] % 2:
        raise ValueError(
            f"4-bit embeddings need an even hidden size (two codes per byte), got {table.shape[1]}"
        )
    return embedding_view(quantize(table, bits, block_size, symmetric, algo), allow_copy=True)


def embedding_view(q: QuantizedMatrix, allow_copy: bool = False) -> QuantizedEmbedding:
    """The GatherBlockQuantized arrays of a quantized (vocab, hidden) matrix, sharing its buffers.

    With hidden % block_size == 0 (every Qwen2.5 size) data is a reshape of q.packed and scales and
    zero_points are q's own arrays, so a tied lm_head and embedding store one set of bytes.
    Otherwise the padding after hidden must be cut from each row, which copies; pass allow_copy=True.
    """
    vocab, hidden = q.shape
    row_bytes = hidden * q.bits // 8  # bytes of one table row in GatherBlockQuantized's data
    if hidden % q.block_size:
        if not allow_copy:
            raise ValueError(
                f"hidden size {hidden} is not a multiple of block_size {q.block_size}: the gather data "
                "cannot share lm_head's padded bytes; pass allow_copy=True or pick a dividing block_size"
            )
        if (hidden * q.bits) % 8:
            raise ValueError(f"4-bit embeddings need an even hidden size (two codes per byte), got {hidden}")
        data = np.ascontiguousarray(q.packed.reshape(vocab, -1)[:, :row_bytes])
    else:
        data = q.packed.reshape(vocab, row_bytes)  # a view: same bytes as MatMulNBits' B
    return QuantizedEmbedding(
        bits=q.bits,
        block_size=q.block_size,
        symmetric=q.symmetric,
        shape=q.shape,
        data=data,
        scales=q.scales,
        zero_points=q.zero_points,
    )


def dequantize_embedding(e: QuantizedEmbedding) -> np.ndarray:
    """Float32 (vocab, hidden) table that GatherBlockQuantized gathers from."""
    return dequantize(_as_matrix(e))


def _as_matrix(e: QuantizedEmbedding) -> QuantizedMatrix:
    """The same quantization in MatMulNBits' padded (vocab, n_blocks, blob) layout."""
    vocab, hidden = e.shape
    padded = e.n_blocks * e.block_size
    if padded == hidden:
        packed = e.data.reshape(vocab, e.n_blocks, e.block_size * e.bits // 8)
    else:
        # Fill the padding with the zero point so it dequantizes to 0, as quantize() does.
        last_zero = (
            np.full((vocab, 1), 1 << (e.bits - 1), np.uint8)
            if e.zero_points is None
            else unpack_zero_points(e.zero_points, e.bits, e.n_blocks)[:, -1:]
        )  # (vocab, 1)
        codes = np.concatenate(
            [unpack_codes(e.data, e.bits), np.broadcast_to(last_zero, (vocab, padded - hidden))], axis=1
        )  # (vocab, padded)
        packed = pack_codes(codes.reshape(vocab, e.n_blocks, e.block_size), e.bits)
    return QuantizedMatrix(
        bits=e.bits,
        block_size=e.block_size,
        symmetric=e.symmetric,
        shape=e.shape,
        packed=packed,
        scales=e.scales,
        zero_points=e.zero_points,
    )
