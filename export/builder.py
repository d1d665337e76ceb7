"""Build the fused Qwen2 CPU graph from float weights (no torch tracing).

Inputs and outputs follow onnxruntime-genai's decoder convention:
    input_ids (batch, seq) int64, attention_mask (batch, total) int64,
    past_key_values.{i}.key/value (batch, kv_heads, past, head_dim)
 -> logits (batch, 1 | seq, vocab), present.{i}.key/value (batch, kv_heads, present, head_dim)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import TensorProto

from edge_qwen.config import QwenConfig
from edge_qwen.export.checkpoint import Checkpoint
from edge_qwen.export.graph import MS_DOMAIN, Graph
from edge_qwen.export.options import ExportOptions

INT64_MAX = np.iinfo(np.int64).max


def io_names(config: QwenConfig) -> dict[str, list[str]]:
    """The graph's input and output names, recorded in the manifest."""
    layers = range(config.num_hidden_layers)
    past = [f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in layers for kv in ("key", "value")]
    return {"inputs": ["input_ids", "attention_mask", *past], "outputs": ["logits", *present]}


def build_graph(g: Graph, ckpt: Checkpoint, opts: ExportOptions, progress: Callable[[str], None]) -> None:
    """Add the whole decoder to `g`, reading one tensor at a time from `ckpt`."""
    cfg = ckpt.config
    input_ids = g.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    mask = g.input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
    g.output("logits", TensorProto.FLOAT, ["batch_size", "logits_length", cfg.vocab_size])
    seqlens_k, total_len = attention_lengths(g, mask)
    assert opts.max_context is not None, "resolve options with ExportOptions.for_model first"
    cos, sin = rotary_caches(g, cfg, opts.max_context)

    embed = ckpt.tensor("model.embed_tokens.weight")  # (vocab, hidden)
    x = g.op(
        "Gather",
        [g.weight("model.embed_tokens.weight", float_weight(embed, opts)), input_ids],
        "/model/embed_tokens/Gather",
    )
    x = to_float32(g, x, opts, "/model/embed_tokens")
    residual = None
    for i in range(cfg.num_hidden_layers):
        progress(f"layer {i}")
        prefix = f"/model/layers.{i}"
        normed, residual = rms_norm(
            g, x, residual, ckpt, f"model.layers.{i}.input_layernorm", cfg, f"{prefix}/input_layernorm"
        )
        x = attention(g, normed, ckpt, cfg, opts, i, seqlens_k, total_len, cos, sin)
        normed, residual = rms_norm(
            g,
            x,
            residual,
            ckpt,
            f"model.layers.{i}.post_attention_layernorm",
            cfg,
            f"{prefix}/post_attention_layernorm",
        )
        x = mlp(g, normed, ckpt, opts, i)
    normed, _ = rms_norm(g, x, residual, ckpt, "model.norm", cfg, "/model/norm")
    if opts.logits == "last":
        # (batch, seq, hidden) -> (batch, 1, hidden): the runtime only ever samples the last position.
        normed = g.op(
            "Slice",
            [normed, g.constant([-1]), g.constant([INT64_MAX]), g.constant([1])],
            "/model/norm/last_position/Slice",
        )
    progress("lm_head")
    head = embed if cfg.tie_word_embeddings else ckpt.tensor("lm_head.weight")
    logits = linear(g, normed, head, None, opts, "/lm_head")
    g.node("Identity", [logits], "/logits/Identity", outputs=["logits"])


def attention_lengths(g: Graph, mask: str) -> tuple[str, str]:
    """GroupQueryAttention's seqlens_k = tokens so far - 1 (batch,) and total_sequence_length (scalar)."""
    #   attention_mask -> ReduceSum(axis 1) - 1 -> Cast int32              = seqlens_k
    #   attention_mask -> Shape -> Gather(1) -> Cast int32                  = total_sequence_length
    summed = g.op("ReduceSum", [mask, g.constant([1])], "/model/attn_mask/ReduceSum", keepdims=0)
    minus_one = g.op("Sub", [summed, g.constant(1)], "/model/attn_mask/Sub")
    seqlens_k = g.op("Cast", [minus_one], "/model/attn_mask/seqlens_k/Cast", to=TensorProto.INT32)
    shape = g.op("Shape", [mask], "/model/attn_mask/Shape")
    total = g.op("Gather", [shape, g.constant(1)], "/model/attn_mask/total/Gather", axis=0)
    total_len = g.op("Cast", [total], "/model/attn_mask/total_sequence_length/Cast", to=TensorProto.INT32)
    return seqlens_k, total_len


def rotary_caches(g: Graph, cfg: QwenConfig, max_context: int) -> tuple[str, str]:
    """cos/sin caches (max_context, head_dim / 2) for GroupQueryAttention's fused, non-interleaved RoPE."""
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.int64) / cfg.head_dim))
    freqs = np.outer(np.arange(max_context, dtype=np.float64), inv_freq)
    cos = g.weight("/model/rotary/cos_cache", np.cos(freqs).astype(np.float32))
    sin = g.weight("/model/rotary/sin_cache", np.sin(freqs).astype(np.float32))
    return cos, sin


def rms_norm(
    g: Graph, x: str, residual: str | None, ckpt: Checkpoint, name: str, cfg: QwenConfig, prefix: str
) -> tuple[str, str]:
    """RMSNorm of x + residual; returns (normed, new residual). The first norm has no residual yet."""
    weight = g.weight(f"{name}.weight", ckpt.tensor(f"{name}.weight"))
    if residual is None:
        normed = g.op(
            "SimplifiedLayerNormalization",
            [x, weight],
            f"{prefix}/SimplifiedLayerNorm",
            epsilon=cfg.rms_norm_eps,
            axis=-1,
            stash_type=1,
        )
        return normed, x
    #   x, residual -> SkipSimplifiedLayerNorm -> (normed, _, _, x + residual)
    outs = g.node(
        "SkipSimplifiedLayerNormalization",
        [x, residual, weight],
        f"{prefix}/SkipLayerNorm",
        outputs=[f"{prefix}/output_0", "", "", f"{prefix}/output_3"],
        domain=MS_DOMAIN,
        epsilon=cfg.rms_norm_eps,
    )
    return outs[0], outs[3]


def attention(
    g: Graph,
    x: str,
    ckpt: Checkpoint,
    cfg: QwenConfig,
    opts: ExportOptions,
    i: int,
    seqlens_k: str,
    total_len: str,
    cos: str,
    sin: str,
) -> str:
    #   x -> qkv_proj (one MatMul + bias) -> GroupQueryAttention(rotary, past/present) -> o_proj
    name = f"model.layers.{i}.self_attn"
    prefix = f"/model/layers.{i}/attn"
    qkv_w = np.concatenate([ckpt.tensor(f"{name}.{p}_proj.weight") for p in "qkv"])  # (q + 2 kv, hidden)
    qkv_b = np.concatenate([ckpt.tensor(f"{name}.{p}_proj.bias") for p in "qkv"])
    qkv = linear(g, x, qkv_w, qkv_b, opts, f"{prefix}/qkv_proj", weight_name=f"{name}.qkv_proj")
    kv_shape: list[int | str] = ["batch_size", cfg.num_key_value_heads, "past_sequence_length", cfg.head_dim]
    present_shape: list[int | str] = [
        "batch_size",
        cfg.num_key_value_heads,
        "total_sequence_length",
        cfg.head_dim,
    ]
    past_k = g.input(f"past_key_values.{i}.key", TensorProto.FLOAT, kv_shape)
    past_v = g.input(f"past_key_values.{i}.value", TensorProto.FLOAT, kv_shape)
    present = [f"present.{i}.key", f"present.{i}.value"]
    out = g.node(
        "GroupQueryAttention",
        [qkv, "", "", past_k, past_v, seqlens_k, total_len, cos, sin],
        f"{prefix}/GroupQueryAttention",
        outputs=[f"{prefix}/GroupQueryAttention/output_0", *present],
        domain=MS_DOMAIN,
        num_heads=cfg.num_attention_heads,
        kv_num_heads=cfg.num_key_value_heads,
        do_rotary=1,
        rotary_interleaved=0,
        scale=float(cfg.head_dim**-0.5),
    )[0]
    for p in present:
        g.output(p, TensorProto.FLOAT, present_shape)
    return linear(
        g,
        out,
        ckpt.tensor(f"{name}.o_proj.weight"),
        None,
        opts,
        f"{prefix}/o_proj",
        weight_name=f"{name}.o_proj",
    )


def mlp(g: Graph, x: str, ckpt: Checkpoint, opts: ExportOptions, i: int) -> str:
    #   x -> gate_up (one MatMul) -> Split -> SiLU(gate) * up -> down
    name = f"model.layers.{i}.mlp"
    prefix = f"/model/layers.{i}/mlp"
    gate_w = ckpt.tensor(f"{name}.gate_proj.weight")  # (ffn, hidden)
    up_w = ckpt.tensor(f"{name}.up_proj.weight")
    ffn = gate_w.shape[0]
    gate_up = linear(
        g,
        x,
        np.concatenate([gate_w, up_w]),
        None,
        opts,
        f"{prefix}/gate_up_proj",
        weight_name=f"{name}.gate_up_proj",
    )
    gate, up = g.node("Split", [gate_up, g.constant([ffn, ffn])], f"{prefix}/Split", outputs=2, axis=-1)
    sigmoid = g.op("Sigmoid", [gate], f"{prefix}/act_fn/Sigmoid")
    silu = g.op("Mul", [gate, sigmoid], f"{prefix}/act_fn/Mul")
    hidden = g.op("Mul", [silu, up], f"{prefix}/Mul")
    return linear(
        g,
        hidden,
        ckpt.tensor(f"{name}.down_proj.weight"),
        None,
        opts,
        f"{prefix}/down_proj",
        weight_name=f"{name}.down_proj",
    )


def linear(
    g: Graph,
    x: str,
    w: np.ndarray,
    b: np.ndarray | None,
    opts: ExportOptions,
    prefix: str,
    weight_name: str | None = None,
) -> str:
    """y = x @ w.T + b for a Hugging Face (out, in) weight; no Add node when there is no bias."""
    name = weight_name or prefix.strip("/").replace("/", ".")
    weight = g.weight(f"{name}.weight", float_weight(np.ascontiguousarray(w.T), opts))  # (in, out)
    weight = to_float32(g, weight, opts, f"{prefix}/weight")
    y = g.op("MatMul", [x, weight], f"{prefix}/MatMul")
    if b is None:
        return y
    return g.op("Add", [y, g.weight(f"{name}.bias", b.astype(np.float32))], f"{prefix}/Add")


def float_weight(w: np.ndarray, opts: ExportOptions) -> np.ndarray:
    return w.astype(np.float16 if opts.precision == "fp16" else np.float32)


def to_float32(g: Graph, x: str, opts: ExportOptions, prefix: str) -> str:
    """fp16 packages store weights in half precision and compute in float32 (see docs/precision.md)."""
    if opts.precision != "fp16":
        return x
    return g.op("Cast", [x], f"{prefix}/Cast", to=TensorProto.FLOAT)
