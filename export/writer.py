"""Write a model package: graph, weights, tokenizer, configs and manifest, atomically."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from edge_qwen import __version__
from edge_qwen.cache import available_memory
from edge_qwen.config import QwenConfig
from edge_qwen.errors import PackageError
from edge_qwen.export import gguf_exact
from edge_qwen.export.builder import build_graph, io_names
from edge_qwen.export.calibrate import (
    CALIBRATION_CHUNKS,
    CALIBRATION_CTX,
    calibration_record,
    collect_statistics,
)
from edge_qwen.export.checkpoint import Checkpoint
from edge_qwen.export.genai_config import genai_config, hf_generation_config, runs_in
from edge_qwen.export.graph import Graph, op_counts, save_model
from edge_qwen.export.options import GGUF_EXACT, ExportOptions
from edge_qwen.package import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, sha256_file, work_dir
from edge_qwen.quant.texts import Text, builtin_text

log = logging.getLogger(__name__)

# A full disk, a full quota, or a file-size limit (ulimit -f).
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Qwen2.5 chat ends a turn with <|im_end|>, while its tokenizer config names <|endoftext|> as eos:
# both must stop generation, whatever a checkpoint's configs say.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def write_package(
    ckpt: Checkpoint,
    out: Path,
    opts: ExportOptions,
    overwrite: bool = False,
    show_progress: bool = True,
    calibration: bool = False,
    calib_stats: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Export `ckpt` into the folder `out`; nothing appears at `out` unless the export completes.

    `calibration` exposes every linear input as an extra output (for export/calibrate.py only);
    `calib_stats` reuses statistics already collected from the built-in calibration text
    (export/calibrate.py); otherwise they are collected when the algorithm needs them.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already exists: choose another folder, or pass --force (--overwrite) to replace it"
        )
    if opts.algo == GGUF_EXACT:
        opts = gguf_exact.options_for(ckpt, opts)
    opts = opts.for_model(ckpt.config)
    if opts.needs_hessians and calib_stats is None:
        opts = _gptq_or_imatrix(ckpt, opts)
    tmp = work_dir(out.parent, out.name)
    tmp.chmod(0o755)  # mkdtemp makes it private; a package is an ordinary, shareable folder
    try:
        text = choose_calibration_text(ckpt, opts.calibration) if opts.needs_calibration else None
        if text and calib_stats is None:
            calib_stats = collect_statistics(ckpt, text, opts.needs_hessians, tmp, show_progress)
        _write_contents(ckpt, tmp, opts, show_progress, calib_stats, calibration, text)
        _replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in NO_ROOM:
            raise PackageError(
                f"no room to write the package in {out.parent} ({e.strerror}); nothing was left behind: "
                "free space there or export to another disk"
            ) from e
        raise
    return out


def choose_calibration_text(ckpt: Checkpoint, which: str, windows: int = CALIBRATION_CHUNKS) -> Text:
    """The text calibration runs on: Python's own code and docs, or the multi-domain mix, made as
    long as `windows` calibration windows. "auto" is the mix when its texts can be had (cached, or
    downloaded once from Debian's mirror, ~37 MB), else the built-in text, with a warning."""
    if which == "builtin":
        return builtin_text("calibration")
    from tokenizers import Tokenizer

    from edge_qwen.quant.suite import calibration_text as suite_mix

    tokenizer = Tokenizer.from_str(ckpt.tokenizer.tokenizer_json)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    try:
        return suite_mix(count, total_tokens=windows * CALIBRATION_CTX)
    except (OSError, ValueError) as e:  # no network, or a cached text that is not the pinned one
        if which != "auto":
            raise
        log.warning(
            "calibrating on the built-in Python text instead of the multi-domain mix (%s); the mix "
            "quantizes prose and other languages better: connect to the network and export again",
            e,
        )
        return builtin_text("calibration")


def _write_contents(
    ckpt: Checkpoint,
    root: Path,
    opts: ExportOptions,
    show_progress: bool,
    calib_stats: Mapping[str, np.ndarray] | None,
    calibration: bool,
    calibration_text: Text | None,
) -> None:
    steps = ckpt.config.num_hidden_layers + 2  # embeddings, each layer, lm_head
    with (
        tqdm(total=steps, desc="export", unit="step", disable=not show_progress) as bar,
        open(root / WEIGHTS, "wb") as data,
    ):
        graph = Graph(data, WEIGHTS)
        started = []

        def progress(what: str) -> None:  # called as each step starts
            if started:
                bar.update(1)
            started.append(what)
            bar.set_postfix_str(what)

        build_graph(graph, ckpt, opts, progress, calib_stats, calibration)
        bar.update(1)
    model = graph.to_model("edge_qwen_qwen2")
    save_model(model, root / "model.onnx")
    tok = ckpt.tokenizer
    (root / "tokenizer.json").write_text(compact_merges(tok.tokenizer_json), encoding="utf-8")
    stop_ids = stop_token_ids(tok.tokenizer_json, tok.tokenizer_config, tok.generation_config)
    _write_json(root / "tokenizer_config.json", tok.tokenizer_config)
    _write_json(root / "config.json", ckpt.config.to_hf())
    _write_json(root / "generation_config.json", hf_generation_config(stop_ids, tok.generation_config))
    _write_json(root / "genai_config.json", genai_config(ckpt.config, opts, stop_ids, tok.generation_config))
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(root.iterdir())}
    names = io_names(ckpt.config)
    _write_json(
        root / MANIFEST,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tool": f"edge-qwen {__version__}",
            "config": ckpt.config.to_dict(),
            "precision": opts.precision,
            "quantization": {
                "recipe": _recipe_record(ckpt, opts),
                "accuracy_level": opts.accuracy_level,
                "target_cpu": opts.target_cpu,
                "calibration": calibration_record(calibration_text) if calibration_text else None,
            },
            "max_context": opts.max_context,
            "logits": opts.logits,
            "runs_in": runs_in(opts),
            "io": names,
            "op_counts": dict(sorted(op_counts(model).items())),
            "stop_token_ids": stop_ids,
            "source": {"path": ckpt.source, "sha256": ckpt.source_sha256},
            "files": files,
        },
    )


def _recipe_record(ckpt: Checkpoint, opts: ExportOptions) -> dict[str, str | None]:
    recipe = opts.recipe_for(ckpt.config)
    if opts.algo == GGUF_EXACT:
        return gguf_exact.ExactTensors.of(ckpt).record(recipe.body.describe())
    return recipe.to_dict()


# Peak memory of a GPTQ export as a multiple of its X^T X statistics: the statistics, the fp32
# calibration session and the checkpoint reader (measured 6.7 GB for the 0.5B's 2.5 GB of statistics).
GPTQ_MEMORY_FACTOR = 2.7


def hessian_bytes(config: QwenConfig) -> int:
    """Bytes of float32 X^T X for every linear input (GPTQ's calibration statistics)."""
    h, ffn = config.hidden_size, config.intermediate_size
    per_layer = 3 * h * h + ffn * ffn  # inputs of qkv, o_proj, gate_up (all hidden) and down_proj (ffn)
    return 4 * (config.num_hidden_layers * per_layer + h * h)  # + lm_head


def _gptq_or_imatrix(ckpt: Checkpoint, opts: ExportOptions) -> ExportOptions:
    """GPTQ when its statistics fit in the memory available now, else imatrix (one warning, recorded)."""
    need = GPTQ_MEMORY_FACTOR * hessian_bytes(ckpt.config)
    free = available_memory()
    if free is None or need <= free:
        return opts
    log.warning(
        "GPTQ would need about %.1f GB here and %.1f GB is free: quantizing with imatrix instead "
        "(pass --algo imatrix to choose it yourself)",
        need / 1e9,
        free / 1e9,
    )
    return replace(opts, algo="imatrix")


def compact_merges(tokenizer_json: str) -> str:
    """tokenizer.json with its BPE merges as "a b" strings rather than ["a", "b"] pairs.

    The tokenizers library reads both alike, but the pairs cost every load: measured on Qwen2.5's
    151,387 merges, the parse peaks 58 MB higher (177.1 vs 119.4 MB), takes ~0.1 s longer
    (0.40-0.54 vs 0.28-0.45 s) and leaves 3.4 MB more resident (docs/memory.md). A token holding a
    space (none in a byte-level vocabulary, where a space is Ġ) could not be written so: then the
    file is left as it is.
    """
    data = json.loads(tokenizer_json)
    model = data.get("model") or {}
    merges = model.get("merges")
    pairs = isinstance(merges, list) and all(
        isinstance(m, list) and len(m) == 2 and all(isinstance(t, str) and " " not in t for t in m)
        for m in merges
    )
    if model.get("type") != "BPE" or not merges or not pairs:
        return tokenizer_json
    model["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(data, ensure_ascii=False)


def stop_token_ids(
    tokenizer_json: str, tokenizer_config: dict[str, Any], generation_config: dict[str, Any] | None
) -> list[int]:
    """Every id that ends generation: configured eos ids plus Qwen's turn and text terminators."""
    vocab = {t["content"]: t["id"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
    ids: list[int] = []
    configured = (generation_config or {}).get("eos_token_id")
    ids += configured if isinstance(configured, list) else [configured] if configured is not None else []
    eos = tokenizer_config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    for token in (eos, *STOP_TOKENS):
        if token in vocab:
            ids.append(vocab[token])
    return sorted(set(ids))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _replace_dir(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` (overwrite) is moved aside first and removed after.

    `out` is always the old package or the new one, never a mix; killed between the two renames, it
    is absent and the old one waits aside until the next export there removes it.
    """
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
