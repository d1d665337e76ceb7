"""Low-power block quantization (LPBQ), the block-wise weight encoding of Qualcomm's HTP.

A weight (in, out) is cut into blocks of `block_size` input rows per output channel. Each block has
its own scale, but stored as an integer: uint8 block scales times one float scale per output channel,
so that HTP keeps per-channel float arithmetic:

    w[i, o] ~= q[i, o] * block_scale[i // block_size, o] * channel_scale[o]
    q: signed `bits`-bit, symmetric; block_scale: uint8 in [1, 255]; channel_scale: float32

quantize_lpbq rounds each weight to its nearest grid point; gptq_lpbq rounds onto the same grid with
GPTQ's error compensation through the layer's input statistics X^T X (quant/gptq.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gptq import _inverse_cholesky, _quantize_columns

# Each block's clipping range is searched among these fractions of its largest magnitude.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)


@dataclass(frozen=True)
class LpbqWeight:
    q: np.ndarray  # (in, out) int8 holding `bits`-bit values
    block_scales: np.ndarray  # (in // block_size, out) uint8
    channel_scales: np.ndarray  # (out,) float32
    block_size: int
    bits: int

    def dequantize(self) -> np.ndarray:
        scales = self.block_scales.astype(np.float32) * self.channel_scales  # (blocks, out)
        return self.q.astype(np.float32) * np.repeat(scales, self.block_size, axis=0)


def quantize_lpbq(w: np.ndarray, block_size: int = 64, bits: int = 4) -> LpbqWeight:
    """LPBQ of w (in, out): per block, the clipping (of CLIP_RATIOS) with the least squared error."""
    n_in, n_out = w.shape
    if n_in % block_size:
        raise ValueError(f"input size {n_in} is not a multiple of the block size {block_size}")
    qmax = 2 ** (bits - 1) - 1
    blocks = w.astype(np.float32).reshape(n_in // block_size, block_size, n_out)
    absmax = np.abs(blocks).max(axis=1)  # (blocks, out)
    channel = np.maximum(absmax.max(axis=0) / qmax / 255.0, np.finfo(np.float32).tiny)  # (out,)
    best_error = np.full(absmax.shape, np.inf, np.float32)
    best_scale = np.ones(absmax.shape, np.uint8)
    for ratio in CLIP_RATIOS:
        scale = np.clip(np.ceil(absmax * ratio / qmax / channel), 1, 255).astype(np.uint8)
        step = (scale * channel)[:, None, :]
        error = ((np.clip(np.rint(blocks / step), -qmax - 1, qmax) * step - blocks) ** 2).sum(axis=1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, scale, best_scale)
    step = (best_scale * channel)[:, None, :]
    q = np.clip(np.rint(blocks / step), -qmax - 1, qmax).astype(np.int8).reshape(n_in, n_out)
    return LpbqWeight(q, best_scale, channel.astype(np.float32), block_size, bits)


def gptq_lpbq(w: np.ndarray, hessian: np.ndarray, block_size: int = 64, bits: int = 4) -> LpbqWeight:
    """LPBQ of w (in, out) with GPTQ's rounding: input rows quantized in order, each one's error pushed
    onto the rows not yet quantized through H = X^T X / n (in, in) of the layer's inputs.

    The channel scales come from w as given; each block's integer scale is chosen (of CLIP_RATIOS, by
    the error weighted by diag(H)) when the block is reached, from its weights as compensated so far.
    """
    n_in, n_out = w.shape
    if n_in % block_size:
        raise ValueError(f"input size {n_in} is not a multiple of the block size {block_size}")
    if hessian.shape != (n_in, n_in):
        raise ValueError(
            f"hessian must be ({n_in}, {n_in}) for a weight of {n_in} inputs, got {hessian.shape}"
        )
    qmax = 2 ** (bits - 1) - 1
    channel = np.maximum(np.abs(w).max(axis=0) / qmax / 255.0, np.finfo(np.float32).tiny).astype(np.float32)
    work = np.array(w.T, dtype=np.float32)  # (out, in): GPTQ's layout, compensated in place
    u, importance = _inverse_cholesky(hessian, work)
    codes = np.empty((n_out, n_in), np.uint8)  # offset by qmax + 1: GPTQ's unsigned codes
    block_scales = np.empty((n_in // block_size, n_out), np.uint8)
    zero = np.full(n_out, qmax + 1, np.float32)
    for b in range(n_in // block_size):
        c0, c1 = b * block_size, (b + 1) * block_size
        scale = _block_scale(work[:, c0:c1], importance[c0:c1], channel, qmax)
        block_scales[b] = scale
        codes[:, c0:c1] = _quantize_columns(work, u, c0, c1, scale * channel, zero, bits)
    q = (codes.astype(np.int16) - (qmax + 1)).astype(np.int8).T
    return LpbqWeight(np.ascontiguousarray(q), block_scales, channel, block_size, bits)


def _block_scale(block: np.ndarray, importance: np.ndarray, channel: np.ndarray, qmax: int) -> np.ndarray:
    """The uint8 scale (out,) of one block (out, block_size) with the least error weighted by importance."""
    absmax = np.abs(block).max(axis=1)
    best_error = np.full(absmax.shape, np.inf, np.float32)
    best = np.ones(absmax.shape, np.uint8)
    for ratio in CLIP_RATIOS:
        scale = np.clip(np.ceil(absmax * ratio / qmax / channel), 1, 255).astype(np.uint8)
        step = (scale * channel)[:, None]
        error = ((np.clip(np.rint(block / step), -qmax - 1, qmax) * step - block) ** 2) @ importance
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best = np.where(better, scale, best)
    return best
