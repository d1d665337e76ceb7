"""GPTQ: quantize a Linear weight column by column, pushing each column's rounding error onto the
columns not yet quantized, through the inverse Hessian of the layer's inputs (Frantar et al., 2022).

With H = X^T X / n from calibration activations X (n, K), it minimizes ||X W^T - X Q^T|| rather than
||W - Q||: errors go where the inputs cannot see them. Each block of `block_size` columns gets its
scale and zero point from the importance-weighted least-squares search (kquant) on the columns as
they stand when the block is reached. Output: the same MatMulNBits layout as `quantize`.
"""

from __future__ import annotations

import math

import numpy as np

from . import algos
from .blockwise import QuantizedMatrix, check_scheme
from .pack import pack_codes, pack_zero_points

DAMPING = 0.01  # fraction of mean(diag(H)) added to the diagonal, as in the paper


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, symmetric: bool) -> QuantizedMatrix:
    """Quantize w (N, K) given its input Hessian (K, K); see the module docstring."""
    check_scheme(bits, block_size, "kquant")
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"hessian must be ({cols}, {cols}) for a weight of shape {w.shape}, got {hessian.shape}"
        )
    work = np.array(w, dtype=np.float32)  # (N, K), updated in place as errors are compensated
    u, weights = _inverse_cholesky(hessian, work)  # u: upper Cholesky factor of H^-1 (K, K)
    n_blocks = math.ceil(cols / block_size)
    codes = np.empty((rows, n_blocks * block_size), dtype=np.uint8)
    scales = np.empty((rows, n_blocks), dtype=np.float32)
    zeros = np.empty((rows, n_blocks), dtype=np.uint8)
    for b in range(n_blocks):
        c0, c1 = b * block_size, min(cols, (b + 1) * block_size)
        block = np.zeros((rows, 1, block_size), dtype=np.float32)
        block[:, 0, : c1 - c0] = work[:, c0:c1]
        block_weights = np.zeros((1, block_size), dtype=np.float32)
        block_weights[0, : c1 - c0] = weights[c0:c1]
        fit = algos.kquant(block, block_weights, bits, symmetric)
        scales[:, b], zeros[:, b] = fit.scales[:, 0], fit.zero_points[:, 0]
        codes[:, c0:c1] = _quantize_columns(
            work, u, c0, c1, scales[:, b], zeros[:, b].astype(np.float32), bits
        )
        codes[:, c1 : (b + 1) * block_size] = zeros[:, b : b + 1]  # K padding dequantizes to 0
    return QuantizedMatrix(
        bits=bits,
        block_size=block_size,
        symmetric=symmetric,
        shape=(rows, cols),
        packed=pack_codes(codes.reshape(rows, n_blocks, block_size), bits),
        scales=scales,
        zero_points=None if symmetric else pack_zero_points(zeros, bits),
    )


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
