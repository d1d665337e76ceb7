"""Build the fused Qwen2 CPU graph from float weights (no torch tracing).

Inputs and outputs follow onnxruntime-genai's decoder convention:
    input_ids (batch, seq) int64, attention_mask (batch, total) int64, position_ids (batch, seq) int64,
    past_key_values.{i}.key/value (batch, kv_heads, past, head_dim)
 -> logits (batch, seq | 1, vocab), present.{i}.key/value (batch, kv_heads, present, head_dim)

plus `logits_start`, an initializer that is also an input (batch-independent, (1,) int64): the lm_head
runs on positions [logits_start:]. Its default keeps every position, as onnxruntime-genai and optimum
expect; edge-qwen's runtime feeds [-1], so that prefill computes the last position's logits only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from edge_qwen.config import QwenConfig
from edge_qwen.export import gguf_exact
from edge_qwen.export.checkpoint import Checkpoint
from edge_qwen.export.graph import MS_DOMAIN, Graph
from edge_qwen.export.linear import (
    QuantizedRef,
    embedding,
    linear,
    quantize_weight,
    quantized_lm_head,
    tied_lm_head,
)
from edge_qwen.export.options import GGUF_EXACT, ExportOptions
from edge_qwen.export.recipe import Recipe

INT64_MAX = np.iinfo(np.int64).max
CALIBRATION_PREFIX = "calibration/"  # graph outputs of linear inputs, in calibration graphs only


@dataclass(frozen=True)
class Build:
    """What every layer builder needs: the graph, the weights and how to store them."""

    g: Graph
    ckpt: Checkpoint
    recipe: Recipe
    accuracy_level: int
    calib_stats: Mapping[str, np.ndarray]  # weight name -> X^T X / n (in, in) or its diagonal (in,)
    calibration: bool  # expose every linear input as a graph output
    exact: gguf_exact.ExactTensors | None = None  # --algo gguf: the GGUF's own quantized blocks

    def projection(
        self, x: str, parts: list[str], name: str, prefix: str, layer: int, bias: bool = False
    ) -> str:
        """One linear over the row-stacked weights of `parts` (q, k, v -> qkv) and their biases."""
        b = np.concatenate([self.ckpt.tensor(f"{p}.bias") for p in parts]) if bias else None
        if self.exact is not None:
            return gguf_exact.linear(
                self.g,
                x,
                self.exact,
                parts,
                b,
                name,
                prefix,
                self.accuracy_level,
                lambda x, w, b, name, prefix: self.linear(x, w, b, name, prefix, layer),
            )
        w = np.concatenate([self.ckpt.tensor(f"{p}.weight") for p in parts])
        return self.linear(x, w, b, name, prefix, layer)

    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, name: str, prefix: str, layer: int) -> str:
        cfg = self.ckpt.config
        scheme = self.recipe.scheme_for(name.rsplit(".", 1)[-1], layer, cfg.num_hidden_layers)
        if self.calibration:
            self.g.node("Identity", [x], f"{prefix}/calibration", outputs=[f"{CALIBRATION_PREFIX}{name}"])
            self.g.output(
                f"{CALIBRATION_PREFIX}{name}",
                TensorProto.FLOAT,
                ["batch_size", "sequence_length", w.shape[1]],
            )
        return linear(self.g, x, w, b, scheme, name, prefix, self.accuracy_level, self.calib_stats.get(name))


def io_names(config: QwenConfig) -> dict[str, list[str]]:
    """The graph's input and output names, recorded in the manifest."""
    layers = range(config.num_hidden_layers)
    past = [f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in layers for kv in ("key", "value")]
    return {
        "inputs": ["input_ids", "attention_mask", "position_ids", *past],
        "outputs": ["logits", *present],
    }


def build_graph(
    g: Graph,
    ckpt: Checkpoint,
    opts: ExportOptions,
    progress: Callable[[str], None],
    calib_stats: Mapping[str, np.ndarray] | None = None,
    calibration: bool = False,
) -> None:
    """Add the whole decoder to `g`, reading one tensor at a time from `ckpt`."""
    cfg = ckpt.config
    assert opts.max_context is not None, "resolve options with ExportOptions.for_model first"
    exact = gguf_exact.ExactTensors.of(ckpt) if opts.algo == GGUF_EXACT else None
    b = Build(g, ckpt, opts.recipe_for(cfg), opts.accuracy_level, calib_stats or {}, calibration, exact)
    input_ids = g.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    mask = g.input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
    positions = g.input("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    g.output("logits", TensorProto.FLOAT, ["batch_size", "logits_length", cfg.vocab_size])
    seqlens_k, total_len = attention_lengths(g, mask)
    cos, sin = rotary_caches(g, cfg, opts.max_context)

    progress("embed_tokens")
    x, head = embed(b, input_ids)
    residual = None
    for i in range(cfg.num_hidden_layers):
        progress(f"layer {i}")
        prefix = f"/model/layers.{i}"
        normed, residual = rms_norm(
            b, x, residual, f"model.layers.{i}.input_layernorm", f"{prefix}/input_layernorm"
        )
        x = attention(b, normed, i, seqlens_k, total_len, cos, sin, positions)
        normed, residual = rms_norm(
            b, x, residual, f"model.layers.{i}.post_attention_layernorm", f"{prefix}/post_attention_layernorm"
        )
        x = mlp(b, normed, i)
    normed, _ = rms_norm(b, x, residual, "model.norm", "/model/norm")
    # (batch, seq, hidden) -> (batch, seq - start, hidden). Generation only samples the last position:
    # edge-qwen's runtime feeds logits_start = [-1] and the lm_head runs on it alone (at a 128-token
    # prompt, every position's logits would add ~17 GMAC to the 0.5B's prefill). The default keeps
    # what other runtimes expect: every position ("all"), or the last alone ("last": edge-qwen only).
    start = g.overridable("logits_start", np.array([-1 if opts.logits == "last" else 0], np.int64))
    normed = g.op(
        "Slice", [normed, start, g.constant([INT64_MAX]), g.constant([1])], "/model/norm/logits/Slice"
    )
    progress("lm_head")
    logits = head(normed)
    g.node("Identity", [logits], "/logits/Identity", outputs=["logits"])


def embed(b: Build, ids: str) -> tuple[str, Callable[[str], str]]:
    """The embedding lookup, and the lm_head to run on the final hidden states (it may share the table)."""
    if b.exact is not None:
        return gguf_exact.embed(
            b.g,
            ids,
            b.exact,
            b.ckpt.config.tie_word_embeddings,
            b.accuracy_level,
            lambda table: embedding(b.g, ids, table, b.recipe.embeddings)[0],
            lambda x, table: lm_head(b, x, table, None),
        )
    table = b.ckpt.tensor("model.embed_tokens.weight")  # (vocab, hidden)
    # A tied matrix is quantized once for both uses, weighted by lm_head's inputs (a lookup has no error
    # to weight).
    shared = b.ckpt.config.tie_word_embeddings and b.recipe.lm_head == b.recipe.embeddings
    x, vocab_matrix = embedding(
        b.g, ids, table, b.recipe.embeddings, b.calib_stats.get("lm_head") if shared else None
    )
    return x, lambda normed: lm_head(b, normed, table, vocab_matrix)


def lm_head(b: Build, x: str, table: np.ndarray, vocab_matrix: QuantizedRef | None) -> str:
    """Tied checkpoints reuse the embedding's quantized matrix when both use the same scheme."""
    cfg = b.ckpt.config
    if cfg.tie_word_embeddings and vocab_matrix is not None and b.recipe.lm_head == b.recipe.embeddings:
        return tied_lm_head(b.g, x, vocab_matrix, b.accuracy_level)
    head = table if cfg.tie_word_embeddings else b.ckpt.tensor("lm_head.weight")
    scheme = b.recipe.lm_head
    if b.calibration:
        b.g.node("Identity", [x], "/lm_head/calibration", outputs=[f"{CALIBRATION_PREFIX}lm_head"])
        b.g.output(
            f"{CALIBRATION_PREFIX}lm_head",
            TensorProto.FLOAT,
            ["batch_size", "logits_length", cfg.hidden_size],
        )
    if scheme.quantized:
        q = quantize_weight(head, scheme, b.calib_stats.get("lm_head"))
        return quantized_lm_head(b.g, x, q, b.accuracy_level)
    return linear(b.g, x, head, None, scheme, "lm_head", "/lm_head", b.accuracy_level)


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


def rms_norm(b: Build, x: str, residual: str | None, name: str, prefix: str) -> tuple[str, str]:
    """RMSNorm of x + residual; returns (normed, new residual). The first norm has no residual yet."""
    g, eps = b.g, b.ckpt.config.rms_norm_eps
    weight = g.weight(f"{name}.weight", b.ckpt.tensor(f"{name}.weight"))
    if residual is None:
        normed = g.op(
            "SimplifiedLayerNormalization",
            [x, weight],
            f"{prefix}/SimplifiedLayerNorm",
            epsilon=eps,
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
        epsilon=eps,
    )
    return outs[0], outs[3]


def attention(
    b: Build, x: str, i: int, seqlens_k: str, total_len: str, cos: str, sin: str, positions: str
) -> str:
    #   x -> qkv_proj (one projection + bias) -> GroupQueryAttention(rotary, past/present) -> o_proj
    g, cfg = b.g, b.ckpt.config
    name, prefix = f"model.layers.{i}.self_attn", f"/model/layers.{i}/attn"
    parts = [f"{name}.{p}_proj" for p in "qkv"]  # one (q + 2 kv, hidden) weight
    qkv = b.projection(x, parts, f"{name}.qkv_proj", f"{prefix}/qkv_proj", i, bias=True)
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
        [qkv, "", "", past_k, past_v, seqlens_k, total_len, cos, sin, positions],
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
    return b.projection(out, [f"{name}.o_proj"], f"{name}.o_proj", f"{prefix}/o_proj", i)


def mlp(b: Build, x: str, i: int) -> str:
    #   x -> gate_up (one projection) -> Split -> SiLU(gate) * up -> down
    g, ffn = b.g, b.ckpt.config.intermediate_size
    name, prefix = f"model.layers.{i}.mlp", f"/model/layers.{i}/mlp"
    parts = [f"{name}.gate_proj", f"{name}.up_proj"]  # one (2 ffn, hidden) weight
    gate_up = b.projection(x, parts, f"{name}.gate_up_proj", f"{prefix}/gate_up_proj", i)
    gate, up = g.node("Split", [gate_up, g.constant([ffn, ffn])], f"{prefix}/Split", outputs=2, axis=-1)
    sigmoid = g.op("Sigmoid", [gate], f"{prefix}/act_fn/Sigmoid")
    silu = g.op("Mul", [gate, sigmoid], f"{prefix}/act_fn/Mul")
    hidden = g.op("Mul", [silu, up], f"{prefix}/Mul")
    return b.projection(hidden, [f"{name}.down_proj"], f"{name}.down_proj", f"{prefix}/down_proj", i)
