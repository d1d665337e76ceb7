"""Calibration statistics of every linear layer's inputs, for the activation-aware quantizers.

An fp32 graph of the same checkpoint, with each linear layer's input exposed as an extra output, runs
over a calibration text (disjoint from the evaluation texts). Per weight it gathers either the mean
squared input per feature, diag(X^T X) / n ("imatrix": which columns matter), or the whole
X^T X / n ("gptq": how errors in one column can be compensated by the others).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from edge_qwen.export.builder import CALIBRATION_PREFIX
from edge_qwen.export.checkpoint import Checkpoint
from edge_qwen.export.options import ExportOptions
from edge_qwen.providers import session_options
from edge_qwen.quant.texts import Text

CALIBRATION_CTX = 512
CALIBRATION_CHUNKS = 32  # 16,384 tokens of the 79,486 in the built-in text (docs/quantization.md)


def cached_statistics(
    ckpt: Checkpoint,
    text: Text,
    full: bool,
    cache_dir: Path,
    show_progress: bool = True,
    max_chunks: int = CALIBRATION_CHUNKS,
) -> dict[str, np.ndarray]:
    """collect_statistics, kept in cache_dir as .npz keyed by checkpoint, text and kind (no pickles)."""
    key = f"{ckpt.source_sha256} {text.sources} {CALIBRATION_CTX} {max_chunks} spread {full}"
    path = cache_dir / f"calibration-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    cache_dir.mkdir(parents=True, exist_ok=True)
    stats = collect_statistics(ckpt, text, full, cache_dir, show_progress, max_chunks=max_chunks)
    tmp = path.with_suffix(".partial.npz")
    np.savez(tmp, **stats)
    os.replace(tmp, path)
    return stats


def collect_statistics(
    ckpt: Checkpoint,
    text: Text,
    full: bool,
    work_dir: Path,
    show_progress: bool = True,
    ctx: int = CALIBRATION_CTX,
    max_chunks: int = CALIBRATION_CHUNKS,
) -> dict[str, np.ndarray]:
    """Weight name -> X^T X / n (in, in) when `full`, else its diagonal (in,), over the calibration text."""
    from edge_qwen.export.writer import write_package  # the writer calls us: import late

    ctx = min(ctx, ckpt.config.max_position_embeddings)
    tmp = Path(tempfile.mkdtemp(prefix=".calibration.", dir=work_dir))
    try:
        opts = ExportOptions(precision="fp32", max_context=ctx)
        pkg = write_package(ckpt, tmp / "fp32", opts, show_progress=show_progress, calibration=True)
        options = session_options(None)
        # A throwaway session: without pre-packing, ONNX Runtime keeps one copy of the fp32 weights, not two.
        options.add_session_config_entry("session.disable_prepacking", "1")
        session = ort.InferenceSession(str(pkg / "model.onnx"), options, ["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs() if o.name.startswith(CALIBRATION_PREFIX)]
        tokenizer = Tokenizer.from_str(ckpt.tokenizer.tokenizer_json)
        ids = tokenizer.encode(text.text, add_special_tokens=False).ids
        chunks = calibration_chunks(ids, ctx, max_chunks)
        sums: dict[str, np.ndarray] = {}
        for chunk in tqdm(chunks, desc="calibrate", unit="chunk", disable=not show_progress):
            outputs = session.run(names, _feeds(ckpt, np.asarray(chunk, np.int64)))
            for name, x in zip(names, outputs, strict=True):
                x = x.reshape(-1, x.shape[-1])  # (tokens, in_features)
                stat = x.T @ x if full else np.square(x).sum(0)
                if name in sums:
                    sums[name] += stat  # in place: X^T X of the 0.5B is 2.5 GB, no second copy
                else:
                    sums[name] = stat
            del outputs
        del session  # free the fp32 weights before the quantized export starts
        count = sum(len(c) for c in chunks)
        stats = {}
        for name in list(sums):
            stat = sums.pop(name)
            stat /= count
            stats[name[len(CALIBRATION_PREFIX) :]] = stat
        return stats
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def calibration_record(text: Text) -> dict[str, object]:
    """What a manifest says about calibration: the text, and which of its tokens were taken."""
    return {
        **text.describe(),
        "windows": CALIBRATION_CHUNKS,
        "window_tokens": CALIBRATION_CTX,
        "placement": "spread evenly over the text",
    }


def calibration_chunks(ids: list[int], ctx: int, max_chunks: int) -> list[list[int]]:
    """Up to max_chunks windows of ctx tokens spread evenly over the whole text.

    The built-in text is code followed by prose; its first 8,192 tokens are all one module
    (argparse.py), so taking chunks from the start calibrated on that alone.
    """
    windows = max(1, len(ids) // ctx)
    if windows <= max_chunks:
        return [ids[i : i + ctx] for i in range(0, min(len(ids), ctx * max_chunks), ctx)]
    starts = np.linspace(0, windows - 1, max_chunks).round().astype(int) * ctx
    return [ids[s : s + ctx] for s in starts]


def _feeds(ckpt: Checkpoint, chunk: np.ndarray) -> dict[str, np.ndarray]:
    cfg = ckpt.config
    empty = np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
    feeds = {
        "input_ids": chunk.reshape(1, -1),
        "attention_mask": np.ones((1, chunk.size), np.int64),
        "position_ids": np.arange(chunk.size, dtype=np.int64)[None],
        "logits_start": np.array([0], np.int64),
    }  # lm_head sees every position, as in use
    for i in range(cfg.num_hidden_layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    return feeds
