"""Tiny random Qwen2 checkpoints written with numpy alone, so that a machine without torch (the arm64
check) builds exactly the checkpoints that the x86 suite compares against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = 512
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 160, 2, 4, 2


def _tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer with Qwen's special tokens, trained on a little text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["The capital of France is Paris. 巴黎是法国的首都。 def f(x):\n    return x * 2\n"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(out / "tokenizer.json"))
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": template,
        "model_max_length": 1024,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))


def _weights(tied: bool, seed: int) -> dict[str, np.ndarray]:
    """Weights drawn as transformers initializes Qwen2 (normal, std 0.02), with biases and norms moved
    off their zeros and ones so that they matter."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS

    def linear(n_out: int, n_in: int) -> np.ndarray:
        return rng.normal(0.0, 0.02, (n_out, n_in)).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return rng.normal(0.0, 0.5, n).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + rng.normal(0.0, 0.5, HIDDEN)).astype(np.float32)

    w = {"model.embed_tokens.weight": linear(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name, n_out in (("q", HEADS * head_dim), ("k", KV_HEADS * head_dim), ("v", KV_HEADS * head_dim)):
            w[f"{p}self_attn.{name}_proj.weight"] = linear(n_out, HIDDEN)
            w[f"{p}self_attn.{name}_proj.bias"] = bias(n_out)
        w[f"{p}self_attn.o_proj.weight"] = linear(HIDDEN, HEADS * head_dim)
        w[f"{p}mlp.gate_proj.weight"] = linear(INTERMEDIATE, HIDDEN)
        w[f"{p}mlp.up_proj.weight"] = linear(INTERMEDIATE, HIDDEN)
        w[f"{p}mlp.down_proj.weight"] = linear(HIDDEN, INTERMEDIATE)
        w[f"{p}input_layernorm.weight"] = norm()
        w[f"{p}post_attention_layernorm.weight"] = norm()
    w["model.norm.weight"] = norm()
    if not tied:
        w["lm_head.weight"] = linear(VOCAB, HIDDEN)
    return w


def make_tiny_checkpoint(out: Path, tied: bool, seed: int) -> Path:
    """A Hugging Face folder (config.json, model.safetensors, tokenizer files) of a 2-layer Qwen2."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 123456.0,
        "tie_word_embeddings": tied,
        "use_sliding_window": False,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(_weights(tied, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer(out)
    return out
