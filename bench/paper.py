#!/usr/bin/env python3
"""The arithmetic of docs/performance.md's "on paper" section, from configurations and recipes alone.

The bytes one decode step reads for each model size and precision (no package needed), what they
predict on a Raspberry Pi, and which ONNX Runtime kernel each int4 variant takes on a Pi's cores.
tests/test_bench.py checks the bytes against what `edge-qwen bench` counts in real exported graphs;
bench/perf_doc.py renders it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from edge_qwen.cache import kv_bytes_per_token
from edge_qwen.config import QwenConfig
from edge_qwen.export.options import ExportOptions, default_options
from edge_qwen.export.recipe import Recipe, Scheme


def qwen(hidden: int, layers: int, heads: int, ffn: int, head_dim: int) -> QwenConfig:
    """A released Qwen2.5 shape (../shared/models/README.md): 2 KV heads, vocab 151,936, tied."""
    return QwenConfig(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )


LADDER = {
    "0.5B": qwen(896, 24, 14, 4864, 64),
    "1.5B": qwen(1536, 28, 12, 8960, 128),
    "3B": qwen(2048, 36, 16, 11008, 128),
}
PRECISIONS = ("fp32", "fp16", "int8", "int4")
PAPER_CONTEXT = 192  # the bench protocol's average decode context: 128 prompt + (128 + 1) / 2


@dataclass(frozen=True)
class Device:
    """A board to predict for: peak bandwidth from its memory's spec, a sustained read rate assumed."""

    name: str
    cores: str
    dotprod: bool
    peak_gb_s: float  # MT/s x 4 bytes (a 32-bit bus)
    sustained_gb_s: float
    sustained_source: str


DEVICES = (
    Device("Raspberry Pi 5", "4x Cortex-A76 2.4 GHz", True, 4267e6 * 4 / 1e9, 10.0, "assumed (~60% of peak)"),
    Device(
        "Raspberry Pi 4",
        "4x Cortex-A72 1.5-1.8 GHz",
        False,
        3200e6 * 4 / 1e9,
        5.5,
        "STREAM copy, sci-pi.org.uk/bench/stream.html",
    ),
)


# -- bytes per token ------------------------------------------------------------------------------


def layer_matrices(cfg: QwenConfig) -> list[tuple[str, int, int]]:
    """(packed weight name, out_features, in_features) of one layer, as the exporter packs them."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return [
        ("qkv_proj", q + 2 * kv, cfg.hidden_size),
        ("o_proj", cfg.hidden_size, q),
        ("gate_up_proj", 2 * cfg.intermediate_size, cfg.hidden_size),
        ("down_proj", cfg.hidden_size, cfg.intermediate_size),
    ]


def matrix_bytes(rows: int, cols: int, s: Scheme) -> int:
    """Bytes of a (rows, cols) weight as MatMulNBits / MatMul reads it (fp16 is folded to fp32 at load)."""
    if not s.quantized:
        return rows * cols * 4
    n_blocks = math.ceil(cols / s.block_size)
    zero_points = 0 if s.symmetric else rows * math.ceil(n_blocks * s.bits / 8)
    return rows * n_blocks * (s.block_size * s.bits // 8 + 4) + zero_points  # codes + fp32 scales


def row_bytes(cols: int, s: Scheme) -> int:
    """Bytes one embedding row takes (Gather / GatherBlockQuantized read one per token)."""
    if not s.quantized:
        return cols * (2 if s.dtype == "fp16" else 4)
    n_blocks = math.ceil(cols / s.block_size)
    zero_points = 0 if s.symmetric else math.ceil(n_blocks * s.bits / 8)
    return math.ceil(cols * s.bits / 8) + n_blocks * 4 + zero_points


def weight_bytes_per_token(cfg: QwenConfig, opts: ExportOptions) -> int:
    """Weight bytes one decode step reads: every matrix, norms, biases, one embedding and rotary row."""
    recipe = opts.recipe_for(cfg)
    q, kv, hidden = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
        cfg.hidden_size,
    )
    per_layer_floats = 2 * hidden + q + 2 * kv  # two norm weights, the qkv bias
    total = (cfg.num_hidden_layers * per_layer_floats + hidden) * 4  # + the final norm
    total += sum(
        matrix_bytes(rows, cols, recipe.scheme_for(name, i, cfg.num_hidden_layers))
        for i in range(cfg.num_hidden_layers)
        for name, rows, cols in layer_matrices(cfg)
    )
    total += row_bytes(hidden, recipe.embeddings) + matrix_bytes(cfg.vocab_size, hidden, recipe.lm_head)
    return total + 2 * (cfg.head_dim // 2) * 4  # one row each of the cos and sin caches


def int8_unpacked_bytes_per_token(cfg: QwenConfig, opts: ExportOptions) -> int:
    """Extra traffic of 8-bit MatMulNBits on a CPU without dotprod: ONNX Runtime dequantizes the whole
    matrix to a float32 temporary on every call (written, then read by the SGEMM): 8 bytes a weight."""
    recipe = opts.recipe_for(cfg)
    weights = sum(
        rows * cols
        for i in range(cfg.num_hidden_layers)
        for name, rows, cols in layer_matrices(cfg)
        if recipe.scheme_for(name, i, cfg.num_hidden_layers).bits == 8
    )
    weights += cfg.vocab_size * cfg.hidden_size if recipe.lm_head.bits == 8 else 0
    return weights * 8


def bits_per_weight(s: Scheme) -> float:
    """Stored bits per weight, scales and zero points included (two blocks: zero points pack in pairs)."""
    return 8 * matrix_bytes(1, 2 * s.block_size, s) / (2 * s.block_size) if s.quantized else 32.0


def paper_rows() -> list[dict[str, Any]]:
    """The arithmetic of the doc's paper section, one row per model size and precision."""
    rows = []
    for size, cfg in LADDER.items():
        for precision in PRECISIONS:
            opts = default_options(precision)
            weights = weight_bytes_per_token(cfg, opts)
            kv = kv_bytes_per_token(cfg) * PAPER_CONTEXT
            extra = int8_unpacked_bytes_per_token(cfg, opts)
            rows.append(
                {
                    "size": size,
                    "precision": precision,
                    "recipe": describe(opts.recipe_for(cfg)),
                    "weight_bytes_per_token": weights,
                    "kv_bytes_per_position": kv_bytes_per_token(cfg),
                    "bytes_per_token": weights + kv,
                    "no_dotprod_extra_bytes": extra,
                    "predicted_decode_tps": {d.name: predicted_tps(d, weights + kv, extra) for d in DEVICES},
                }
            )
    return rows


def predicted_tps(d: Device, bytes_per_token: int, no_dotprod_extra: int) -> dict[str, float]:
    """Decode tok/s if reading is all that limits it; a CPU without dotprod also reads its int8 detour."""
    read = bytes_per_token + (0 if d.dotprod else no_dotprod_extra)
    return {"peak": d.peak_gb_s * 1e9 / read, "sustained": d.sustained_gb_s * 1e9 / read}


def describe(recipe: Recipe) -> str:
    """A recipe in one line: body, lm_head and the int8 sensitive tensors."""
    d = recipe.to_dict()
    sensitive = next((v for k, v in d.items() if k.startswith("sensitive")), None)
    text = f"body {d['body']}"
    text += "".join(f", {weight} {d[weight]}" for weight, _ in recipe.body_blocks)
    text += f", lm_head {d['lm_head']}"
    return text + (f", sensitive {sensitive}" if sensitive else "")


def default_int4_schemes() -> list[tuple[str, Scheme]]:
    """The int4 variants the kernel table covers: the default's block size first, sym and asym."""
    body = default_options("int4").recipe.body
    blocks = [body.block_size, *(b for b in (32, 64, 128) if b != body.block_size)]
    return [
        (f"b{b} {'sym' if sym else 'asym'}", replace(body, block_size=b, symmetric=sym))
        for b in blocks
        for sym in (True, False)
    ]


def kernel_rows() -> list[dict[str, str]]:
    """Which ONNX Runtime kernel each int4 variant takes on each core (see KERNELS_TEXT for sources)."""
    default = default_options("int4").recipe.body
    rows = []
    for variant, s in default_int4_schemes():
        gemv, gemm = (
            ("qai8dxp1x4_qsi4c32p4x4_1x4", "qai8dxp4x4_qsi4c32p4x4_16x4")
            if s.symmetric
            else ("qsi8d32p1x4_qai4c32p4x4_1x4", "qsi8d32p4x4_qai4c32p4x4_8x4")
        )
        rows.append(
            {
                "variant": variant + (" (default)" if s == default else ""),
                "a76_decode": f"KleidiAI `{gemv}_neon_dotprod`",
                "a76_prefill": f"KleidiAI `{gemm}_neon_dotprod`",
                "a72_decode": "MLAS `SQ4BitGemmM1Kernel_CompFp32`",
                "a72_prefill": "MLAS `SQ4BitBlkDequantBForSgemm_CompFp32` + SGEMM",
                "bits_per_weight": f"{bits_per_weight(s):.2f}",
            }
        )
    return rows


def paper() -> dict[str, Any]:
    """Everything the paper section shows, for the JSON file and the doc."""
    cfg, opts = LADDER["0.5B"], default_options("int4")
    head = matrix_bytes(cfg.vocab_size, cfg.hidden_size, opts.recipe_for(cfg).lm_head)
    return {
        "rows": paper_rows(),
        "kernels": kernel_rows(),
        "devices": [d.__dict__ for d in DEVICES],
        "lm_head_share_0_5b_int4": head / weight_bytes_per_token(cfg, opts),
    }
