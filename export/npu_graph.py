"""Static Qwen2 graphs for NPUs (Qualcomm HTP through ONNX Runtime's QNN execution provider).

HTP compiles a graph of fixed shapes made of standard ONNX operators; it has no builder for the
`com.microsoft` operators of the CPU graph (GroupQueryAttention, MatMulNBits, SkipSimplifiedLayer-
Normalization). So the decoder is rebuilt here from plain operators, over one fixed context window:

    embeddings (CPU)   input_ids (1, S) -> hidden_states (1, S, hidden)
    layers parts       hidden_states, attention_mask, cos, sin, past_key/value.{i}
                         -> hidden_states_out, new_key/value.{i}
    head part          hidden_states (1, S, hidden) -> logits (1, S, vocab)

S is the prefill length (AR-N) or 1 (decode, AR-1). Every shape is written with S symbolic and then
fixed (`fix_shapes`): the graph itself never names S (its Reshapes copy or infer that dimension), so
one built (and quantized) graph serves both lengths and the two files share one weights file.

The KV cache is C fixed slots per layer, plain inputs: keys transposed (1, kv_heads, head_dim, C)
as HTP's MatMul wants its second operand, values (1, kv_heads, C, head_dim). A run returns only the
S new rows; the runtime writes them into their slots (edge_qwen/npu.py). Attention runs over the C
slots plus the S new positions, masked by an explicit additive mask (1, 1, S, C + S).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_qwen.config import QwenConfig
from edge_qwen.export.checkpoint import Checkpoint
from edge_qwen.export.graph import Graph

# RMSNormalization, the op QNN's RMSNorm builder takes, is in the default domain from opset 23.
NPU_OPSET = 23
NPU_IR_VERSION = 11
SEQ = "sequence_length"  # the symbolic S of a built graph; fixed per variant by fix_shapes


def embeddings_graph(g: Graph, ckpt: Checkpoint) -> None:
    """The CPU stage: a float16 table looked up by id, as float32 hidden states."""
    cfg = ckpt.config
    ids = g.input("input_ids", TensorProto.INT64, [1, SEQ])
    table = g.weight("model.embed_tokens.weight", ckpt.tensor("model.embed_tokens.weight").astype(np.float16))
    rows = g.op("Gather", [table, ids], "/model/embed_tokens/Gather", axis=0)
    g.node("Cast", [rows], "/model/embed_tokens/Cast", outputs=["hidden_states"], to=TensorProto.FLOAT)
    g.output("hidden_states", TensorProto.FLOAT, [1, SEQ, cfg.hidden_size])


def layers_graph(g: Graph, ckpt: Checkpoint, layers: range, context: int) -> None:
    """One part of the decoder: the layers in `layers`, residual stream in and out."""
    cfg = ckpt.config
    x = g.input("hidden_states", TensorProto.FLOAT, io_shape("hidden_states", cfg, SEQ, context))
    mask = g.input("attention_mask", TensorProto.FLOAT, io_shape("attention_mask", cfg, SEQ, context))
    cos = g.input("cos", TensorProto.FLOAT, io_shape("cos", cfg, SEQ, context))
    sin = g.input("sin", TensorProto.FLOAT, io_shape("sin", cfg, SEQ, context))
    for i in layers:
        last = i == layers[-1]
        x = decoder_layer(g, ckpt, i, x, (mask, cos, sin), context, "hidden_states_out" if last else "")
    g.output("hidden_states_out", TensorProto.FLOAT, io_shape("hidden_states_out", cfg, SEQ, context))


def head_graph(g: Graph, ckpt: Checkpoint) -> None:
    """The final norm and lm_head."""
    cfg = ckpt.config
    x = g.input("hidden_states", TensorProto.FLOAT, [1, SEQ, cfg.hidden_size])
    normed = rms_norm(g, ckpt, x, "model.norm", "/model/norm")
    head = ckpt.tensor("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
    weight = g.weight("lm_head.weight", np.ascontiguousarray(head.T))  # (hidden, vocab)
    g.node("MatMul", [normed, weight], "/lm_head/MatMul", outputs=["logits"])
    g.output("logits", TensorProto.FLOAT, [1, SEQ, cfg.vocab_size])


def decoder_layer(
    g: Graph, ckpt: Checkpoint, i: int, x: str, attn_inputs: tuple[str, str, str], context: int, out: str
) -> str:
    #   x -> input_layernorm -> attention -> + x -> post_attention_layernorm -> mlp -> + (named `out`)
    prefix = f"/model/layers.{i}"
    normed = rms_norm(g, ckpt, x, f"model.layers.{i}.input_layernorm", f"{prefix}/input_layernorm")
    x = g.op("Add", [x, attention(g, ckpt, i, normed, attn_inputs, context)], f"{prefix}/attn/residual/Add")
    normed = rms_norm(
        g, ckpt, x, f"model.layers.{i}.post_attention_layernorm", f"{prefix}/post_attention_layernorm"
    )
    outputs = [out] if out else 1
    return g.node("Add", [x, mlp(g, ckpt, i, normed)], f"{prefix}/mlp/residual/Add", outputs=outputs)[0]


def rms_norm(g: Graph, ckpt: Checkpoint, x: str, name: str, prefix: str) -> str:
    weight = g.weight(f"{name}.weight", ckpt.tensor(f"{name}.weight"))
    eps = ckpt.config.rms_norm_eps
    return g.op("RMSNormalization", [x, weight], f"{prefix}/RMSNormalization", axis=-1, epsilon=eps)


def linear(g: Graph, x: str, w: np.ndarray, b: np.ndarray | None, name: str, prefix: str) -> str:
    """x @ w.T (+ b): a MatMul over a (in, out) initializer, the form QDQ quantizes per channel."""
    y = g.op("MatMul", [x, g.weight(f"{name}.weight", np.ascontiguousarray(w.T))], f"{prefix}/MatMul")
    if b is None:
        return y
    return g.op("Add", [y, g.weight(f"{name}.bias", b)], f"{prefix}/Add")


def attention(
    g: Graph, ckpt: Checkpoint, i: int, x: str, attn_inputs: tuple[str, str, str], context: int
) -> str:
    #   q, k, v projections -> rotary(q, k) -> new_key.{i} (1, kv, hd, S), new_value.{i} (1, kv, S, hd)
    #   keys = Concat(past_key, new_key), values = Concat(past_value, new_value)    (C + S positions)
    #   q grouped per kv head (1, kv, group * S, hd) @ keys -> (1, heads, S, C + S) + mask -> Softmax
    #   -> grouped @ values -> (1, S, heads * hd) -> o_proj
    cfg = ckpt.config
    mask, cos, sin = attn_inputs
    name, prefix = f"model.layers.{i}.self_attn", f"/model/layers.{i}/attn"
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    # The softmax scale is folded into q_proj (exact for head_dim 64: a power of two).
    scale = np.float32(hd**-0.5)
    q = linear(
        g, x, ckpt.tensor(f"{name}.q_proj.weight") * scale, ckpt.tensor(f"{name}.q_proj.bias") * scale,
        f"{name}.q_proj", f"{prefix}/q_proj",
    )  # fmt: skip
    k = linear(
        g,
        x,
        ckpt.tensor(f"{name}.k_proj.weight"),
        ckpt.tensor(f"{name}.k_proj.bias"),
        f"{name}.k_proj",
        f"{prefix}/k_proj",
    )
    v = linear(
        g,
        x,
        ckpt.tensor(f"{name}.v_proj.weight"),
        ckpt.tensor(f"{name}.v_proj.bias"),
        f"{name}.v_proj",
        f"{prefix}/v_proj",
    )
    q = rotary(
        g,
        g.op("Reshape", [q, g.constant([0, 0, heads, hd])], f"{prefix}/q/Reshape"),
        cos,
        sin,
        hd,
        f"{prefix}/q",
    )
    k = rotary(
        g,
        g.op("Reshape", [k, g.constant([0, 0, kv, hd])], f"{prefix}/k/Reshape"),
        cos,
        sin,
        hd,
        f"{prefix}/k",
    )
    v = g.op("Reshape", [v, g.constant([0, 0, kv, hd])], f"{prefix}/v/Reshape")
    new_key = g.node("Transpose", [k], f"{prefix}/k/Transpose", outputs=[f"new_key.{i}"], perm=[0, 2, 3, 1])[
        0
    ]
    new_value = g.node(
        "Transpose", [v], f"{prefix}/v/Transpose", outputs=[f"new_value.{i}"], perm=[0, 2, 1, 3]
    )[0]
    past_key = g.input(f"past_key.{i}", TensorProto.FLOAT, io_shape(f"past_key.{i}", cfg, SEQ, context))
    past_value = g.input(f"past_value.{i}", TensorProto.FLOAT, io_shape(f"past_value.{i}", cfg, SEQ, context))
    g.output(new_key, TensorProto.FLOAT, io_shape(new_key, cfg, SEQ, context))
    g.output(new_value, TensorProto.FLOAT, io_shape(new_value, cfg, SEQ, context))
    keys = g.op("Concat", [past_key, new_key], f"{prefix}/keys/Concat", axis=3)  # (1, kv, hd, C + S)
    values = g.op("Concat", [past_value, new_value], f"{prefix}/values/Concat", axis=2)  # (1, kv, C + S, hd)
    q = g.op("Transpose", [q], f"{prefix}/q/Transpose", perm=[0, 2, 1, 3])  # (1, heads, S, hd)
    q = g.op("Reshape", [q, g.constant([0, kv, -1, hd])], f"{prefix}/q/grouped/Reshape")
    scores = g.op("MatMul", [q, keys], f"{prefix}/scores/MatMul")  # (1, kv, group * S, C + S)
    scores = g.op("Reshape", [scores, g.constant([0, heads, -1, 0])], f"{prefix}/scores/Reshape")
    scores = g.op("Add", [scores, mask], f"{prefix}/scores/mask/Add")
    probs = g.op("Softmax", [scores], f"{prefix}/Softmax", axis=-1)
    probs = g.op("Reshape", [probs, g.constant([0, kv, -1, 0])], f"{prefix}/probs/grouped/Reshape")
    out = g.op("MatMul", [probs, values], f"{prefix}/context/MatMul")  # (1, kv, group * S, hd)
    out = g.op("Reshape", [out, g.constant([0, heads, -1, hd])], f"{prefix}/context/Reshape")
    out = g.op("Transpose", [out], f"{prefix}/context/Transpose", perm=[0, 2, 1, 3])  # (1, S, heads, hd)
    out = g.op("Reshape", [out, g.constant([0, 0, heads * hd])], f"{prefix}/context/merge/Reshape")
    return linear(g, out, ckpt.tensor(f"{name}.o_proj.weight"), None, f"{name}.o_proj", f"{prefix}/o_proj")


def rotary(g: Graph, x: str, cos: str, sin: str, hd: int, prefix: str) -> str:
    #   x (1, S, n, hd) -> x * cos + rotate_half(x) * sin, rotate_half(x) = Concat(-x2, x1)
    #   (Qwen2's non-interleaved RoPE; cos and sin (1, S, 1, hd) are inputs the runtime computes)
    half = hd // 2
    axis = g.constant([3])
    x1 = g.op("Slice", [x, g.constant([0]), g.constant([half]), axis], f"{prefix}/rotary/x1/Slice")
    x2 = g.op("Slice", [x, g.constant([half]), g.constant([hd]), axis], f"{prefix}/rotary/x2/Slice")
    rotated = g.op(
        "Concat", [g.op("Neg", [x2], f"{prefix}/rotary/Neg"), x1], f"{prefix}/rotary/Concat", axis=3
    )
    return g.op(
        "Add",
        [
            g.op("Mul", [x, cos], f"{prefix}/rotary/cos/Mul"),
            g.op("Mul", [rotated, sin], f"{prefix}/rotary/sin/Mul"),
        ],
        f"{prefix}/rotary/Add",
    )


def mlp(g: Graph, ckpt: Checkpoint, i: int, x: str) -> str:
    #   x -> gate_proj -> SiLU (x * Sigmoid(x)) -> * up_proj(x) -> down_proj
    name, prefix = f"model.layers.{i}.mlp", f"/model/layers.{i}/mlp"
    gate = linear(
        g, x, ckpt.tensor(f"{name}.gate_proj.weight"), None, f"{name}.gate_proj", f"{prefix}/gate_proj"
    )
    up = linear(g, x, ckpt.tensor(f"{name}.up_proj.weight"), None, f"{name}.up_proj", f"{prefix}/up_proj")
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{prefix}/act_fn/Sigmoid")], f"{prefix}/act_fn/Mul")
    hidden = g.op("Mul", [silu, up], f"{prefix}/Mul")
    return linear(
        g, hidden, ckpt.tensor(f"{name}.down_proj.weight"), None, f"{name}.down_proj", f"{prefix}/down_proj"
    )


def io_shape(name: str, cfg: QwenConfig, seq: int | str, context: int) -> list[int | str]:
    """The shape of a part's input or output, by name, for S = `seq` tokens per run."""
    kv, hd = cfg.num_key_value_heads, cfg.head_dim
    total: int | str = context + seq if isinstance(seq, int) else f"{context}+{seq}"
    base = name.split(".")[0]
    shapes: dict[str, list[int | str]] = {
        "input_ids": [1, seq],
        "hidden_states": [1, seq, cfg.hidden_size],
        "hidden_states_out": [1, seq, cfg.hidden_size],
        "attention_mask": [1, 1, seq, total],
        "cos": [1, seq, 1, hd],
        "sin": [1, seq, 1, hd],
        "past_key": [1, kv, hd, context],
        "past_value": [1, kv, context, hd],
        "new_key": [1, kv, hd, seq],
        "new_value": [1, kv, seq, hd],
        "logits": [1, seq, cfg.vocab_size],
    }
    return shapes[base]


def fix_shapes(model: onnx.ModelProto, cfg: QwenConfig, seq: int, context: int) -> onnx.ModelProto:
    """A copy of `model` whose inputs and outputs have static shapes for S = `seq` tokens per run.

    Inner value infos are dropped: ONNX Runtime infers them again for the new length.
    """
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for value in [*fixed.graph.input, *fixed.graph.output]:
        if any(value.name == t.name for t in fixed.graph.initializer):
            continue
        shape = io_shape(value.name, cfg, seq, context)
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shape, strict=True):
            dim.Clear()
            dim.dim_value = int(size)
    return fixed


def npu_model(g: Graph, graph_name: str) -> onnx.ModelProto:
    """The ModelProto of an NPU graph: the default domain alone, at opset 23."""
    graph = helper.make_graph(g.nodes, graph_name, g.inputs, g.outputs, g.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", NPU_OPSET)], producer_name="edge-qwen"
    )
    model.ir_version = NPU_IR_VERSION
    return model
