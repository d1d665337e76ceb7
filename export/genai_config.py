"""The configs that let other runtimes load a CPU package unmodified: onnxruntime-genai's
`genai_config.json` (its Python, C, C++, C#, Java/Kotlin and Objective-C APIs, Android's AAR) and
transformers' `config.json` / `generation_config.json` (optimum's ORTModelForCausalLM and pipelines).

Both need the graph's default to compute every position's logits: they allocate (batch, seq, vocab)
for a prompt. A package exported with `logits="last"` runs in edge-qwen alone, and says so.
"""

from __future__ import annotations

from typing import Any

from edge_qwen.config import QwenConfig
from edge_qwen.export.options import ExportOptions

GENAI = "onnxruntime-genai"
OPTIMUM = "optimum"


def ordered_stop_ids(stop_ids: list[int], generation_config: dict[str, Any] | None) -> list[int]:
    """Stop ids with the checkpoint's own eos ids first, in its order (Qwen2.5: <|im_end|> first).

    onnxruntime-genai scores every eos id as the first one, so the first must be the one the chat
    ends its turns with, for its tokens to equal ours.
    """
    configured = (generation_config or {}).get("eos_token_id")
    first = configured if isinstance(configured, list) else [configured] if configured is not None else []
    head = [int(i) for i in first if i in stop_ids]
    return head + [i for i in stop_ids if i not in head]


def genai_config(
    cfg: QwenConfig,
    opts: ExportOptions,
    stop_ids: list[int],
    generation_config: dict[str, Any] | None,
) -> dict[str, Any]:
    """onnxruntime-genai's config for the same graph and files."""
    eos = ordered_stop_ids(stop_ids, generation_config)
    gen = generation_config or {}
    inputs = {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "position_ids": "position_ids",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    outputs = {
        "logits": "logits",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }
    return {
        "model": {
            "type": "qwen2",
            "bos_token_id": int(gen.get("bos_token_id", eos[-1])),
            "eos_token_id": eos,
            "pad_token_id": int(gen.get("pad_token_id", eos[-1])),
            "vocab_size": cfg.vocab_size,
            "context_length": opts.max_context,
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
                "inputs": inputs,
                "outputs": outputs,
            },
        },
        "search": {
            "do_sample": False,
            "max_length": opts.max_context,
            "num_beams": 1,
            # GroupQueryAttention appends in place into a max_length buffer, as in our own runtime.
            "past_present_share_buffer": True,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def hf_generation_config(stop_ids: list[int], generation_config: dict[str, Any] | None) -> dict[str, Any]:
    """generation_config.json: the checkpoint's own, with every stop id as eos (its own first)."""
    return {**(generation_config or {}), "eos_token_id": ordered_stop_ids(stop_ids, generation_config)}


def runs_in(opts: ExportOptions) -> dict[str, str]:
    """Which other runtimes load the package unmodified: runtime -> "yes" or the reason it does not."""
    if opts.logits == "last":
        reason = "no: exported with logits=last (the last position's logits only); re-export with logits=all"
        return {GENAI: reason, OPTIMUM: reason}
    return {GENAI: "yes", OPTIMUM: "yes"}
