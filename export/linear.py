"""Weights as graph nodes, in whatever precision their scheme says.

float:  x -> MatMul(W^T) [-> Add(bias)]          (fp16 weights are Cast to fp32 first)
intN:   x -> MatMulNBits(B, scales, zero_points, bias)
embed:  ids -> Gather | GatherBlockQuantized
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from edge_qwen.export.graph import MS_DOMAIN, Graph
from edge_qwen.export.recipe import Scheme
from edge_qwen.quant import QuantizedMatrix, embedding_view, quantize
from edge_qwen.quant.gptq import gptq

# Rows per lm_head MatMulNBits. ONNX Runtime packs each MatMulNBits weight at load while the raw bytes
# are still mapped; as one node, the vocabulary matrix (151,936 rows) alone raised the load's memory
# peak ~70 MB above the steady state. In parts, the peak is one part's (docs/performance.md).
LM_HEAD_ROWS = 20480


@dataclass(frozen=True)
class QuantizedRef:
    """Initializer names of a quantized matrix already in the graph (so a tied lm_head can reuse it)."""

    packed: str
    scales: str
    zero_points: str
    matrix: QuantizedMatrix


def linear(
    g: Graph,
    x: str,
    w: np.ndarray,
    b: np.ndarray | None,
    scheme: Scheme,
    name: str,
    prefix: str,
    accuracy_level: int,
    importance: np.ndarray | None = None,
) -> str:
    """y = x @ w.T + b for a Hugging Face (out, in) weight; no bias node when there is no bias."""
    if scheme.quantized:
        ref = add_quantized(g, quantize_weight(w, scheme, importance), name)
        return matmul_nbits(g, x, ref, b, name, prefix, accuracy_level)
    weight = g.weight(f"{name}.weight", np.ascontiguousarray(w.T).astype(_float_dtype(scheme)))  # (in, out)
    y = g.op("MatMul", [x, to_float32(g, weight, scheme, f"{prefix}/weight")], f"{prefix}/MatMul")
    if b is None:
        return y
    return g.op("Add", [y, g.weight(f"{name}.bias", b.astype(np.float32))], f"{prefix}/Add")


def quantize_weight(w: np.ndarray, scheme: Scheme, stats: np.ndarray | None) -> QuantizedMatrix:
    """stats: this weight's calibration statistic, X^T X / n (in, in) or its diagonal (in,), if any."""
    if scheme.algo == "gptq" and stats is not None and stats.ndim == 2:
        return gptq(w, stats, scheme.bits, scheme.block_size, scheme.symmetric)
    if scheme.algo in ("imatrix", "gptq") and stats is not None:
        importance = stats if stats.ndim == 1 else np.diag(stats)
        return quantize(w, scheme.bits, scheme.block_size, scheme.symmetric, "kquant", importance)
    algo = "kquant" if scheme.algo in ("imatrix", "gptq") else scheme.algo
    return quantize(w, scheme.bits, scheme.block_size, scheme.symmetric, algo)


def add_quantized(g: Graph, q: QuantizedMatrix, name: str) -> QuantizedRef:
    packed = g.weight(f"{name}.weight_q{q.bits}", q.packed)  # (N, n_blocks, block_size * bits / 8)
    scales = g.weight(f"{name}.weight_scales", q.scales.reshape(-1))
    zeros = "" if q.zero_points is None else g.weight(f"{name}.weight_zero_points", q.zero_points.reshape(-1))
    return QuantizedRef(packed, scales, zeros, q)


def matmul_nbits(
    g: Graph, x: str, ref: QuantizedRef, b: np.ndarray | None, name: str, prefix: str, accuracy_level: int
) -> str:
    q = ref.matrix
    bias = "" if b is None else g.weight(f"{name}.bias", b.astype(np.float32))
    inputs = [x, ref.packed, ref.scales, ref.zero_points, "", bias]
    while inputs[-1] == "":
        inputs.pop()
    return g.op(
        "MatMulNBits",
        inputs,
        f"{prefix}/MatMulNBits",
        domain=MS_DOMAIN,
        K=q.shape[1],
        N=q.shape[0],
        bits=q.bits,
        block_size=q.block_size,
        accuracy_level=accuracy_level,
    )


def embedding(
    g: Graph, ids: str, table: np.ndarray, scheme: Scheme, importance: np.ndarray | None = None
) -> tuple[str, QuantizedRef | None]:
    """Embedding lookup; returns the hidden states and, when quantized, the matrix for a tied lm_head."""
    name, prefix = "model.embed_tokens", "/model/embed_tokens"
    if not scheme.quantized:
        weight = g.weight(f"{name}.weight", table.astype(_float_dtype(scheme)))
        x = g.op("Gather", [weight, ids], f"{prefix}/Gather")
        return to_float32(g, x, scheme, prefix), None
    q = quantize_weight(table, scheme, importance)
    # The bytes of MatMulNBits' B seen as (vocab, hidden * bits / 8); when hidden is not a multiple of the
    # block, B is padded and the gather needs its own copy, so a tied lm_head cannot share it.
    shareable = q.shape[1] % q.block_size == 0
    view = embedding_view(q, allow_copy=not shareable)
    ref = QuantizedRef(
        packed=g.weight(f"{name}.weight_q{q.bits}", view.data),
        scales=g.weight(f"{name}.weight_scales", view.scales),  # (vocab, n_blocks)
        zero_points=""
        if view.zero_points is None
        else g.weight(f"{name}.weight_zero_points", view.zero_points),
        matrix=q,
    )
    inputs = [ref.packed, ids, ref.scales, ref.zero_points]
    while inputs[-1] == "":
        inputs.pop()
    x = g.op(
        "GatherBlockQuantized",
        inputs,
        f"{prefix}/GatherBlockQuantized",
        domain=MS_DOMAIN,
        gather_axis=0,
        quantize_axis=1,
        block_size=view.block_size,
        bits=view.bits,
    )
    return x, ref if shareable else None


def quantized_lm_head(g: Graph, x: str, q: QuantizedMatrix, accuracy_level: int) -> str:
    """lm_head as MatMulNBits over parts of at most LM_HEAD_ROWS rows, their logits concatenated."""
    parts = row_ranges(q.shape[0], LM_HEAD_ROWS)
    refs = [add_quantized(g, q.rows(a, b), _part_name("lm_head", i, parts)) for i, (a, b) in enumerate(parts)]
    return _lm_head_parts(g, x, refs, accuracy_level)


def tied_lm_head(g: Graph, x: str, ref: QuantizedRef, accuracy_level: int) -> str:
    """lm_head over the embedding's own quantized bytes, seen in MatMulNBits' shapes (stored once)."""
    q = ref.matrix
    refs = []
    parts = row_ranges(q.shape[0], LM_HEAD_ROWS)
    for i, (a, b) in enumerate(parts):
        part = q.rows(a, b)
        name = _part_name("lm_head", i, parts)
        zeros = part.zero_points  # None exactly when the whole matrix has none (symmetric)
        refs.append(
            QuantizedRef(
                packed=g.alias(f"{name}.weight_q_tied", ref.packed, part.packed, a * q.packed[0].nbytes),
                scales=g.alias(
                    f"{name}.weight_scales_tied", ref.scales, part.scales.reshape(-1), a * q.scales[0].nbytes
                ),
                zero_points=""
                if zeros is None
                else g.alias(
                    f"{name}.weight_zero_points_tied", ref.zero_points, zeros.reshape(-1), a * zeros[0].nbytes
                ),
                matrix=part,
            )
        )
    return _lm_head_parts(g, x, refs, accuracy_level)


def row_ranges(n: int, rows: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `rows` (a multiple of 64) covering n, in even multiples of 64."""
    count = -(-n // rows)
    step = -(-n // (count * 64)) * 64
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _part_name(name: str, i: int, parts: list[tuple[int, int]]) -> str:
    return name if len(parts) == 1 else f"{name}.part{i}"


def _lm_head_parts(g: Graph, x: str, refs: list[QuantizedRef], accuracy_level: int) -> str:
    if len(refs) == 1:
        return matmul_nbits(g, x, refs[0], None, "lm_head", "/lm_head", accuracy_level)
    logits = [
        matmul_nbits(g, x, ref, None, f"lm_head.part{i}", f"/lm_head/part{i}", accuracy_level)
        for i, ref in enumerate(refs)
    ]
    return g.op("Concat", logits, "/lm_head/Concat", axis=-1)


def _float_dtype(scheme: Scheme) -> type:
    return np.float16 if scheme.dtype == "fp16" else np.float32


def to_float32(g: Graph, x: str, scheme: Scheme, prefix: str) -> str:
    """fp16 weights are stored in half precision and computed in fp32 (ONNX Runtime folds the Cast)."""
    if scheme.dtype != "fp16":
        return x
    return g.op("Cast", [x], f"{prefix}/Cast", to=TensorProto.FLOAT)
