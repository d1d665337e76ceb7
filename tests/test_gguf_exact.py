"""--algo gguf: a GGUF's quantized blocks in MatMulNBits, checked against gguf-py's dequantization."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

import edge_qwen
from edge_qwen.export import gguf_exact
from edge_qwen.export.graph import Graph, save_model
from edge_qwen.export.options import ExportOptions
from edge_qwen.export.readers import read_checkpoint
from edge_qwen.export.writer import write_package
from edge_qwen.quant.ggml import BLOCK_TYPES, from_blocks, stack_rows
from edge_qwen.quant.ggml import dequantize as ggml_dequantize
from tests.gguf_writer import MERGES, TEMPLATE, tiny_vocab

Q = gguf.GGMLQuantizationType
# Byte offsets of each block type's float16 fields (d, dmin, m): random bytes there could be NaN.
F16_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q5_0": [0],
    "Q4_1": [0, 2],
    "Q5_1": [0, 2],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "IQ4_NL": [0],
}


def random_blocks(qtype: str, rows: int, cols: int, seed: int, scale: float = 0.01) -> np.ndarray:
    """A (rows, cols) tensor of qtype as raw GGUF bytes: random codes, finite random float16 scales."""
    elements, type_size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, cols // elements, type_size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        d = rng.normal(0, scale, (rows, cols // elements, 1)).astype(np.float16)
        data[:, :, at : at + 2] = d.view(np.uint8)
    return data.reshape(rows, -1)


def gguf_py(qtype: str, data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return gguf.quants.dequantize(data, Q[qtype]).reshape(rows, cols)


# ---- the block maps ---------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", sorted(BLOCK_TYPES))
def test_each_map_dequantizes_bit_for_bit_like_gguf_py(qtype: str) -> None:
    rows, cols = 6, 512
    data = random_blocks(qtype, rows, cols, seed=len(qtype))
    m = from_blocks(qtype, data, (rows, cols))
    assert m.codes.max() < (1 << m.bits) and m.zero_points.max() < (1 << m.bits)
    ours, theirs = ggml_dequantize(m), gguf_py(qtype, data, rows, cols)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_a_type_without_a_map_is_named() -> None:
    with pytest.raises(ValueError, match="IQ4_NL has no exact MatMulNBits map"):
        from_blocks("IQ4_NL", random_blocks("IQ4_NL", 2, 64, 0), (2, 64))


def test_bytes_of_the_wrong_size_are_refused() -> None:
    with pytest.raises(ValueError, match="does not hold a"):
        from_blocks("Q8_0", random_blocks("Q8_0", 2, 64, 0), (2, 96))


# ---- through ONNX Runtime ----------------------------------------------------------------------


def run_linear(tmp_path: Path, parts: list[tuple[str, np.ndarray]], cols: int, x: np.ndarray, level: int):
    """y = x @ W.T through gguf_exact's nodes for W = the parts stacked by rows."""
    matrices = [from_blocks(q, d, (d.shape[0], cols)) for q, d in parts]
    with open(tmp_path / "w.data", "wb") as f:
        g = Graph(f, "w.data")
        inp = g.input("x", TensorProto.FLOAT, ["batch", "seq", cols])
        groups: list[list] = []
        for m in matrices:  # as gguf_exact.linear groups them
            if groups and groups[-1][0].layout[:2] == m.layout[:2]:
                groups[-1].append(m)
            else:
                groups.append([m])
        outs = [
            gguf_exact.matmul(g, inp, stack_rows(ms), None, f"w{i}", f"/w{i}", level)
            for i, ms in enumerate(groups)
        ]
        y = outs[0] if len(outs) == 1 else g.op("Concat", outs, "/Concat", axis=-1)
        g.node("Identity", [y], "/y", outputs=["y"])
        g.output("y", TensorProto.FLOAT, ["batch", "seq", "n"])
        save_model(g.to_model("t"), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("qtype", sorted(BLOCK_TYPES))
def test_matmul_nbits_holds_gguf_py_weights_exactly(tmp_path: Path, qtype: str) -> None:
    # Rows of the identity as activations read each weight out of ONNX Runtime: 1 * w plus exact zeros
    # (the correction's block sums are one-hot too), so any rounding of a weight would show.
    rows, cols = 8, 256
    data = random_blocks(qtype, rows, cols, seed=1)
    eye = np.eye(cols, dtype=np.float32)[None]  # (1, K, K)
    y = run_linear(tmp_path, [(qtype, data)], cols, eye, level=0)[0]  # (K, N) = W.T
    # Equal as numbers: exact, except that adding the zeros turns a weight of -0.0 into +0.0.
    assert np.array_equal(y.T, gguf_py(qtype, data, rows, cols))


@pytest.mark.parametrize(
    "types",
    [["Q4_K", "Q4_K", "Q6_K"], ["Q3_K", "Q2_K"], ["Q5_0", "Q8_0", "Q5_K"], ["Q4_1", "Q4_0"]],
    ids=["min-then-16", "mixed-offsets", "8bit-mixed", "q4_1-q4_0"],
)
def test_stacked_parts_and_correction_match_a_float_reference(tmp_path: Path, types: list[str]) -> None:
    cols = 512
    parts = [(q, random_blocks(q, 16 * (i + 1), cols, seed=i)) for i, q in enumerate(types)]
    w = np.concatenate([gguf_py(q, d, d.shape[0], cols) for q, d in parts]).astype(np.float64)
    x = np.random.default_rng(3).standard_normal((2, 5, cols)).astype(np.float32)
    y = run_linear(tmp_path, parts, cols, x, level=0)
    ref = x.astype(np.float64) @ w.T
    # fp32 rounding of a K=512 dot product: well under 1e-5 of the terms' magnitude
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T)
    assert np.all(np.abs(y - ref) <= bound + 1e-30)


# ---- a whole model ------------------------------------------------------------------------------

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
# Every mapped type somewhere, q/k/v of two layouts (two MatMulNBits and a Concat), an offset type in
# the embedding, and gate/up stacked across offset blocks of one layout.
TYPES = {
    "token_embd": "Q4_K",
    "output": "Q6_K",
    "attn_q": "Q4_K",
    "attn_k": "Q5_K",
    "attn_v": "Q6_K",
    "attn_output": "Q5_0",
    "ffn_gate": "Q3_K",
    "ffn_up": "Q2_K",
    "ffn_down": "Q8_0",
}


def write_quantized_gguf(path: Path, types: dict[str, str], tied: bool = False) -> None:
    tokens, token_types = tiny_vocab()
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)
    vocab, kv = len(tokens), KV_HEADS * HEAD_DIM
    shapes = {"token_embd": (vocab, HIDDEN), **({} if tied else {"output": (vocab, HIDDEN)})}
    layer = {
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (kv, HIDDEN),
        "attn_v": (kv, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }
    for name, (rows, cols) in shapes.items():
        w.add_tensor(
            f"{name}.weight",
            random_blocks(types[name], rows, cols, rng.integers(1 << 30)),
            raw_dtype=Q[types[name]],
        )
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for i in range(LAYERS):
        for name, (rows, cols) in layer.items():
            data = random_blocks(types[name], rows, cols, rng.integers(1 << 30), scale=0.02 / 8)
            w.add_tensor(f"blk.{i}.{name}.weight", data, raw_dtype=Q[types[name]])
        for name, n in (("attn_q", HIDDEN), ("attn_k", kv), ("attn_v", kv)):
            w.add_tensor(f"blk.{i}.{name}.bias", rng.normal(0, 0.1, n).astype(np.float32))
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def max_logit_gap(pkg: Path, ref: Path) -> tuple[float, float]:
    """Max |logit difference| over several prompt lengths, and the largest |logit| of the reference."""
    m, r = edge_qwen.load(pkg), edge_qwen.load(ref)
    ids = np.random.default_rng(0).integers(3, 250, 24).tolist()
    gap, top = 0.0, 0.0
    for n in (1, 5, 12, 24):
        a, b = r.forward(ids[:n], r.new_cache()), m.forward(ids[:n], m.new_cache())
        gap, top = max(gap, float(np.abs(a - b).max())), max(top, float(np.abs(a).max()))
    return gap, top


def export(gguf_path: Path, out: Path, **options: object) -> Path:
    return write_package(read_checkpoint(gguf_path), out, ExportOptions(**options), show_progress=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_exact_package_computes_what_the_fp32_export_of_the_gguf_does(tmp_path: Path, tied: bool) -> None:
    path = tmp_path / "q.gguf"
    write_quantized_gguf(path, TYPES, tied)
    fp32 = export(path, tmp_path / "fp32", precision="fp32")
    exact = export(path, tmp_path / "exact", precision="int4", algo="gguf", accuracy_level=0)
    gap, top = max_logit_gap(exact, fp32)
    assert top > 1.0  # the logits are not all near zero, so the bound below means something
    assert gap < 1e-4 * top  # fp32 summation order only: the weights are the same numbers


def test_a_type_without_a_map_falls_back_with_a_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "q.gguf"
    write_quantized_gguf(path, {**TYPES, "ffn_up": "IQ4_NL"})
    fp32 = export(path, tmp_path / "fp32", precision="fp32")
    with caplog.at_level(logging.WARNING, logger="edge_qwen.export.gguf_exact"):
        exact = export(path, tmp_path / "exact", precision="int4", algo="gguf", accuracy_level=0)
    named = [r.getMessage() for r in caplog.records if "IQ4_NL" in r.getMessage()]
    assert len(named) == LAYERS and "model.layers.0.mlp.up_proj is IQ4_NL" in named[0]
    gap, top = max_logit_gap(exact, fp32)
    assert gap < 0.05 * top  # the fallback (int8) is close, not exact


def test_algo_gguf_needs_a_gguf_source(tiny, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--algo gguf carries a GGUF's own quantization: .* is not a .gguf"):
        export(tiny.hf_dir, tmp_path / "x", precision="int4", algo="gguf")
