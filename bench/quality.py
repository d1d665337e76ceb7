#!/usr/bin/env python3
"""Quality of every precision and INT4 recipe on the real Qwen2.5-Coder-0.5B-Instruct -> docs/quality.md.

Every row is measured against our own fp32 export of the same checkpoint, on the same chunks of the
same texts (built-in 'code' and 'prose', from Python's standard library), with llama.cpp's protocol:
chunks of --ctx tokens from an empty cache, second half scored. Peers: onnxruntime-genai's INT4
default and k_quant_mixed builds (../shared/peers/ortgenai_peer.sh).

    python bench/quality.py                      # all rows (~40 min on 2 cores; exports are cached)
    python bench/quality.py --rows int4-imatrix-b32 ort-genai-int4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort

import edge_qwen
from edge_qwen.apps.evaluate import chunk_ids, scored_logits, targets
from edge_qwen.export import is_current, mark_current, source_fingerprint
from edge_qwen.export.calibrate import CALIBRATION_CHUNKS, cached_statistics
from edge_qwen.export.options import ExportOptions
from edge_qwen.export.readers import read_checkpoint
from edge_qwen.export.writer import choose_calibration_text, write_package
from edge_qwen.providers import session_options
from edge_qwen.quant.metrics import QualityAccumulator, log_softmax
from edge_qwen.quant.texts import builtin_text

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PEERS = Path(os.environ.get("EDGE_QWEN_PEERS", Path.home() / ".cache" / "edge-qwen-peers"))

OURS: dict[str, dict[str, Any]] = {"fp16": {"precision": "fp16"}, "int8-kquant-b32": {"precision": "int8"}}


def _int4(algo: str, block: int, **recipe: Any) -> dict[str, Any]:
    return {"precision": "int4", "algo": algo, "block_size": block, **recipe}


for _algo in ("rtn", "kquant", "imatrix"):
    for _block in (32, 64, 128):
        OURS[f"int4-{_algo}-b{_block}"] = _int4(_algo, _block)
for _block in (32, 64, 128):
    OURS[f"int4-gptq-b{_block}-head4"] = _int4("gptq", _block, lm_head="int4")
    OURS[f"int4-gptq-sym-b{_block}-head4"] = _int4("gptq", _block, lm_head="int4", symmetric=True)
    OURS[f"int4-imatrix-sym-b{_block}"] = _int4("imatrix", _block, symmetric=True)
    OURS[f"int4-imatrix-b{_block}-head4"] = _int4("imatrix", _block, lm_head="int4")
# No int8 layers: the fastest decode at each block size (docs/performance.md); symmetric is what
# ONNX Runtime's fastest ARM kernels take (docs/quantization.md).
for _sym in ("", "-sym"):
    for _block in (32, 64):
        OURS[f"int4-gptq{_sym}-b{_block}-head4-nomix"] = _int4(
            "gptq", _block, lm_head="int4", mixed=False, **({"symmetric": True} if _sym else {})
        )
# Per-tensor block sizes: the biggest matrices (gate_up_proj, ~60% of the layers' weights) at 64.
OURS["int4-gptq-b32-head4-gu64"] = _int4("gptq", 32, lm_head="int4", block_sizes=(("gate_up_proj", 64),))
OURS["int4-gptq-b32-head4-nomix-gu64"] = _int4(
    "gptq", 32, lm_head="int4", mixed=False, block_sizes=(("gate_up_proj", 64),)
)
# The default plus down_proj at 64: the next 5% of decode (bench/floor.py --layouts), priced in quality.
OURS["int4-gptq-b32-head4-nomix-gu64-dn64"] = _int4(
    "gptq", 32, lm_head="int4", mixed=False, block_sizes=(("gate_up_proj", 64), ("down_proj", 64))
)
# The default with lm_head (and the tied embedding) at 64 or 128: lm_head is 30% of the bytes a
# decoded token reads, the biggest single lever (docs/quantization.md).
for _block in (64, 128):
    OURS[f"int4-gptq-b32-head4-nomix-gu64-hd{_block}"] = _int4(
        "gptq", 32, lm_head="int4", mixed=False, block_sizes=(("gate_up_proj", 64), ("lm_head", _block))
    )
# Calibrated on the multi-domain mix (quant/suite.py) instead of the built-in Python text: the
# default layout, block 32 everywhere, and block 32 with int8 qkv/down_proj in the edge layers.
OURS["int4-gptq-b32-head4-nomix-gu64-hd64-suite"] = {
    **OURS["int4-gptq-b32-head4-nomix-gu64-hd64"],
    "calibration": "suite",
}
OURS["int4-gptq-b32-head4-nomix-suite"] = {**OURS["int4-gptq-b32-head4-nomix"], "calibration": "suite"}
OURS["int4-gptq-b32-head4-hd64-suite"] = _int4(
    "gptq", 32, lm_head="int4", block_sizes=(("lm_head", 64),), calibration="suite"
)
# A GGUF's own blocks carried over (--recipe exact), the default for a GGUF source.
OURS["int4-gguf-exact"] = {"precision": "int4", "algo": "gguf"}
PEER_ROWS = {
    "ort-genai-int4": "ortgenai-int4-qwen2.5-coder-0.5b-instruct",
    "ort-genai-int4-kqmixed": "ortgenai-int4-kqmixed",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="*", default=[*OURS, *PEER_ROWS])
    p.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("EDGE_QWEN_BENCH", Path.home() / ".cache" / "edge-qwen-bench")),
    )
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument(
        "--windows",
        type=int,
        default=CALIBRATION_CHUNKS,
        help="calibration windows of 512 tokens for imatrix and gptq rows; other than the default, "
        "row names get a -wN suffix",
    )
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "quality.json")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "quality.md")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    gguf = fetch_gguf()
    ref_pkg = ensure_export(gguf, args.work / "fp32", {"precision": "fp32"}, None)
    ref = edge_qwen.load(ref_pkg)
    texts = {name: chunk_ids(ref, builtin_text(name), args.ctx, args.chunks) for name in ("code", "prose")}
    ref_lp = {
        name: reference_logprobs(ref, chunks, args.work / f"ref-{name}-{args.ctx}x{len(chunks)}.npy")
        for name, chunks in texts.items()
    }
    stats: dict[str, Any] = {}  # by calibration text
    results = load_results(args.json)
    for row in args.rows:
        if row in OURS:
            calibrated = OURS[row].get("algo") in ("imatrix", "gptq")
            which = OURS[row].get("calibration", "builtin")
            if calibrated and which not in stats:
                stats.clear()  # one set at a time: 2.4 GB each for the 0.5B
                # X^T X of every linear input: GPTQ uses it whole, imatrix its diagonal.
                ckpt = read_checkpoint(gguf)
                text = choose_calibration_text(ckpt, which, args.windows)
                stats[which] = cached_statistics(ckpt, text, True, args.work, max_chunks=args.windows)
            name = f"{row}-w{args.windows}" if calibrated and args.windows != CALIBRATION_CHUNKS else row
            pkg = ensure_export(gguf, args.work / name, OURS[row], stats.get(which))
            decoder = edge_qwen.load(pkg)
            speed = our_decode_speed(decoder)
        else:
            name, pkg = row, PEERS / PEER_ROWS[row]
            if not (pkg / "model.onnx").is_file():
                print(f"skip {row}: {pkg} not built (../shared/peers/ortgenai_peer.sh)", file=sys.stderr)
                continue
            decoder, speed = peer_decoder(pkg, ref.config), peer_decode_speed(pkg)
        edge = max(1, ref.config.num_hidden_layers // 6)  # as export/recipe.py is_sensitive
        ours = OURS.get(row, {})
        mixed = ours.get("precision") == "int4" and ours.get("mixed", True) and ours.get("algo") != "gguf"
        results[name] = {
            "int8_edge_layers": f"{edge}+{edge}" if mixed else None,
            "size_bytes": folder_size(pkg),
            "decode_tps": speed,
            "package": str(pkg),
            "exporter": source_fingerprint() if row in OURS else None,
            **{text: score(decoder, texts[text], ref_lp[text]) for text in texts},
        }
        print(name, json.dumps(results[name]), flush=True)
        save(results, args, ref_pkg)


def peer_decoder(pkg: Path, config: Any) -> SimpleNamespace:
    """A peer's model.onnx in a plain CPU session, with our reference's config: what score() runs."""
    session = ort.InferenceSession(str(pkg / "model.onnx"), session_options(None), ["CPUExecutionProvider"])
    return SimpleNamespace(session=session, config=config)


def fetch_gguf() -> Path:
    out = subprocess.run(
        [sys.executable, str(SHARED / "models" / "fetch_gguf.py"), "qwen2.5-coder-0.5b-instruct"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def ensure_export(gguf: Path, out: Path, options: dict[str, Any], stats: Any) -> Path:
    """The row's package, exported again when the exporter's source has changed since."""
    ckpt, opts = read_checkpoint(gguf), ExportOptions(**options)
    if not is_current(out, opts, ckpt.config):
        write_package(ckpt, out, opts, overwrite=True, calib_stats=stats)
        mark_current(out)
    return out


def reference_logprobs(ref: Any, chunks: list[np.ndarray], cache: Path) -> np.ndarray:
    """(chunks, scored, vocab) float32 log-probabilities of the reference, computed once and kept on disk."""
    if cache.is_file():
        return np.load(cache, mmap_mode="r")
    out = np.lib.format.open_memmap(
        cache.with_suffix(".partial.npy"),
        mode="w+",
        dtype=np.float32,
        shape=(len(chunks), chunks[0].size - 1 - chunks[0].size // 2, ref.config.vocab_size),
    )
    for i, chunk in enumerate(chunks):
        out[i] = log_softmax(scored_logits(ref, chunk))
    out.flush()
    del out
    os.replace(cache.with_suffix(".partial.npy"), cache)
    return np.load(cache, mmap_mode="r")


def score(decoder: Any, chunks: list[np.ndarray], ref_lp: np.ndarray) -> dict[str, float]:
    acc = QualityAccumulator()
    for i, chunk in enumerate(chunks):
        acc.add(np.asarray(ref_lp[i], dtype=np.float64), scored_logits(decoder, chunk), targets(chunk))
    return acc.report().to_dict()


def our_decode_speed(model: Any, prompt: int = 128, new: int = 64) -> float:
    ids = np.random.default_rng(0).integers(1000, 30000, prompt).tolist()
    cache = model.new_cache(prompt + new + 1)
    logits = model.forward(ids, cache)
    start = time.perf_counter()
    for _ in range(new):
        logits = model.forward([int(np.argmax(logits))], cache)
    return new / (time.perf_counter() - start)


def peer_decode_speed(pkg: Path, prompt: int = 128, new: int = 64) -> float | None:
    python = PEERS / "genai-venv" / "bin" / "python"
    if not python.is_file():
        return None
    cmd = [str(python), str(SHARED / "peers" / "ortgenai_bench.py"), str(pkg), str(new), str(prompt)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["decode_tps"])


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())["rows"] if path.is_file() else {}


def save(results: dict[str, Any], args: argparse.Namespace, ref_pkg: Path) -> None:
    meta = {
        "reference": str(ref_pkg),
        "ctx": args.ctx,
        "chunks": args.chunks,
        "python": sys.version.split()[0],
        "onnxruntime": ort.__version__,
        "texts": {n: builtin_text(n).describe() for n in ("code", "prose")},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
    subprocess.run(
        [sys.executable, str(REPO / "bench" / "quality_doc.py"), str(args.json), str(args.doc)], check=True
    )


if __name__ == "__main__":
    main()
