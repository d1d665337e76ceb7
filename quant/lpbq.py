"""Low-power block quantization (LPBQ), the block-wise weight encoding of Qualcomm's HTP.

A weight (in, out) is cut into blocks of `block_size` input rows per output channel. Each block has
its own scale, but stored as an integer: uint8 block scales times one float scale per output channel,
so that HTP keeps per-channel float arithmetic:

    w[i, o] ~= q[i, o] * block_scale[i // block_size, o] * channel_scale[o]
    q: signed `bits`-bit, symmetric; block_scale: uint8 in [1, 255]; channel_scale: float32
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
