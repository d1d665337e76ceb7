"""LPBQ, HTP's block-wise weight encoding: ranges, error against simpler encodings, GPTQ's rounding onto
its grid, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from edge_qwen.quant.lpbq import gptq_lpbq, quantize_lpbq
from tests.test_gptq import correlated_inputs


def weights(seed: int = 0) -> np.ndarray:
    """(256, 48) weights whose rows differ in scale, as real projections' inputs do."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 0.02, (256, 48)) * rng.lognormal(0, 1, (256, 1))).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_and_scales_stay_in_their_ranges(bits: int) -> None:
    encoded = quantize_lpbq(weights(), block_size=64, bits=bits)
    assert encoded.q.min() >= -(2 ** (bits - 1)) and encoded.q.max() <= 2 ** (bits - 1) - 1
    assert encoded.block_scales.dtype == np.uint8 and encoded.block_scales.min() >= 1
    assert encoded.block_scales.shape == (4, 48) and encoded.channel_scales.shape == (48,)


def test_blocks_beat_one_scale_per_channel_and_int8_beats_int4() -> None:
    w = weights()
    per_channel_step = np.abs(w).max(axis=0) / 7
    per_channel = np.clip(np.rint(w / per_channel_step), -8, 7) * per_channel_step
    int4 = quantize_lpbq(w, block_size=64, bits=4).dequantize()
    int8 = quantize_lpbq(w, block_size=64, bits=8).dequantize()
    error = {
        name: float(((q - w) ** 2).mean()) for name, q in [("pc", per_channel), ("4", int4), ("8", int8)]
    }
    assert error["4"] < 0.7 * error["pc"]
    assert error["8"] < error["4"] / 100


def test_uint8_block_scales_cost_little_against_float_block_scales() -> None:
    w = weights(1)
    blocks = w.reshape(4, 64, 48)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 7
    float_scales = (np.clip(np.rint(blocks / step), -8, 7) * step).reshape(w.shape)
    lpbq = quantize_lpbq(w, block_size=64, bits=4).dequantize()
    assert ((lpbq - w) ** 2).mean() <= 1.05 * ((float_scales - w) ** 2).mean()


def test_a_size_the_block_does_not_divide_is_refused() -> None:
    with pytest.raises(ValueError, match="not a multiple of the block size 64"):
        quantize_lpbq(np.zeros((96, 8), np.float32), block_size=64)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_onto_the_grid_cuts_the_output_error_of_rounding(bits: int) -> None:
    w = weights(2)
    x = correlated_inputs(256, 2048)
    hessian = (x.T @ x / len(x)).astype(np.float32)
    rounded, ours = quantize_lpbq(w, 64, bits), gptq_lpbq(w, hessian, 64, bits)

    def output_error(q: np.ndarray) -> float:
        return float(np.linalg.norm(x @ (q - w)) / np.linalg.norm(x @ w))

    assert output_error(ours.dequantize()) < 0.8 * output_error(rounded.dequantize())
    # Still exactly LPBQ: codes in range, uint8 block scales, the channel scales of the plain encoding
    assert ours.q.min() >= -(2 ** (bits - 1)) and ours.q.max() <= 2 ** (bits - 1) - 1
    assert ours.block_scales.dtype == np.uint8 and ours.block_scales.min() >= 1
    np.testing.assert_array_equal(ours.channel_scales, rounded.channel_scales)


def test_gptq_refuses_statistics_of_another_size() -> None:
    with pytest.raises(ValueError, match=r"hessian must be \(256, 256\)"):
        gptq_lpbq(weights(), np.eye(128, dtype=np.float32))
