"""GGUF (ggml) quantized blocks read exactly into MatMulNBits' terms: numpy in, numpy out.

Every block type mapped here dequantizes, in ggml and gguf-py alike, to

    w[n, k] = scale[n, k // block_size] * (code[n, k] - zero_point[n, k // block_size])
              + offset[n, k // offset_block]                        (offset only for the "min" types)

with integer codes, so the codes, zero points and scales below are what MatMulNBits takes, with no
rounding: the scales are products of a float16 and a small integer, exact in float32.

    type   ggml                      bits  block  zero point  scale        offset (block)
    Q8_0   d * q, q int8             8     32     128         d            -
    Q4_0   d * (q - 8)               4     32     8           d            -
    Q5_0   d * (q - 16)              8     32     16          d            -
    Q4_1   d * q + m                 4     32     0           d            m (32)
    Q5_1   d * q + m                 8     32     0           d            m (32)
    Q2_K   d*sc_j * q - dmin*m_j     4     16     0           d * sc_j     -dmin * m_j (16)
    Q3_K   d*(sc_j - 32) * (q - 4)   4     16     4           d*(sc_j-32)  -
    Q4_K   d*sc_j * q - dmin*m_j     4     32     0           d * sc_j     -dmin * m_j (32)
    Q5_K   d*sc_j * q - dmin*m_j     8     32     0           d * sc_j     -dmin * m_j (32)
    Q6_K   d*sc_j * (q - 32)         8     16     32          d * sc_j     -

MatMulNBits has no per-block offset (float zero points would be one, but take its slow unpacked
path), so the offsets are applied by the graph: sum_k a_k * offset = sum over blocks of
(the block's sum of a) * offset, a small (K / offset_block, N) matrix product (export/gguf_exact.py).
Block layouts follow ggml's block_q*_* structs (ggml-common.h), as gguf-py's quants.py decodes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .pack import pack_codes, pack_zero_points

QK_K = 256  # elements of a k-quant super-block


@dataclass(frozen=True, eq=False)
class GgmlMatrix:
    """A GGUF matrix (N, K) as MatMulNBits codes, scales and zero points, plus per-block offsets."""

    qtype: str  # the GGUF type it came from, e.g. "Q4_K"
    bits: int  # 4 | 8: MatMulNBits' bits
    block_size: int  # 16 | 32
    codes: np.ndarray  # (N, K) uint8, unpacked
    scales: np.ndarray  # (N, K // block_size) float32
    zero_points: np.ndarray  # (N, K // block_size) uint8, unpacked
    offsets: np.ndarray | None  # (N, K // offset_block) float32, added to each weight of its block
    offset_block: int = 32

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def n_blocks(self) -> int:
        return self.shape[1] // self.block_size

    @property
    def layout(self) -> tuple[int, int, int | None]:
        """Matrices of one layout can be stacked by rows into one MatMulNBits."""
        return (self.bits, self.block_size, None if self.offsets is None else self.offset_block)

    def packed(self) -> np.ndarray:
        """MatMulNBits' B: (N, n_blocks, block_size * bits // 8) uint8."""
        rows = self.shape[0]
        return pack_codes(self.codes.reshape(rows, self.n_blocks, self.block_size), self.bits)

    def packed_zero_points(self) -> np.ndarray:
        """MatMulNBits' zero_points: (N, ceil(n_blocks * bits / 8)) uint8."""
        return pack_zero_points(self.zero_points, self.bits)

    def rows(self, start: int, stop: int) -> GgmlMatrix:
        """Rows [start, stop), as views."""
        offsets = None if self.offsets is None else self.offsets[start:stop]
        return GgmlMatrix(
            self.qtype,
            self.bits,
            self.block_size,
            self.codes[start:stop],
            self.scales[start:stop],
            self.zero_points[start:stop],
            offsets,
            self.offset_block,
        )


def stack_rows(parts: list[GgmlMatrix]) -> GgmlMatrix:
    """Matrices of one layout stacked by rows (q, k, v into qkv); offsets zero where a part has none."""
    if len({p.layout[:2] for p in parts}) != 1 or len({p.shape[1] for p in parts}) != 1:
        raise ValueError(f"cannot stack {[p.qtype for p in parts]}: their bits, blocks or widths differ")
    blocks = {p.offset_block for p in parts if p.offsets is not None}
    if len(blocks) > 1:
        raise ValueError(f"cannot stack {[p.qtype for p in parts]}: their offset blocks differ")
    first = parts[0]
    offset_block = blocks.pop() if blocks else first.offset_block
    offsets = None
    if any(p.offsets is not None for p in parts):
        empty = [np.zeros((p.shape[0], p.shape[1] // offset_block), np.float32) for p in parts]
        offsets = np.concatenate(
            [e if p.offsets is None else p.offsets for p, e in zip(parts, empty, strict=True)]
        )
    return GgmlMatrix(
        "+".join(dict.fromkeys(p.qtype for p in parts)),
        first.bits,
        first.block_size,
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.scales for p in parts]),
        np.concatenate([p.zero_points for p in parts]),
        offsets,
        offset_block,
    )


def dequantize(m: GgmlMatrix) -> np.ndarray:
    """The float32 weights (N, K) MatMulNBits computes with, plus the offsets, in gguf-py's order."""
    rows, cols = m.shape
    q = m.codes.reshape(rows, m.n_blocks, m.block_size).astype(np.float32)
    z = m.zero_points.astype(np.float32)[:, :, None]
    w = (m.scales[:, :, None] * (q - z)).reshape(rows, cols)
    if m.offsets is None:
        return w
    per = cols // m.offsets.shape[1]
    return (w.reshape(rows, -1, per) + m.offsets[:, :, None]).reshape(rows, cols)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of each block, as float32 (n, 1)."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """ggml's nibble order: per `width` bytes, the low nibbles of all, then the high ones."""
    n = qs.shape[0]
    chunks = qs.reshape(n, -1, 1, width) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (chunks & 0x0F).reshape(n, -1)


def _bits_of(qh: np.ndarray, count: int) -> np.ndarray:
    """Bit i of each byte of (n, width) as (n, count, width): element j of sub-block i is bit i of byte j."""
    n, width = qh.shape
    shifts = np.arange(count, dtype=np.uint8).reshape(1, count, 1)
    return (qh.reshape(n, 1, width) >> shifts) & 1


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's twelve bytes -> eight 6-bit scales and eight 6-bit mins (n, 8) each."""
    n = packed.shape[0]
    d, m, m_d = np.split(packed.reshape(n, 3, 4), 3, axis=1)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


# Each decoder: blocks (n, type_size) uint8 -> codes (n, elements), scales (n, sub), zero points
# (n, sub) or one int, offsets (n, sub_offsets) or None.
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray | int, np.ndarray | None]


def _q8_0(b: np.ndarray) -> Decoded:
    return b[:, 2:] ^ np.uint8(0x80), _f16(b, 0), 128, None  # int8 q + 128, as uint8


def _q4_0(b: np.ndarray) -> Decoded:
    return _nibbles(b[:, 2:], 16), _f16(b, 0), 8, None


def _q5(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    return _nibbles(qs, 16) | (_bits_of(qh, 8).transpose(0, 2, 1).reshape(qh.shape[0], 32) << 4)


def _q5_0(b: np.ndarray) -> Decoded:
    return _q5(b[:, 2:6], b[:, 6:]), _f16(b, 0), 16, None


def _q4_1(b: np.ndarray) -> Decoded:
    return _nibbles(b[:, 4:], 16), _f16(b, 0), 0, _f16(b, 2)


def _q5_1(b: np.ndarray) -> Decoded:
    return _q5(b[:, 4:8], b[:, 8:]), _f16(b, 0), 0, _f16(b, 2)


def _q4_k(b: np.ndarray) -> Decoded:
    sc, mn = _k_scale_min(b[:, 4:16])
    return _nibbles(b[:, 16:], 32), _f16(b, 0) * sc, 0, -(_f16(b, 2) * mn)


def _q5_k(b: np.ndarray) -> Decoded:
    sc, mn = _k_scale_min(b[:, 4:16])
    n = b.shape[0]
    codes = _nibbles(b[:, 48:], 32) | (_bits_of(b[:, 16:48], 8).reshape(n, QK_K) << 4)
    return codes, _f16(b, 0) * sc, 0, -(_f16(b, 2) * mn)


def _q6_k(b: np.ndarray) -> Decoded:
    n = b.shape[0]
    low = _nibbles(b[:, :128], 64)
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    return low | (high.reshape(n, QK_K) << 4), _f16(b, 208) * scales, 32, None


def _q3_k(b: np.ndarray) -> Decoded:
    n = b.shape[0]
    low = (b[:, 32:96].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    high = _bits_of(b[:, :32], 8)  # (n, 8, 32): ggml subtracts 4 where the bit is clear
    codes = low.reshape(n, QK_K) | (high.reshape(n, QK_K) << 2)
    packed = b[:, 96:108]
    lo = (packed[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    hi = (packed[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16)
    sc = ((lo & 0x0F) | ((hi & 0x03) << 4)).astype(np.float32) - 32
    return codes, _f16(b, 108) * sc, 4, None


def _q2_k(b: np.ndarray) -> Decoded:
    n = b.shape[0]
    sc = b[:, :16]
    codes = (b[:, 16:80].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    scales = _f16(b, 80) * (sc & 0x0F).astype(np.float32)
    return codes.reshape(n, QK_K), scales, 0, -(_f16(b, 82) * (sc >> 4).astype(np.float32))


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type: its byte size, elements, and how it maps onto MatMulNBits."""

    elements: int  # per GGUF block
    type_size: int  # bytes per GGUF block
    bits: int
    block_size: int
    offset_block: int
    decode: Callable[[np.ndarray], Decoded]


BLOCK_TYPES: dict[str, BlockType] = {
    "Q8_0": BlockType(32, 34, 8, 32, 32, _q8_0),
    "Q4_0": BlockType(32, 18, 4, 32, 32, _q4_0),
    "Q5_0": BlockType(32, 22, 8, 32, 32, _q5_0),
    "Q4_1": BlockType(32, 20, 4, 32, 32, _q4_1),
    "Q5_1": BlockType(32, 24, 8, 32, 32, _q5_1),
    "Q2_K": BlockType(QK_K, 84, 4, 16, 16, _q2_k),
    "Q3_K": BlockType(QK_K, 110, 4, 16, 16, _q3_k),
    "Q4_K": BlockType(QK_K, 144, 4, 32, 32, _q4_k),
    "Q5_K": BlockType(QK_K, 176, 8, 32, 32, _q5_k),
    "Q6_K": BlockType(QK_K, 210, 8, 16, 16, _q6_k),
}

# Rows decoded at once: bounds the temporaries (a few bytes per element) for the vocabulary matrix.
_CHUNK_ELEMENTS = 1 << 23


def from_blocks(qtype: str, data: np.ndarray, shape: tuple[int, int]) -> GgmlMatrix:
    """A GGUF tensor's raw bytes (N, K / elements * type_size) uint8, as a GgmlMatrix (N, K)."""
    kind = BLOCK_TYPES.get(qtype)
    if kind is None:
        raise ValueError(f"GGUF type {qtype} has no exact MatMulNBits map (mapped: {', '.join(BLOCK_TYPES)})")
    rows, cols = shape
    if cols % kind.elements or data.shape != (rows, cols // kind.elements * kind.type_size):
        raise ValueError(f"{qtype} data {data.shape} does not hold a ({rows}, {cols}) matrix")
    codes = np.empty((rows, cols), np.uint8)
    scales = np.empty((rows, cols // kind.block_size), np.float32)
    zeros = np.empty((rows, cols // kind.block_size), np.uint8)
    offsets = None
    step = max(1, _CHUNK_ELEMENTS // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        blocks = np.ascontiguousarray(data[r0:r1]).reshape(-1, kind.type_size)  # (rows * per_row, size)
        c, s, z, o = kind.decode(blocks)
        codes[r0:r1] = c.reshape(r1 - r0, cols)
        scales[r0:r1] = s.reshape(r1 - r0, -1)
        zeros[r0:r1] = z if isinstance(z, int) else z.reshape(r1 - r0, -1)
        if o is not None:
            if offsets is None:
                offsets = np.empty((rows, cols // kind.offset_block), np.float32)
            offsets[r0:r1] = o.reshape(r1 - r0, -1)
    return GgmlMatrix(qtype, kind.bits, kind.block_size, codes, scales, zeros, offsets, kind.offset_block)


def n_bytes(m: GgmlMatrix) -> int:
    """Bytes of the matrix as initializers: packed codes, fp32 scales, zero points, offsets."""
    rows = m.shape[0]
    zp = rows * math.ceil(m.n_blocks * m.bits / 8)
    extra = 0 if m.offsets is None else m.offsets.nbytes
    return int(m.codes.size * m.bits // 8 + m.scales.nbytes + zp + extra)
