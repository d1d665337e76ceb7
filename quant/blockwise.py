"""Block-wise INT4/INT8 quantization of Linear weights in ONNX Runtime's MatMulNBits layout.

A Linear weight W (N=out_features, K=in_features), Hugging Face layout, is cut along K into
n_blocks = ceil(K / block_size) blocks (K padded with zero weights, which quantize to the zero
point and so dequantize to exactly 0). Each block has a scale and an integer zero point:

    W[n, k] ~= (code[n, k] - zero_point[n, k // block_size]) * scale[n, k // block_size]

The arrays are exactly what com.microsoft MatMulNBits takes as B, scales and zero_points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import algos
from .pack import pack_codes, pack_zero_points, unpack_codes, unpack_zero_points

SUPPORTED_BITS = (4, 8)
SUPPORTED_BLOCK_SIZES = (32, 64, 128)
SUPPORTED_ALGOS = ("rtn", "kquant")

# Rows quantized at once: bounds the float32 temporaries (a few copies of ~4M elements).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class QuantError:
    """How far a dequantized matrix is from the original."""

    rel_rms: float  # ||W - deq||_F / ||W||_F
    max_abs: float  # max |W - deq|
    weighted_rel_rms: float | None = None  # rel_rms with columns weighted by importance, if given


@dataclass(frozen=True, eq=False)
class QuantizedMatrix:
    """A Linear weight (N, K) quantized block-wise along K, in MatMulNBits' input layout."""

    bits: int
    block_size: int
    symmetric: bool
    shape: tuple[int, int]  # (N, K) of the original weight
    packed: np.ndarray  # (N, n_blocks, block_size * bits // 8) uint8: MatMulNBits input B
    scales: np.ndarray  # (N, n_blocks) float32; feed flattened or as is
    zero_points: np.ndarray | None  # uint8 (N, ceil(n_blocks * bits / 8)); None: 2^(bits-1) implied

    def __post_init__(self) -> None:
        check_scheme(self.bits, self.block_size)
        rows, cols = self.shape
        n_blocks = math.ceil(cols / self.block_size)
        expect = {
            "packed": ((rows, n_blocks, self.block_size * self.bits // 8), np.uint8),
            "scales": ((rows, n_blocks), np.float32),
        }
        if not self.symmetric:
            expect["zero_points"] = ((rows, math.ceil(n_blocks * self.bits / 8)), np.uint8)
        elif self.zero_points is not None:
            raise ValueError("a symmetric QuantizedMatrix has no zero_points (2^(bits-1) is implied)")
        for name, (shape, dtype) in expect.items():
            array = getattr(self, name)
            if array is None or array.shape != shape or array.dtype != dtype:
                found = None if array is None else (array.shape, array.dtype)
                raise ValueError(f"QuantizedMatrix.{name} must be {np.dtype(dtype)} {shape}, got {found}")

    @property
    def n_blocks(self) -> int:
        """Blocks per row, ceil(K / block_size)."""
        return int(self.scales.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of packed weights, scales and zero points together."""
        extra = 0 if self.zero_points is None else self.zero_points.nbytes
        return int(self.packed.nbytes + self.scales.nbytes + extra)

    def rows(self, start: int, stop: int) -> QuantizedMatrix:
        """Rows [start, stop) of the weight, as views of this matrix's arrays."""
        if not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) are not within the weight's {self.shape[0]} rows")
        return QuantizedMatrix(
            bits=self.bits,
            block_size=self.block_size,
            symmetric=self.symmetric,
            shape=(stop - start, self.shape[1]),
            packed=self.packed[start:stop],
            scales=self.scales[start:stop],
            zero_points=None if self.zero_points is None else self.zero_points[start:stop],
        )

    def error(self, w: np.ndarray, importance: np.ndarray | None = None) -> QuantError:
        """Error of this quantization against the original weight w (N, K)."""
        return quantization_error(w, self, importance)


def check_scheme(bits: int, block_size: int, algo: str = "rtn") -> None:
    """Raise ValueError naming the value unless bits, block_size and algo are supported."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    if algo not in SUPPORTED_ALGOS:
        raise ValueError(f"algo must be one of {SUPPORTED_ALGOS}, got {algo!r}")


def quantize(
    w: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool,
    algo: str = "rtn",
    importance: np.ndarray | None = None,
) -> QuantizedMatrix:
    """Quantize a Linear weight w (N, K) block-wise along K into MatMulNBits' layout.

    importance (K,), e.g. the mean squared activation of each input feature from calibration,
    weights the squared error minimized by algo="kquant".
    """
    check_scheme(bits, block_size, algo)
    w = _check_weight(w)
    rows, cols = w.shape
    weights = _block_weights(cols, block_size, importance, algo)  # (n_blocks, block_size) | None
    n_blocks = math.ceil(cols / block_size)
    codes = np.empty((rows, n_blocks, block_size), dtype=np.uint8)
    scales = np.empty((rows, n_blocks), dtype=np.float32)
    zeros = np.empty((rows, n_blocks), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // (n_blocks * block_size))
    for r0 in range(0, rows, step):
        blocks = _blocks(w[r0 : r0 + step], n_blocks, block_size)  # (rows_chunk, n_blocks, block_size)
        if algo == "rtn":
            out = algos.rtn(blocks, bits, symmetric)
        else:
            out = algos.kquant(blocks, weights, bits, symmetric)
        codes[r0 : r0 + step], scales[r0 : r0 + step], zeros[r0 : r0 + step] = out
    return QuantizedMatrix(
        bits=bits,
        block_size=block_size,
        symmetric=symmetric,
        shape=(rows, cols),
        packed=pack_codes(codes, bits),
        scales=scales,
        zero_points=None if symmetric else pack_zero_points(zeros, bits),
    )


def dequantize(q: QuantizedMatrix) -> np.ndarray:
    """Float32 (N, K) weight that MatMulNBits multiplies by."""
    rows, cols = q.shape
    codes = unpack_codes(q.packed, q.bits).astype(np.float32)  # (N, n_blocks, block_size)
    codes -= zero_points_of(q)[..., None].astype(np.float32)
    codes *= q.scales[..., None]
    return codes.reshape(rows, -1)[:, :cols]


def zero_points_of(q: QuantizedMatrix) -> np.ndarray:
    """Unpacked zero points (N, n_blocks) uint8, including the implied 2^(bits-1) when symmetric."""
    if q.zero_points is None:
        return np.full(q.scales.shape, 1 << (q.bits - 1), dtype=np.uint8)
    return unpack_zero_points(q.zero_points, q.bits, q.n_blocks)


def quantization_error(w: np.ndarray, q: QuantizedMatrix, importance: np.ndarray | None = None) -> QuantError:
    """Relative RMS and max absolute error of q against the original weight w (N, K)."""
    w = _check_weight(w)
    if w.shape != q.shape:
        raise ValueError(f"weight shape {w.shape} does not match the quantized shape {q.shape}")
    diff = dequantize(q) - w  # (N, K)
    weighted = None
    if importance is not None:
        imp = _check_importance(importance, w.shape[1])
        den = float(np.einsum("nk,nk,k->", w, w, imp, dtype=np.float64))
        num = float(np.einsum("nk,nk,k->", diff, diff, imp, dtype=np.float64))
        weighted = math.sqrt(num / den) if den > 0 else 0.0
    den = float(np.einsum("nk,nk->", w, w, dtype=np.float64))
    num = float(np.einsum("nk,nk->", diff, diff, dtype=np.float64))
    return QuantError(
        rel_rms=math.sqrt(num / den) if den > 0 else math.sqrt(num),
        max_abs=float(np.abs(diff).max(initial=0.0)),
        weighted_rel_rms=weighted,
    )


def _check_weight(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"weight must be a non-empty 2-D (out_features, in_features) array, got {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"weight must be floating point, got {w.dtype}")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or infinity; quantization needs finite values")
    return w


def _check_importance(importance: np.ndarray, cols: int) -> np.ndarray:
    imp = np.asarray(importance, dtype=np.float32)
    if imp.shape != (cols,):
        raise ValueError(f"importance must have shape ({cols},) (one per input feature), got {imp.shape}")
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise ValueError("importance must be finite and non-negative")
    return imp


def _block_weights(cols: int, block_size: int, importance: np.ndarray | None, algo: str) -> np.ndarray | None:
    """Per-element weights (n_blocks, block_size) for kquant's error, zero on K padding; None if uniform."""
    if importance is not None and algo != "kquant":
        raise ValueError(f"importance is only used by algo='kquant', got algo={algo!r}")
    padded = math.ceil(cols / block_size) * block_size
    if importance is None and padded == cols:
        return None
    weights = np.zeros(padded, dtype=np.float32)
    weights[:cols] = 1.0 if importance is None else _check_importance(importance, cols)
    return weights.reshape(-1, block_size)


def _blocks(w: np.ndarray, n_blocks: int, block_size: int) -> np.ndarray:
    """Rows of w (r, K) as zero-padded blocks (r, n_blocks, block_size) float32."""
    rows, cols = w.shape
    if cols == n_blocks * block_size:
        return w.reshape(rows, n_blocks, block_size)
    padded = np.zeros((rows, n_blocks * block_size), dtype=np.float32)
    padded[:, :cols] = w
    return padded.reshape(rows, n_blocks, block_size)
