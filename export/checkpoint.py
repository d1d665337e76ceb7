"""What every checkpoint reader returns: a config, float tensors by Hugging Face name, tokenizer files."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_qwen.config import QwenConfig


@dataclass(frozen=True)
class TokenizerFiles:
    """The tokenizer as it goes into a package: tokenizer.json text and tokenizer_config.json dict.

    `tokenizer_config` carries the model's own `chat_template`, `eos_token` and friends.
    """

    tokenizer_json: str
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any] | None = None


@dataclass(frozen=True)
class Checkpoint:
    """A Qwen2 checkpoint read from any source.

    `tensor(name)` returns the float32 array stored under a Hugging Face name, such as
    `model.layers.0.self_attn.q_proj.weight` (out_features, in_features); tensors load lazily, one at
    a time, so exporting a 3B model never holds two copies of every weight.
    """

    config: QwenConfig
    names: frozenset[str]
    load: Callable[[str], np.ndarray]
    tokenizer: TokenizerFiles
    source: str  # what the user named: a folder, a hub id, a .gguf path
    source_sha256: str  # of the weight files, in a stable order
    extra: dict[str, Any] = field(default_factory=dict)

    def tensor(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(f"checkpoint {self.source} has no tensor {name}")
        return np.asarray(self.load(name), dtype=np.float32)

    def has(self, name: str) -> bool:
        return name in self.names


def expected_names(config: QwenConfig) -> Iterable[str]:
    """The tensor names a Qwen2ForCausalLM checkpoint must provide."""
    yield "model.embed_tokens.weight"
    yield "model.norm.weight"
    if not config.tie_word_embeddings:
        yield "lm_head.weight"
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight"
        yield f"{p}.post_attention_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj"):
            yield f"{p}.self_attn.{proj}.weight"
            yield f"{p}.self_attn.{proj}.bias"
        yield f"{p}.self_attn.o_proj.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield f"{p}.mlp.{proj}.weight"


def expected_shapes(config: QwenConfig) -> dict[str, tuple[int, ...]]:
    """Each tensor of a Qwen2ForCausalLM checkpoint with its shape (out_features, in_features)."""
    h, ffn, head = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.q_proj.bias": (q,),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.k_proj.bias": (kv,),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.bias": (kv,),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.mlp.gate_proj.weight": (ffn, h),
            f"{p}.mlp.up_proj.weight": (ffn, h),
            f"{p}.mlp.down_proj.weight": (h, ffn),
        }
    return shapes


def check_shapes(config: QwenConfig, shapes: Mapping[str, tuple[int, ...]], source: object) -> None:
    """ValueError naming the first tensor of `shapes` whose shape is not what `config` implies."""
    for name, expected in expected_shapes(config).items():
        found = tuple(shapes.get(name, expected))
        if found != expected:
            raise ValueError(
                f"{source}: tensor {name} has shape {list(found)}, but the model's config implies "
                f"{list(expected)}: the weights do not belong to this config"
            )
