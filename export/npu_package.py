"""Write an NPU package (`export --target npu`): static parts, their QDQ quantization, the manifest and
onnxruntime-genai's `decoder-pipeline` config, into a work folder renamed into place when complete."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

from edge_qwen import __version__
from edge_qwen.config import QwenConfig
from edge_qwen.export.calibrate import calibration_record
from edge_qwen.export.checkpoint import Checkpoint
from edge_qwen.export.graph import Graph, op_counts
from edge_qwen.export.npu_graph import embeddings_graph, fix_shapes, head_graph, layers_graph, npu_model
from edge_qwen.export.npu_quant import LPBQ_BLOCKS, WEIGHT_BITS, quantize_part, weight_bits
from edge_qwen.export.options import CALIBRATIONS
from edge_qwen.export.writer import _replace_dir, compact_merges, stop_token_ids
from edge_qwen.npu import NpuCache, NpuLayout, NpuPart, NpuRunner
from edge_qwen.package import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file, work_dir
from edge_qwen.quant.texts import Text, builtin_text

NPU_PRECISIONS = ("w8a16", "w4a16", "fp32")
NPU_ALGOS = ("gptq", "rtn")  # how int4 weights are rounded onto their LPBQ grid
CONTEXTS = (1024, 2048, 4096)
# The weights one part may hold. A part becomes one QNN context binary on the device: a conservative
# bound (the largest binary a given phone takes is not measured here), which also keeps the float
# part that quantization loads, calibrates and re-encodes within ~4 GB of memory. The 0.5B: three
# parts at int8 (about 120 MB each), two at int4.
PART_BYTES = 128 * 2**20
CALIBRATION_STEPS = 3  # prefill runs of calibration text: a few hundred tokens at the default length


@dataclass(frozen=True)
class NpuOptions:
    """What `export --target npu` writes."""

    precision: str = "w8a16"
    prefill_len: int = 128
    context: int = 1024
    part_bytes: int = PART_BYTES
    # W4A16 only: GPTQ's error-compensating rounding (calibrated like the CPU INT4 default) or
    # round-to-nearest, and qkv/down_proj of the first and last sixth of the layers at int8.
    algo: str = "gptq"
    int8_edges: bool = True
    calibration: str = "auto"  # GPTQ's text, as the CPU export's --calibration (export/options.py)

    def __post_init__(self) -> None:
        if self.precision not in NPU_PRECISIONS:
            raise ValueError(
                f"NPU precision must be one of {', '.join(NPU_PRECISIONS)}, got {self.precision!r}"
            )
        if self.algo not in NPU_ALGOS:
            raise ValueError(f"NPU algo must be one of {', '.join(NPU_ALGOS)}, got {self.algo!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(
                f"calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}"
            )
        if not 2 <= self.prefill_len <= self.context:
            raise ValueError(f"prefill_len must be in [2, context={self.context}], got {self.prefill_len}")
        if self.context < 16:
            raise ValueError(f"context must be >= 16, got {self.context}")

    @property
    def needs_statistics(self) -> bool:
        return self.precision == "w4a16" and self.algo == "gptq"


def split_layers(cfg: QwenConfig, bits: int, part_bytes: int) -> list[range]:
    """The layers in as few parts as keep each part's weights under part_bytes, sized evenly."""
    h, ffn, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    params = h * h * 2 + 2 * h * kv + 3 * h * ffn
    per_layer = params * bits // 8 + params // 64  # + LPBQ's uint8 block scales (blocks of 64)
    layers = cfg.num_hidden_layers
    parts = min(layers, -(-layers * per_layer // part_bytes))
    size = -(-layers // parts)
    return [range(start, min(start + size, layers)) for start in range(0, layers, size)]


def write_npu_package(
    ckpt: Checkpoint, out: Path, opts: NpuOptions, overwrite: bool = False, show_progress: bool = True,
    calib_stats: tuple[Mapping[str, np.ndarray], Text] | None = None,
) -> Path:  # fmt: skip
    """Export `ckpt` as an NPU package into `out`; nothing appears at `out` unless the export completes.

    GPTQ's statistics (export/calibrate.py) are collected when needed, unless given with their text."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another folder or pass --overwrite")
    if opts.context > ckpt.config.max_position_embeddings:
        raise ValueError(f"context {opts.context} exceeds the model's {ckpt.config.max_position_embeddings}")
    tmp = work_dir(out.parent, out.name)
    tmp.chmod(0o755)
    try:
        quantized = opts.precision != "fp32"
        floats = tmp / "float" if quantized else tmp
        floats.mkdir(exist_ok=True)
        stats: Mapping[str, np.ndarray] | None = None
        calibration: dict[str, Any] | None = None
        if opts.needs_statistics:  # first: its fp32 session is gone before the parts are built
            stats, text = calib_stats or gptq_statistics(ckpt, opts.calibration, tmp, show_progress)
        layout = write_float_parts(ckpt, floats, opts, show_progress)
        if quantized:
            feeds, calibration = calibration_feeds(ckpt, floats, layout)
            if stats is not None:
                calibration["weights"] = calibration_record(text)
            quantize_parts(ckpt, tmp, floats, layout, opts, feeds, stats, show_progress)
            for name in (layout.embeddings, f"{layout.embeddings}.data"):
                (floats / name).rename(tmp / name)
            shutil.rmtree(floats)
        write_metadata(ckpt, tmp, opts, layout, calibration)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def quantize_parts(
    ckpt: Checkpoint, tmp: Path, floats: Path, layout: NpuLayout, opts: NpuOptions,
    feeds: dict[str, list[dict[str, np.ndarray]]], stats: Mapping[str, np.ndarray] | None,
    show_progress: bool,
) -> None:  # fmt: skip
    """Each part quantized in turn; the statistics of a part's weights are let go once it is done."""
    cfg = ckpt.config

    def bits_of(weight: str) -> int:
        return weight_bits(weight, opts.precision, cfg.num_hidden_layers, opts.int8_edges)

    for part in tqdm([*layout.parts, layout.head], desc="quantize", disable=not show_progress):
        prefixes = tuple(f"model.layers.{i}." for i in part.layers) or ("lm_head",)
        names = [n for n in stats or {} if n.startswith(prefixes)]
        part_stats = None if stats is None else {n: stats[n] for n in names}
        model = floats / part.prefill
        quantize_part(
            model, tmp, part, feeds.pop(part.name), bits_of, cfg, opts.prefill_len, opts.context, part_stats
        )
        if isinstance(stats, MutableMapping):
            for n in names:
                del stats[n]
        del part_stats


def gptq_statistics(
    ckpt: Checkpoint, calibration: str, tmp: Path, show_progress: bool
) -> tuple[dict[str, np.ndarray], Text]:
    """X^T X of every weight's inputs over the CPU INT4 default's calibration text (2.5 GB for the
    0.5B, held in memory: a part's are let go once it is quantized)."""
    from edge_qwen.export.calibrate import collect_statistics
    from edge_qwen.export.writer import choose_calibration_text

    text = choose_calibration_text(ckpt, calibration)
    return collect_statistics(ckpt, text, True, tmp, show_progress), text


def write_float_parts(ckpt: Checkpoint, root: Path, opts: NpuOptions, show_progress: bool) -> NpuLayout:
    """The embeddings graph and every part in float32, each part at both static lengths."""
    cfg = ckpt.config
    bits = WEIGHT_BITS[opts.precision]
    splits = split_layers(cfg, bits, opts.part_bytes)
    parts = [
        NpuPart(f"part{k}", tuple(r), f"part{k}.prefill.onnx", f"part{k}.decode.onnx")
        for k, r in enumerate(splits)
    ]
    head = NpuPart("head", (), "head.prefill.onnx", "head.decode.onnx")
    _save(root, "embeddings", lambda g: embeddings_graph(g, ckpt), None, cfg, opts)
    for part, layers in tqdm(list(zip(parts, splits, strict=True)), desc="export", disable=not show_progress):
        _save(
            root,
            part.name,
            lambda g, layers=layers: layers_graph(g, ckpt, layers, opts.context),
            part,
            cfg,
            opts,
        )
    _save(root, head.name, lambda g: head_graph(g, ckpt), head, cfg, opts)
    return NpuLayout(opts.prefill_len, opts.context, "embeddings.onnx", tuple(parts), head)


def _save(root: Path, name: str, build: Any, part: NpuPart | None, cfg: QwenConfig, opts: NpuOptions) -> None:
    with open(root / f"{name}.onnx.data", "wb") as data:
        g = Graph(data, f"{name}.onnx.data")
        build(g)
    model = npu_model(g, f"edge_qwen_{name}")
    if part is None:  # the CPU embeddings keep their symbolic length
        (root / f"{name}.onnx").write_bytes(model.SerializeToString())
        return
    for seq, file in ((opts.prefill_len, part.prefill), (1, part.decode)):
        (root / file).write_bytes(fix_shapes(model, cfg, seq, opts.context).SerializeToString())


def calibration_feeds(
    ckpt: Checkpoint, floats: Path, layout: NpuLayout
) -> tuple[dict[str, list[dict[str, np.ndarray]]], dict[str, Any]]:
    """Each part's feeds at the prefill length while the float parts run the calibration text."""
    from tokenizers import Tokenizer

    text = builtin_text("calibration")
    tokenizer = Tokenizer.from_str(ckpt.tokenizer.tokenizer_json)
    ids = tokenizer.encode(text.text, add_special_tokens=False).ids[: CALIBRATION_STEPS * layout.prefill_len]
    runner = NpuRunner(ckpt.config, floats, layout, ort.SessionOptions(), ["CPUExecutionProvider"])
    feeds: dict[str, list[dict[str, np.ndarray]]] = {p.name: [] for p in (*layout.parts, layout.head)}

    def record(name: str, part_feeds: dict[str, np.ndarray]) -> None:
        part, kind = name.split("/")
        if kind == "prefill":  # copies: the cache's arrays are written again by later steps
            feeds[part].append({k: v.copy() for k, v in part_feeds.items()})

    runner.record = record
    runner.forward(ids, NpuCache(ckpt.config, layout.context, layout.context), all_logits=True)
    return feeds, {"text": text.describe(), "tokens": len(ids)}


def write_metadata(
    ckpt: Checkpoint, root: Path, opts: NpuOptions, layout: NpuLayout, calibration: dict[str, Any] | None
) -> None:
    """Tokenizer, configs, onnxruntime-genai's pipeline config and the manifest (last)."""
    tok = ckpt.tokenizer
    (root / "tokenizer.json").write_text(compact_merges(tok.tokenizer_json), encoding="utf-8")
    stop_ids = stop_token_ids(tok.tokenizer_json, tok.tokenizer_config, tok.generation_config)
    _write_json(root / "tokenizer_config.json", tok.tokenizer_config)
    _write_json(root / "config.json", ckpt.config.to_hf())
    _write_json(root / "generation_config.json", {**(tok.generation_config or {}), "eos_token_id": stop_ids})
    _write_json(root / "genai_config.json", genai_pipeline_config(ckpt.config, layout, stop_ids))
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(root.iterdir())}
    counts: dict[str, int] = {}
    for part in (*layout.parts, layout.head):
        for op, n in op_counts(onnx_graph(root / part.prefill)).items():
            counts[op] = counts.get(op, 0) + n
    _write_json(
        root / MANIFEST,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "npu",
            "tool": f"edge-qwen {__version__}",
            "config": ckpt.config.to_dict(),
            "precision": opts.precision,
            "quantization": {
                "weights": None if opts.precision == "fp32" else weights_record(opts),
                "activations": None if opts.precision == "fp32" else "uint16 per tensor, MinMax",
                "tool": "onnxruntime.quantization get_qnn_qdq_config + quantize",
                "calibration": calibration,
            },
            "max_context": opts.context,
            "logits": "last",
            "io": {"inputs": ["input_ids"], "outputs": ["logits"]},
            "npu": npu_section(layout, opts),
            "op_counts": dict(sorted(counts.items())),
            "stop_token_ids": stop_ids,
            "source": {"path": ckpt.source, "sha256": ckpt.source_sha256},
            "files": files,
        },
    )


def weights_record(opts: NpuOptions) -> str:
    bits = WEIGHT_BITS[opts.precision]
    record = (
        f"int{bits} block-wise, symmetric (LPBQ: uint8 block scales x float channel scales; blocks of "
        f"{LPBQ_BLOCKS[0]} inputs, or the first of {LPBQ_BLOCKS[1:]} that divides them)"
    )
    if bits == 4 and opts.int8_edges:
        record += "; int8 qkv/down_proj in the first and last sixth of the layers"
    rounding = "GPTQ" if opts.needs_statistics else "to nearest"
    return f"{record}; rounded {rounding}"


def onnx_graph(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False)


def npu_section(layout: NpuLayout, opts: NpuOptions) -> dict[str, Any]:
    def part(p: NpuPart) -> dict[str, Any]:
        return {"name": p.name, "layers": list(p.layers), "prefill": p.prefill, "decode": p.decode}

    return {
        "prefill_len": layout.prefill_len,
        "context": layout.context,
        "part_bytes_bound": opts.part_bytes,
        "embeddings": layout.embeddings,
        "parts": [part(p) for p in layout.parts],
        "head": part(layout.head),
    }


def genai_pipeline_config(cfg: QwenConfig, layout: NpuLayout, stop_ids: list[int]) -> dict[str, Any]:
    """onnxruntime-genai's `decoder-pipeline` description of the parts (format: onnxruntime-genai's
    src/config.cpp, PipelineModel_Element): the CPU embeddings, each part's prefill graph on prompts and
    decode graph on generated tokens through the QNN provider, and the head."""
    qnn = {"provider_options": [{"qnn": {"backend_path": "QnnHtp.dll", "htp_performance_mode": "burst"}}]}
    stages: dict[str, Any] = {
        "embeddings": {
            "filename": layout.embeddings,
            "inputs": ["input_ids"],
            "outputs": ["hidden_states"],
            "run_on_prompt": True,
            "run_on_token_gen": True,
        }
    }
    for part in (*layout.parts, layout.head):
        layers = [f"{k}.{i}" for i in part.layers for k in ("past_key", "past_value")]
        new = [f"{k}.{i}" for i in part.layers for k in ("new_key", "new_value")]
        inputs = (
            ["hidden_states", "attention_mask", "cos", "sin", *layers] if part.layers else ["hidden_states"]
        )
        outputs = ["hidden_states_out", *new] if part.layers else ["logits"]
        for kind, prompt in (("prefill", True), ("decode", False)):
            stage = {
                "filename": getattr(part, kind),
                "inputs": inputs,
                "outputs": outputs,
                "session_options": qnn,
                "run_on_prompt": prompt,
                "run_on_token_gen": not prompt,
            }
            if not part.layers:
                stage["is_lm_head"] = True
            stages[f"{part.name}_{kind}"] = stage
    return {
        "model": {
            "type": "decoder-pipeline",
            "bos_token_id": stop_ids[0],
            "eos_token_id": stop_ids,
            "pad_token_id": stop_ids[-1],
            "vocab_size": cfg.vocab_size,
            "context_length": layout.context,
            "decoder": {
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
                "inputs": {
                    "input_ids": "input_ids",
                    "past_key_names": "past_key.%d",
                    "past_value_names": "past_value.%d",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "new_key.%d",
                    "present_value_names": "new_value.%d",
                },
                "pipeline": [stages],
            },
        },
        "search": {
            "do_sample": False,
            "max_length": layout.context,
            "num_beams": 1,
            "past_present_share_buffer": False,
        },
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
