"""edge_qwen.quant: error bounds, and parity of our packing with ONNX Runtime's contrib ops."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest

from edge_qwen.quant import (
    QuantizedEmbedding,
    QuantizedMatrix,
    dequantize,
    dequantize_embedding,
    embedding_view,
    quantization_error,
    quantize,
    quantize_embedding,
    zero_points_of,
)
from edge_qwen.quant.pack import pack_codes, pack_zero_points, unpack_codes, unpack_zero_points

pytest.importorskip("onnx")  # the export extra; the runtime tests need it to build graphs
from onnx import NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper  # noqa: E402

SCHEMES = [(bits, sym) for bits in (4, 8) for sym in (True, False)]
BLOCKS = (32, 64, 128)


def _weight(seed: int, rows: int, cols: int, heavy: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, (rows, cols)) if heavy else rng.standard_normal((rows, cols))
    return (0.02 * w).astype(np.float32)


def _block_sq_error(w: np.ndarray, q: QuantizedMatrix) -> np.ndarray:
    """Squared error per block, (N, n_blocks)."""
    diff = dequantize(q) - w
    pad = q.n_blocks * q.block_size - w.shape[1]
    return np.square(np.pad(diff, ((0, 0), (0, pad)))).reshape(w.shape[0], q.n_blocks, -1).sum(-1)


# ---------------------------------------------------------------------------------- packing


def test_4bit_packing_puts_even_index_in_low_nibble() -> None:
    codes = np.array([[1, 2, 15, 0]], dtype=np.uint8)
    packed = pack_codes(codes, 4)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert np.array_equal(unpack_codes(packed, 4), codes)


def test_odd_block_count_zero_points_are_padded() -> None:
    zeros = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)  # (rows, n_blocks=3)
    packed = pack_zero_points(zeros, 4)
    assert packed.tolist() == [[0x21, 0x03], [0x54, 0x06]]
    assert np.array_equal(unpack_zero_points(packed, 4, 3), zeros)
    assert np.array_equal(pack_zero_points(zeros, 8), zeros)


@pytest.mark.parametrize("bits,symmetric", SCHEMES)
def test_layout_shapes_and_padding(bits: int, symmetric: bool) -> None:
    w = _weight(0, 5, 200)  # 200 = 6 * 32 + 8: the last block of 32 is mostly padding
    q = quantize(w, bits, 32, symmetric)
    assert q.packed.shape == (5, 7, 32 * bits // 8) and q.packed.dtype == np.uint8
    assert q.scales.shape == (5, 7) and q.scales.dtype == np.float32
    if symmetric:
        assert q.zero_points is None
    else:
        assert q.zero_points is not None and q.zero_points.shape == (5, math.ceil(7 * bits / 8))
    # K padding holds the zero point, so it dequantizes to exactly 0.
    codes = unpack_codes(q.packed, bits).reshape(5, -1)
    assert np.array_equal(codes[:, 200:], np.broadcast_to(zero_points_of(q)[:, -1:], (5, 24)))


# ---------------------------------------------------------------------------------- error bounds


@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("bits,symmetric", SCHEMES)
def test_rtn_error_is_within_half_a_step(bits: int, symmetric: bool, block_size: int) -> None:
    w = _weight(1, 16, 200, heavy=True)
    q = quantize(w, bits, block_size, symmetric, "rtn")
    step = np.abs(np.repeat(q.scales, block_size, axis=1)[:, :200])  # (N, K) |scale| of each element
    err = np.abs(dequantize(q) - w)
    bound = 0.5 * step
    if symmetric:
        # Q4_0 mapping: the peak sits on code 0; opposite-sign values above (2^(bits-1) - 0.5) steps
        # clamp to the top code, at most one step away.
        top = (1 << (bits - 1)) - 0.5
        bound = np.where(np.abs(w) > top * step, step, bound)
    assert (err <= bound * (1 + 1e-5) + 1e-9).all()


@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("bits,symmetric", SCHEMES)
def test_kquant_is_never_worse_than_rtn(bits: int, symmetric: bool, block_size: int) -> None:
    w = _weight(2, 32, 448, heavy=True)
    rtn = quantize(w, bits, block_size, symmetric, "rtn")
    kq = quantize(w, bits, block_size, symmetric, "kquant")
    rtn_blocks, kq_blocks = _block_sq_error(w, rtn), _block_sq_error(w, kq)
    assert (kq_blocks <= rtn_blocks * (1 + 1e-5) + 1e-15).all()
    assert kq.error(w).rel_rms < 0.995 * rtn.error(w).rel_rms


@pytest.mark.parametrize("symmetric", [True, False])
def test_kquant_importance_lowers_the_weighted_error(symmetric: bool) -> None:
    w = _weight(3, 64, 256)
    importance = np.random.default_rng(4).lognormal(0.0, 2.0, 256).astype(np.float32)  # (K,)
    plain = quantize(w, 4, 64, symmetric, "kquant")
    aware = quantize(w, 4, 64, symmetric, "kquant", importance=importance)
    plain_err = plain.error(w, importance).weighted_rel_rms
    aware_err = aware.error(w, importance).weighted_rel_rms
    assert plain_err is not None and aware_err is not None
    assert aware_err < 0.97 * plain_err


def test_kquant_keeps_rtn_where_importance_is_zero() -> None:
    w = _weight(15, 8, 128)
    importance = np.ones(128, dtype=np.float32)
    importance[:64] = 0.0  # an input feature range calibration never saw
    aware = quantize(w, 4, 64, True, "kquant", importance=importance)
    rtn = quantize(w, 4, 64, True, "rtn")
    np.testing.assert_array_equal(dequantize(aware)[:, :64], dequantize(rtn)[:, :64])


def test_quantization_error_reports_rms_and_max() -> None:
    w = _weight(5, 8, 128)
    q = quantize(w, 4, 32, symmetric=False)
    diff = dequantize(q) - w
    report = quantization_error(w, q)
    assert report == q.error(w)
    assert report.rel_rms == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(w), rel=1e-5)
    assert report.max_abs == pytest.approx(np.abs(diff).max(), rel=1e-6)
    assert report.weighted_rel_rms is None


def test_all_zero_and_constant_rows_survive() -> None:
    w = np.zeros((3, 64), dtype=np.float32)
    w[1] = 0.5
    w[2, 5] = -1.0
    for algo in ("rtn", "kquant"):
        for symmetric in (True, False):
            deq = dequantize(quantize(w, 4, 32, symmetric, algo))
            assert np.allclose(deq, w, atol=1e-6), (algo, symmetric)


# ---------------------------------------------------------------------------------- ONNX Runtime


def _session(node: NodeProto, inits: list[TensorProto], inputs: list[ValueInfoProto]) -> ort.InferenceSession:
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in node.output]
    graph = helper.make_graph([node], "quant_test", inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _matmul_nbits(q: QuantizedMatrix, accuracy_level: int) -> ort.InferenceSession:
    n, k = q.shape
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales, "scales")]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points, "zero_points"))
    node = helper.make_node(
        "MatMulNBits",
        ["A", *[t.name for t in inits]],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=q.bits,
        block_size=q.block_size,
        accuracy_level=accuracy_level,
    )
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", "seq", k])
    return _session(node, inits, [a])


@pytest.mark.parametrize("cols,algo", [(896, "kquant"), (200, "rtn")])
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("bits,symmetric", SCHEMES)
def test_matmul_nbits_matches_numpy(
    bits: int, symmetric: bool, block_size: int, cols: int, algo: str
) -> None:
    # K=896: 7 blocks of 128 (odd: padded zero-point byte); K=200: a partial last block.
    w = _weight(6, 40, cols)
    q = quantize(w, bits, block_size, symmetric, algo)
    deq = dequantize(q).astype(np.float64)
    x = np.random.default_rng(7).standard_normal((2, 3, cols)).astype(np.float32)
    for accuracy_level, tol in ((0, 1e-5), (4, 2e-2)):
        # Level 4 quantizes A to int8 per block inside the kernel: error ~ 1/127 of a block's range.
        session = _matmul_nbits(q, accuracy_level)
        for xs in (x, x[:1, :1]):  # a GEMM and a GEMV
            got = session.run(None, {"A": xs})[0]
            want = xs.astype(np.float64) @ deq.T
            rel = np.abs(got - want).max() / np.abs(want).max()
            assert rel < tol, f"accuracy_level={accuracy_level} shape={xs.shape} rel={rel:.2e}"


def _gather_block_quantized(e: QuantizedEmbedding) -> ort.InferenceSession:
    inits = [numpy_helper.from_array(e.data, "data"), numpy_helper.from_array(e.scales, "scales")]
    inputs = ["data", "ids", "scales"]
    if e.zero_points is not None:
        inits.append(numpy_helper.from_array(e.zero_points, "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node(
        "GatherBlockQuantized",
        inputs,
        ["embeds"],
        domain="com.microsoft",
        bits=e.bits,
        block_size=e.block_size,
        gather_axis=0,
        quantize_axis=1,
    )
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])
    return _session(node, inits, [ids])


@pytest.mark.parametrize("hidden", [896, 200])
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("bits,symmetric", SCHEMES)
def test_gather_block_quantized_matches_numpy(
    bits: int, symmetric: bool, block_size: int, hidden: int
) -> None:
    table = _weight(8, 50, hidden)
    e = quantize_embedding(table, bits, block_size, symmetric, "kquant")
    assert e.data.shape == (50, hidden * bits // 8) and e.data.dtype == np.uint8
    ids = np.array([[0, 49, 7], [7, 3, 0]], dtype=np.int64)
    got = _gather_block_quantized(e).run(None, {"ids": ids})[0]
    want = dequantize_embedding(e)[ids]  # (batch, seq, hidden)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert e.error(table).rel_rms < (0.2 if bits == 4 else 0.02)


@pytest.mark.parametrize("bits,symmetric", SCHEMES)
def test_tied_embedding_shares_bytes_with_lm_head(bits: int, symmetric: bool) -> None:
    # 896 / 128 = 7 blocks: exercises the padded zero-point byte in both ops.
    vocab, hidden = 60, 896
    table = _weight(9, vocab, hidden)
    q = quantize(table, bits, 128, symmetric, "kquant")
    e = embedding_view(q)
    assert np.shares_memory(e.data, q.packed) and e.scales is q.scales and e.zero_points is q.zero_points
    deq = dequantize(q)
    ids = np.array([[5, 59, 0]], dtype=np.int64)
    np.testing.assert_allclose(_gather_block_quantized(e).run(None, {"ids": ids})[0], deq[ids], atol=1e-7)
    hidden_states = np.random.default_rng(10).standard_normal((1, 2, hidden)).astype(np.float32)
    logits = _matmul_nbits(q, 0).run(None, {"A": hidden_states})[0]
    np.testing.assert_allclose(logits, hidden_states @ deq.T, rtol=1e-4, atol=1e-4)


def test_embedding_view_refuses_to_copy_silently() -> None:
    q = quantize(_weight(11, 4, 200), 4, 64, symmetric=True)
    with pytest.raises(ValueError, match="200 is not a multiple of block_size 64"):
        embedding_view(q)
    e = embedding_view(q, allow_copy=True)
    assert np.array_equal(dequantize_embedding(e), dequantize(q))


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 3}, "bits must be one of .* got 3"),
        ({"block_size": 48}, "block_size must be one of .* got 48"),
        ({"block_size": 16}, "block_size must be one of .* got 16"),
        ({"algo": "gptq"}, "algo must be one of .* got 'gptq'"),
    ],
)
def test_unsupported_scheme_is_a_value_error(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"bits": 4, "block_size": 32, "symmetric": True, "algo": "rtn", **kwargs}
    not_a_matrix = np.zeros(7)  # the scheme is checked before the weight is looked at
    with pytest.raises(ValueError, match=match):
        quantize(not_a_matrix, **args)
    with pytest.raises(ValueError, match=match):
        quantize_embedding(not_a_matrix, **args)


def test_bad_weights_and_importance_are_value_errors() -> None:
    w = _weight(12, 4, 64)
    with pytest.raises(ValueError, match="2-D"):
        quantize(w[0], 4, 32, True)
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize(np.full((2, 32), np.nan, np.float32), 4, 32, True)
    with pytest.raises(ValueError, match=r"importance must have shape \(64,\)"):
        quantize(w, 4, 32, True, "kquant", importance=np.ones(63))
    with pytest.raises(ValueError, match="only used by algo='kquant'"):
        quantize(w, 4, 32, True, "rtn", importance=np.ones(64))
    with pytest.raises(ValueError, match="even hidden size"):
        quantize_embedding(_weight(13, 4, 65), 4, 32, True)


def test_inconsistent_arrays_are_rejected() -> None:
    q = quantize(_weight(14, 4, 64), 4, 32, symmetric=False)
    with pytest.raises(ValueError, match="zero_points must be uint8"):
        QuantizedMatrix(4, 32, False, (4, 64), q.packed, q.scales, None)
    with pytest.raises(ValueError, match="packed must be uint8"):
        QuantizedMatrix(4, 32, False, (4, 64), q.packed[:, :1], q.scales, q.zero_points)
