"""`edge-qwen eval`: a package against a reference package, with llama.cpp's perplexity/KL protocol.

The text is cut into chunks of ctx tokens; each chunk runs from an empty cache and only the second
half of its positions is scored (so every scored token has at least ctx/2 tokens of context).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

import edge_qwen
from edge_qwen.config import QwenConfig
from edge_qwen.model import Model
from edge_qwen.npu import NpuModel
from edge_qwen.quant.metrics import QualityAccumulator, log_softmax
from edge_qwen.quant.texts import Text, load_text


def chunk_ids(model: Model, text: Text, ctx: int, max_chunks: int, spread: bool = False) -> list[np.ndarray]:
    """Non-overlapping chunks of ctx token ids (at most max_chunks): the first ones, or, with `spread`,
    ones spaced evenly over the whole text (a domain of several documents is sampled from each)."""
    if ctx < 16:
        raise ValueError(f"ctx must be >= 16, got {ctx}")
    if ctx > model.manifest.max_context:
        raise ValueError(f"ctx {ctx} exceeds the package's max context {model.manifest.max_context}")
    ids = np.asarray(model.tokenizer.encode(text.text, add_special_tokens=False).ids, dtype=np.int64)
    total = ids.size // ctx
    n = min(max_chunks, total)
    if n == 0:
        raise ValueError(f"text {text.name!r} has {ids.size} tokens, fewer than one chunk of {ctx}")
    starts = np.linspace(0, total - 1, n).round().astype(int) if spread else np.arange(n)
    return [ids[i * ctx : (i + 1) * ctx] for i in starts]


class Decoder(Protocol):
    """What scoring needs: an ONNX Runtime session over a genai-convention decoder, and its shape."""

    session: ort.InferenceSession
    config: QwenConfig


def scored_logits(model: Decoder, chunk: np.ndarray) -> np.ndarray:
    """Logits (ctx - 1 - ctx // 2, vocab) of the scored positions ctx/2 .. ctx-2 of one chunk.

    Works for any decoder with onnxruntime-genai's inputs (ours, or onnxruntime-genai's own graphs);
    ours can skip the lm_head on the unscored half through its `logits_start` input.
    """
    cfg, half = model.config, chunk.size // 2
    if isinstance(model, NpuModel):  # static parts: the prompt runs in steps of the prefill length
        return model.logits(chunk)[half:-1]
    empty = np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
    feeds: dict[str, np.ndarray] = {
        "input_ids": chunk.reshape(1, -1),
        "attention_mask": np.ones((1, chunk.size), np.int64),
    }
    for i in range(cfg.num_hidden_layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    if any(i.name == "position_ids" for i in model.session.get_inputs()):
        feeds["position_ids"] = np.arange(chunk.size, dtype=np.int64)[None]
    skips_unscored = any(i.name == "logits_start" for i in model.session.get_overridable_initializers())
    if skips_unscored:
        feeds["logits_start"] = np.array([half], np.int64)
    logits = model.session.run(["logits"], feeds)[0][0]  # (ctx | ctx - half, vocab)
    return logits[0 if skips_unscored else half : -1]  # the last position predicts a token outside the chunk


def targets(chunk: np.ndarray) -> np.ndarray:
    return chunk[chunk.size // 2 + 1 :]


def evaluate(
    model_path: Path,
    reference_path: Path,
    text_spec: str = "code",
    ctx: int = 512,
    max_chunks: int = 16,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Mean/p99 KLD, top-1 agreement and perplexities of MODEL against REFERENCE on one text."""
    model, reference = edge_qwen.load(model_path), edge_qwen.load(reference_path)
    if model.config.vocab_size != reference.config.vocab_size:
        raise ValueError(
            f"vocabularies differ: {model.config.vocab_size} vs {reference.config.vocab_size} tokens"
        )
    text = load_text(text_spec)
    chunks = chunk_ids(reference, text, ctx, max_chunks)
    return {
        "model": str(model_path),
        "reference": str(reference_path),
        "ctx": ctx,
        "chunks": len(chunks),
        "text": text.describe(),
        **compare(model, reference, chunks, text.name, show_progress),
    }


def compare(
    model: Decoder, reference: Decoder, chunks: list[np.ndarray], name: str, progress: bool
) -> dict[str, float | int]:
    """The quality report of `model` against `reference` over the scored halves of `chunks`."""
    acc = QualityAccumulator()
    for chunk in tqdm(chunks, desc=f"eval {name}", unit="chunk", disable=not progress):
        acc.add(log_softmax(scored_logits(reference, chunk)), scored_logits(model, chunk), targets(chunk))
    return acc.report().to_dict()


def evaluate_suite(
    model_path: Path,
    reference_path: Path,
    domains: tuple[str, ...] | None = None,
    ctx: int = 512,
    max_chunks: int = 16,
    show_progress: bool = True,
) -> dict[str, Any]:
    """evaluate() on each domain of the held-out suite (edge_qwen.quant.suite), and their macro average."""
    from edge_qwen.quant import suite

    model, reference = edge_qwen.load(model_path), edge_qwen.load(reference_path)
    reports = {}
    for name in domains or suite.DOMAINS:
        text = suite.domain_text(name)
        chunks = chunk_ids(reference, text, ctx, max_chunks, spread=True)
        reports[name] = {
            "chunks": len(chunks),
            "text": text.describe(),
            **compare(model, reference, chunks, name, show_progress),
        }
    keys = ("mean_kld", "top1_agreement", "ppl_ratio")
    macro = {k: float(np.mean([r[k] for r in reports.values()])) for k in keys}
    return {
        "model": str(model_path),
        "reference": str(reference_path),
        "ctx": ctx,
        "domains": reports,
        "macro": macro,
    }


def iter_scored(model: Decoder, chunks: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Scored logits of each chunk in turn (for scripts that reuse one reference across models)."""
    for chunk in chunks:
        yield scored_logits(model, chunk)
