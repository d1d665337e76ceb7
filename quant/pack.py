"""Bit packing shared by ONNX Runtime's MatMulNBits and GatherBlockQuantized (uint8 storage).

Both ops store b-bit codes little-end first: for 4 bits the element with even index goes into the
low nibble of a byte and the next one into the high nibble; 8-bit codes are one byte each. Zero
points use the same packing along the block axis, padded with a zero nibble when the number of
blocks is odd (ONNX Runtime reads ceil(n_blocks * bits / 8) bytes per row).
"""

from __future__ import annotations

import numpy as np


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes along the last axis: (..., n) uint8 -> (..., n * bits // 8) uint8."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    assert bits == 4 and codes.shape[-1] % 2 == 0, (bits, codes.shape)
    low = codes[..., 0::2].astype(np.uint8)
    high = codes[..., 1::2].astype(np.uint8)
    return low | (high << 4)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_codes: (..., m) uint8 -> (..., m * 8 // bits) uint8 codes."""
    if bits == 8:
        return packed.astype(np.uint8, copy=True)
    assert bits == 4, bits
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Pack per-block zero points: (rows, n_blocks) -> (rows, ceil(n_blocks * bits / 8)) uint8."""
    rows, n_blocks = zero_points.shape
    if bits == 4 and n_blocks % 2:
        # Pad to an even count so the last byte holds (zp, 0): ORT expects ceil(n_blocks / 2) bytes.
        padded = np.zeros((rows, n_blocks + 1), dtype=np.uint8)
        padded[:, :n_blocks] = zero_points
        zero_points = padded
    return pack_codes(zero_points, bits)


def unpack_zero_points(packed: np.ndarray, bits: int, n_blocks: int) -> np.ndarray:
    """Inverse of pack_zero_points: (rows, ceil(n_blocks * bits / 8)) -> (rows, n_blocks) uint8."""
    return unpack_codes(packed, bits)[:, :n_blocks]
