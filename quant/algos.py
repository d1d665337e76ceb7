"""Per-block quantizers: round-to-nearest and a least-squares scale search ("kquant").

Every function here works on blocks laid out as x (..., block_size) float32 and returns unsigned
codes q with the convention shared by MatMulNBits and GatherBlockQuantized:

    w ~= (q - zero_point) * scale,   q in [0, 2^bits - 1],   zero_point an integer in the same range.

Symmetric schemes fix zero_point = 2^(bits-1), the value both ops assume when no zero_points input
is given. Scales may be negative (see `rtn`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Candidate inverse-scale multipliers tried by kquant around the RTN scale; > 1 clips the block's
# extremes to gain resolution for the bulk, < 1 widens the range. RTN (1.0) is always first so the
# search starts from it. On Gaussian and Student-t weights a dense grid (0.8 to 3.0 by 0.025) gained
# under 0.5% more, and an exhaustive search over scales and zero points ~1% more, than these few.
SYMMETRIC_GRID = (1.0, 0.9375, 1.0625, 1.125, 1.1875, 1.25, 1.3125, 1.375, 1.5, 1.625, 1.75)
ASYMMETRIC_GRID = (1.0, 0.9375, 1.0625, 1.125, 1.1875, 1.25, 1.375, 1.5)
REFINE_STEPS = 2


class BlockCodes(NamedTuple):
    """Quantized blocks: codes (..., block_size) uint8, scales (...) float32, zero_points (...) uint8."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray


def _inverse(values: np.ndarray) -> np.ndarray:
    """1 / values, with 0 where values == 0 (all-zero blocks)."""
    out = np.zeros(values.shape, dtype=np.float32)
    np.divide(1.0, values, out=out, where=values != 0)
    return out


def _round(x: np.ndarray, inv_scale: np.ndarray, zero: np.ndarray, nmax: int) -> np.ndarray:
    """Nearest code for each element: x (..., bs), inv_scale and zero (...) -> (..., bs) float32."""
    q = np.rint(x * inv_scale[..., None])
    q += zero[..., None]
    return np.clip(q, 0, nmax, out=q)


def _fit(
    x: np.ndarray, weights: np.ndarray | None, inv_scale: np.ndarray, zero: np.ndarray, nmax: int
) -> tuple[np.ndarray, np.ndarray]:
    """Round with one candidate, then solve the weighted least-squares scale for those codes.

    Returns (scale, score), both (...); the weighted squared error is sum(w x^2) - score, so a
    higher score is better.
    """
    levels = _round(x, inv_scale, zero, nmax)
    levels -= zero[..., None]  # (..., bs) signed integer levels q - zero_point
    weighted = levels if weights is None else levels * weights
    sum_lx = np.einsum("...i,...i->...", weighted, x)
    sum_l2 = np.einsum("...i,...i->...", weighted, levels)
    scale = np.zeros(sum_lx.shape, dtype=np.float32)
    np.divide(sum_lx, sum_l2, out=scale, where=sum_l2 > 0)
    return scale, sum_lx * scale


def rtn(x: np.ndarray, bits: int, symmetric: bool) -> BlockCodes:
    """Round to nearest over each block's full range.

    Symmetric: the llama.cpp Q4_0 mapping, scale = (signed value of largest magnitude) / -2^(bits-1),
    so that value lands exactly on code 0 and all 2^bits levels are used (absmax / (2^(bits-1) - 1)
    would waste one level: 15 instead of 16 for int4). The price is a signed scale and, for elements
    of the opposite sign within 1/16 of the peak, a clamp error of at most one step.
    Asymmetric: scale = (max - min) / (2^bits - 1) over the range widened to include 0 (an integer
    zero point can only represent ranges containing 0), zero_point = round(-min / scale).
    """
    nmax = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        peak_at = np.argmax(np.abs(x), axis=-1)[..., None]
        peak = np.take_along_axis(x, peak_at, axis=-1)[..., 0]  # (...) signed largest-magnitude value
        scales = (peak / -half).astype(np.float32)
        zero = np.full(scales.shape, half, dtype=np.float32)
    else:
        low = np.minimum(x.min(axis=-1), 0.0)
        high = np.maximum(x.max(axis=-1), 0.0)
        scales = ((high - low) / nmax).astype(np.float32)
        zero = np.clip(np.rint(-low * _inverse(scales)), 0, nmax)
    codes = _round(x, _inverse(scales), zero, nmax)
    return BlockCodes(codes.astype(np.uint8), scales, zero.astype(np.uint8))


def kquant(x: np.ndarray, weights: np.ndarray | None, bits: int, symmetric: bool) -> BlockCodes:
    """Least-squares scale search per block (the idea behind llama.cpp's make_qx/make_qkx quants).

    For each candidate scale around the RTN one: round, solve the scale minimizing the weighted
    squared error for those codes, keep the best; asymmetric blocks also try the neighbouring zero
    points; then alternate re-rounding and re-solving. weights (broadcastable to x) is an optional
    per-element importance, None meaning uniform. Never worse than `rtn` in weighted squared error,
    block by block: RTN is kept wherever the search does not beat it (also where all weights are 0).
    """
    nmax = (1 << bits) - 1
    start = rtn(x, bits, symmetric)
    inv_rtn = _inverse(start.scales)  # (...)
    best = _Best(x, weights, nmax, inv_rtn, start.zero_points.astype(np.float32))
    for factor in (SYMMETRIC_GRID if symmetric else ASYMMETRIC_GRID)[1:]:
        inv = inv_rtn * np.float32(factor)
        if symmetric:
            best.offer(inv, best.zero)
        else:
            best.offer(*_offset_fit(x, weights, inv, nmax))
    if not symmetric:
        # The rounded zero point may be one code off the best: try both neighbours at the solved scale.
        for shift in (-1.0, 1.0):
            best.offer(_inverse(best.scale), np.clip(best.zero + shift, 0, nmax))
    for _ in range(REFINE_STEPS):
        # Re-rounding with the solved scale picks the nearest codes for it, so each step can only help.
        best.offer(_inverse(best.scale), best.zero)
    codes = _round(x, best.inv, best.zero, nmax)
    # Scores are float32 differences of nearly equal sums (noisy at 8 bits), so settle "never worse
    # than RTN" on directly computed errors; ties (e.g. blocks whose importance is all 0) keep RTN.
    keep_rtn = _sq_error(x, weights, start.codes, start.zero_points, start.scales) <= _sq_error(
        x, weights, codes, best.zero, best.scale
    )
    return BlockCodes(
        np.where(keep_rtn[..., None], start.codes, codes.astype(np.uint8)),
        np.where(keep_rtn, start.scales, best.scale).astype(np.float32),
        np.where(keep_rtn, start.zero_points, best.zero.astype(np.uint8)),
    )


class _Best:
    """Per-block best candidate so far: the rounding (inv, zero) and its least-squares scale."""

    def __init__(
        self, x: np.ndarray, weights: np.ndarray | None, nmax: int, inv: np.ndarray, zero: np.ndarray
    ) -> None:
        self.x, self.weights, self.nmax = x, weights, nmax
        self.inv, self.zero = inv, zero  # (...) rounding that produced the codes
        self.scale, self.score = _fit(x, weights, inv, zero, nmax)  # (...) solved scale, its score

    def offer(self, inv: np.ndarray, zero: np.ndarray) -> None:
        """Evaluate one candidate rounding and keep it in the blocks where it lowers the error."""
        scale, score = _fit(self.x, self.weights, inv, zero, self.nmax)
        better = score > self.score
        self.inv = np.where(better, inv, self.inv)
        self.zero = np.where(better, zero, self.zero)
        self.scale = np.where(better, scale, self.scale)
        self.score = np.where(better, score, self.score)


def _offset_fit(
    x: np.ndarray, weights: np.ndarray | None, inv_step: np.ndarray, nmax: int
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate (inverse scale, integer zero point) for one step size: fit x ~ scale * l + offset.

    The codes l = round((x - min) / step) stretch the block over [0, nmax]; the least-squares
    offset then balances clipping between both ends (make_qkx2_quants) and is rounded to a code.
    """
    low = np.minimum(x.min(axis=-1), 0.0)  # (...)
    levels = np.rint((x - low[..., None]) * inv_step[..., None])
    np.clip(levels, 0, nmax, out=levels)  # (..., bs)
    if weights is None:
        sum_w = np.float32(x.shape[-1])
        wl, sum_x = levels, x.sum(axis=-1)
    else:
        sum_w = np.broadcast_to(weights, x.shape).sum(axis=-1)
        wl, sum_x = levels * weights, np.einsum("...i,...i->...", np.broadcast_to(weights, x.shape), x)
    sum_l = wl.sum(axis=-1)
    sum_l2 = np.einsum("...i,...i->...", wl, levels)
    sum_lx = np.einsum("...i,...i->...", wl, x)
    det = sum_w * sum_l2 - sum_l * sum_l
    scale = np.zeros(det.shape, dtype=np.float32)
    offset = np.zeros(det.shape, dtype=np.float32)
    np.divide(sum_w * sum_lx - sum_x * sum_l, det, out=scale, where=det > 0)
    np.divide(sum_l2 * sum_x - sum_l * sum_lx, det, out=offset, where=det > 0)
    ok = scale > 0
    inv = np.where(ok, _inverse(scale), inv_step)
    zero = np.where(ok, -offset * inv, -low * inv_step)  # fallback: anchor the minimum, as RTN does
    return inv.astype(np.float32), np.clip(np.rint(zero), 0, nmax).astype(np.float32)


def _sq_error(
    x: np.ndarray, weights: np.ndarray | None, codes: np.ndarray, zero: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """Weighted squared error per block (...) of codes (..., bs) dequantized with zero and scale (...)."""
    diff = codes.astype(np.float32)
    diff -= zero.astype(np.float32)[..., None]
    diff *= scale[..., None]
    diff -= x
    weighted = diff if weights is None else diff * weights
    return np.einsum("...i,...i->...", weighted, diff)
