"""GPTQ: lower output error than rounding when the inputs are correlated; its calibration windows."""

from __future__ import annotations

import numpy as np
import pytest

from edge_qwen.export.calibrate import calibration_chunks
from edge_qwen.quant import dequantize, quantize
from edge_qwen.quant.gptq import act_order, gptq


def correlated_inputs(k: int, n: int, seed: int = 0) -> np.ndarray:
    """Heavy-tailed activations with uneven feature scales and correlations, like a transformer's."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.1 + np.eye(k)
    return (rng.standard_t(4, (n, k)) * np.exp(rng.standard_normal(k))) @ mix


def output_error(w: np.ndarray, q: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm((w - q) @ x.T) / np.linalg.norm(w @ x.T))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size", [32, 128])
def test_gptq_beats_importance_weighted_rounding(symmetric: bool, block_size: int) -> None:
    k = 160  # not a multiple of 128: a partial last block
    x = correlated_inputs(k, 2048)
    w = np.random.default_rng(1).standard_normal((48, k)).astype(np.float32) * 0.05
    hessian = (x.T @ x / len(x)).astype(np.float32)
    ours = output_error(w, dequantize(gptq(w, hessian, 4, block_size, symmetric)), x)
    kquant = output_error(w, dequantize(quantize(w, 4, block_size, symmetric, "kquant", np.diag(hessian))), x)
    assert ours < 0.8 * kquant


def test_gptq_output_is_a_valid_matmulnbits_matrix() -> None:
    x = correlated_inputs(64, 512)
    w = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    q = gptq(w, x.T @ x / len(x), 8, 32, False)
    assert q.packed.shape == (16, 2, 32) and q.zero_points is not None
    assert np.abs(dequantize(q) - w).max() < 0.1 * np.abs(w).max()  # int8: close even per element


def test_dead_inputs_are_zeroed_not_nan() -> None:
    x = correlated_inputs(64, 256)
    x[:, 5] = 0.0  # a feature no calibration token reaches
    w = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    deq = dequantize(gptq(w, x.T @ x / len(x), 4, 32, False))
    assert np.isfinite(deq).all()


def test_hessian_shape_is_checked() -> None:
    with pytest.raises(ValueError, match=r"hessian must be \(64, 64\)"):
        gptq(np.zeros((8, 64), np.float32), np.eye(32, dtype=np.float32), 4, 32, False)


def test_act_order_takes_whole_blocks_most_important_first() -> None:
    importance = np.array([1, 9, 2, 3, 8, 8, 0, 5, 4, 1], dtype=np.float64)  # K = 10, blocks of 4
    order = act_order(importance, 4, 3)  # padded to 12
    assert sorted(order) == list(range(12))
    chunks = order.reshape(3, 4)
    assert all(len(set(c // 4)) == 1 for c in chunks)  # each chunk is one block, whole
    assert [c[0] // 4 for c in chunks] == [1, 0, 2]  # sums 21, 15, 5
    assert chunks[0].tolist() == [4, 5, 7, 6] and chunks[2].tolist() == [8, 9, 10, 11]


def test_act_order_lowers_the_error_when_important_inputs_come_last() -> None:
    k = 256
    x = correlated_inputs(k, 4096, seed=3) * np.linspace(0.1, 3.0, k)  # importance grows along K
    w = np.random.default_rng(4).standard_normal((64, k)).astype(np.float32) * 0.05
    hessian = (x.T @ x / len(x)).astype(np.float32)
    ordered = output_error(w, dequantize(gptq(w, hessian, 4, 32, False, ordered=True)), x)
    left_to_right = output_error(w, dequantize(gptq(w, hessian, 4, 32, False)), x)
    assert ordered < 0.97 * left_to_right


def test_calibration_windows_span_the_whole_text() -> None:
    ids = list(range(10 * 512 + 100))  # ten whole windows and a tail
    chunks = calibration_chunks(ids, 512, 4)
    assert [c[0] for c in chunks] == [0, 3 * 512, 6 * 512, 9 * 512]  # first and last window included
    assert all(len(c) == 512 for c in chunks)


def test_a_short_calibration_text_is_taken_whole() -> None:
    ids = list(range(3 * 512 + 100))
    chunks = calibration_chunks(ids, 512, 16)
    assert [len(c) for c in chunks] == [512, 512, 512, 100]
    assert sum(chunks, []) == ids
