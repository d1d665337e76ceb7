"""A tiny 2-layer qwen2 GGUF, written with gguf's own writer, and the names its tensors map to."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 64, 2, 1, 16, 2
MERGES = ["h e", "l l", "Ġ w", "o r", "he ll", "hell o", "Ġw or", "Ġwor l", "Ġworl d", "1 2"]
SPECIALS = {"<|endoftext|>": 3, "<|im_start|>": 3, "<|im_end|>": 3, "<tool_call>": 4}
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
# Values a hostile header puts in a count, length, size or offset (the fuzz tests and
# bench/gguf_header_fuzz.py).
EXTREMES = [
    0,
    1,
    2,
    3,
    4,
    31,
    255,
    2**16,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
]


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelled, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int]]:
    tokens = byte_alphabet() + [m.replace(" ", "") for m in MERGES] + list(SPECIALS)
    types = [1] * (len(tokens) - len(SPECIALS)) + list(SPECIALS.values())
    pads = [f"[PAD{i}]" for i in range(len(tokens), 288)]  # llama.cpp pads to the embedding size
    return tokens + pads, types + [5] * len(pads)


def tiny_tensors(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in Hugging Face layout (out_features, in_features)."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"blk.{i}"
        shapes |= {
            f"{p}.attn_norm.weight": (HIDDEN,),
            f"{p}.ffn_norm.weight": (HIDDEN,),
            f"{p}.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
            f"{p}.attn_q.bias": (HEADS * HEAD_DIM,),
            f"{p}.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"{p}.attn_k.bias": (KV_HEADS * HEAD_DIM,),
            f"{p}.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"{p}.attn_v.bias": (KV_HEADS * HEAD_DIM,),
            f"{p}.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
            f"{p}.ffn_gate.weight": (FFN, HIDDEN),
            f"{p}.ffn_up.weight": (FFN, HIDDEN),
            f"{p}.ffn_down.weight": (HIDDEN, FFN),
        }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def stored_type(name: str) -> gguf.GGMLQuantizationType:
    if name == "token_embd.weight" or name.endswith("ffn_down.weight"):
        return gguf.GGMLQuantizationType.Q8_0
    if name.endswith("attn_q.weight") or name.endswith("ffn_up.weight"):
        return gguf.GGMLQuantizationType.F16
    return gguf.GGMLQuantizationType.F32


def write_tiny_gguf(
    path: Path, arch: str = "qwen2", tied: bool = False, drop: str = "", float_only: bool = False
) -> dict[str, np.ndarray]:
    """Write a 2-layer qwen2 GGUF; returns GGUF name -> the float32 values a reader must give back.

    `float_only`: F16 where a Q8_0 tensor would be, so that no tensor is quantized."""
    tokens, types = tiny_vocab()
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    expected = {}
    for name, values in tiny_tensors(len(tokens), tied).items():
        if name == drop:
            continue
        qtype = stored_type(name)
        if float_only and qtype == gguf.GGMLQuantizationType.Q8_0:
            qtype = gguf.GGMLQuantizationType.F16
        stored = gguf.quants.quantize(values, qtype)
        writer.add_tensor(name, stored, raw_dtype=qtype)
        expected[name] = gguf.quants.dequantize(stored, qtype).astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor (blk.0.attn_q.weight: model.layers.0.self_attn.q_proj...)."""
    table = {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{table[parts[2]]}.{parts[3]}"
    return f"{table[parts[0]]}.{parts[1]}"
