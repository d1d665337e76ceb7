"""What every checkpoint reader returns: a config, float tensors by Hugging Face name, tokenizer files."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
