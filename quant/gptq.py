"""GPTQ: quantize a Linear weight column by column, pushing each column's rounding error onto the
columns not yet quantized, through the inverse Hessian of the layer's inputs (Frantar et al., 2022).

With H = X^T X / n from calibration activations X (n, K), it minimizes ||X W^T - X Q^T|| rather than
||W - Q||: errors go where the inputs cannot see them. Each block of `block_size` columns gets its
scale and zero point from the importance-weighted least-squares search (kquant) on the columns as
they stand when the block is reached. Output: the same MatMulNBits layout as `quantize`.

Order: left to right by default. `ordered=True` takes "act order" instead: errors only flow to
columns not yet quantized, so the columns the inputs weigh most go first. MatMulNBits needs each
block's columns together, so whole blocks are taken in order of their summed diag(H), and columns
within a block in order of their own (the block's scale is fitted before any of its columns is
quantized, so the order within it is free). On the real 0.5B it lowered each layer's output error
tr(dW H dW^T) by 2-25%, but not the model's KLD (docs/quantization.md), so it is not the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import algos
from .blockwise import QuantizedMatrix, check_scheme
from .pack import pack_codes, pack_zero_points

DAMPING = 0.01  # fraction of mean(diag(H)) added to the diagonal, as in the paper


def gptq(
    w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, symmetric: bool, ordered: bool = False
) -> QuantizedMatrix:
    """Quantize w (N, K) given its input Hessian (K, K); `ordered`: act order. See the module docstring."""
    check_scheme(bits, block_size, "kquant")
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"hessian must be ({cols}, {cols}) for a weight of shape {w.shape}, got {hessian.shape}"
        )
    n_blocks = math.ceil(cols / block_size)
    w, hessian = _pad_to_blocks(w, hessian, n_blocks * block_size)
    if not ordered:
        q = _gptq_in_order(w, hessian, bits, block_size, symmetric)
        codes, scales, zeros = q.codes, q.scales, q.zeros
    else:
        order = act_order(np.diag(hessian), block_size, n_blocks)
        q = _gptq_in_order(w[:, order], hessian[np.ix_(order, order)], bits, block_size, symmetric)
        codes = np.empty_like(q.codes)
        codes[:, order] = q.codes
        block_order = order[::block_size] // block_size
        scales = np.empty_like(q.scales)
        zeros = np.empty_like(q.zeros)
        scales[:, block_order], zeros[:, block_order] = q.scales, q.zeros
    return QuantizedMatrix(
        bits=bits,
        block_size=block_size,
        symmetric=symmetric,
        shape=(rows, cols),
        packed=pack_codes(codes.reshape(rows, n_blocks, block_size), bits),
        scales=scales,
        zero_points=None if symmetric else pack_zero_points(zeros, bits),
    )


def _pad_to_blocks(w: np.ndarray, hessian: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """w (N, K) and H (K, K) zero-padded to k columns (dead inputs); as they are when K == k."""
    cols = w.shape[1]
    if cols == k:
        return w, hessian
    padded = np.zeros((w.shape[0], k), dtype=np.float32)
    padded[:, :cols] = w
    h = np.zeros((k, k), dtype=hessian.dtype)
    h[:cols, :cols] = hessian
    return padded, h


def act_order(importance: np.ndarray, block_size: int, n_blocks: int) -> np.ndarray:
    """Column order: blocks by decreasing summed importance, within each by decreasing importance.

    `importance` (K,) is padded with zeros to whole blocks; padding columns come last in their block.
    """
    d = np.zeros(n_blocks * block_size, dtype=np.float64)
    d[: len(importance)] = np.maximum(importance, 0)  # already whole blocks when gptq() calls it
    per_block = d.reshape(n_blocks, block_size)
    blocks = np.argsort(-per_block.sum(axis=1), kind="stable")
    within = np.argsort(-per_block[blocks], axis=1, kind="stable")
    return (blocks[:, None] * block_size + within).reshape(-1)


@dataclass
class _Quantized:
    codes: np.ndarray  # (N, K) uint8, in the order quantized
    scales: np.ndarray  # (N, n_blocks) float32
    zeros: np.ndarray  # (N, n_blocks) uint8


def _gptq_in_order(
    w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, symmetric: bool
) -> _Quantized:
    """GPTQ over whole blocks of w (N, n_blocks * block_size) taken left to right."""
    rows, cols = w.shape
    work = np.array(w, dtype=np.float32)  # (N, K), updated in place as errors are compensated
    u, weights = _inverse_cholesky(hessian, work)  # u: upper Cholesky factor of H^-1 (K, K)
    n_blocks = cols // block_size
    codes = np.empty((rows, n_blocks * block_size), dtype=np.uint8)
    scales = np.empty((rows, n_blocks), dtype=np.float32)
    zeros = np.empty((rows, n_blocks), dtype=np.uint8)
    for b in range(n_blocks):
        c0, c1 = b * block_size, (b + 1) * block_size
        block = work[:, None, c0:c1].copy()
        fit = algos.kquant(block, weights[None, c0:c1], bits, symmetric)
        scales[:, b], zeros[:, b] = fit.scales[:, 0], fit.zero_points[:, 0]
        # Padding past K is a dead column (no input reaches it): zeroed, it takes the zero point's code.
        codes[:, c0:c1] = _quantize_columns(
            work, u, c0, c1, scales[:, b], zeros[:, b].astype(np.float32), bits
        )
    return _Quantized(codes, scales, zeros)


def _inverse_cholesky(hessian: np.ndarray, work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Damped H -> upper Cholesky factor of H^-1; columns no input ever reaches are zeroed in `work`."""
    h = np.array(hessian, dtype=np.float64)
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    work[:, dead] = 0.0
    h[np.diag_indices_from(h)] += DAMPING * float(np.mean(np.diag(h)))
    lower = np.linalg.cholesky(np.linalg.inv(h))  # H^-1 = L L^T
    return lower.T.astype(np.float32), np.where(dead, 0.0, diag).astype(np.float32)


def _quantize_columns(
    work: np.ndarray, u: np.ndarray, c0: int, c1: int, scale: np.ndarray, zero: np.ndarray, bits: int
) -> np.ndarray:
    """Quantize columns c0..c1 one at a time, compensating later columns; returns codes (N, c1 - c0)."""
    nmax = (1 << bits) - 1
    inv_scale = np.zeros_like(scale)
    np.divide(1.0, scale, out=inv_scale, where=scale != 0)
    codes = np.empty((work.shape[0], c1 - c0), dtype=np.uint8)
    errors = np.empty((work.shape[0], c1 - c0), dtype=np.float32)
    for j in range(c0, c1):
        q = np.clip(np.rint(work[:, j] * inv_scale) + zero, 0, nmax)  # (N,)
        codes[:, j - c0] = q
        err = (work[:, j] - (q - zero) * scale) / u[j, j]
        work[:, j + 1 : c1] -= np.outer(err, u[j, j + 1 : c1])
        errors[:, j - c0] = err
    work[:, c1:] -= errors @ u[c0:c1, c1:]  # the rest of the row, in one product
    return codes
