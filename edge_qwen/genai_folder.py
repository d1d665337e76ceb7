"""Folders made by onnxruntime-genai's model builder (CPU, Qwen2): a manifest derived from their files.

Such a folder has `genai_config.json`, `model.onnx` (+ `.data`), `tokenizer.json`,
`tokenizer_config.json` and often `chat_template.jinja`, but no `edge_qwen.json`. Its graph follows
the same decoder convention as ours (input_ids, attention_mask, past_key_values.%d.key/value ->
logits, present.%d.key/value, GroupQueryAttention), so the same engine runs it; what genai_config
does not say (intermediate size, norm epsilon, RoPE base) is read from the graph, with onnx, which the
base install carries for exporting and which only these folders need here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edge_qwen.config import QwenConfig
from edge_qwen.errors import PackageError
from edge_qwen.manifest import Manifest

GENAI_CONFIG = "genai_config.json"
FORMAT = "onnxruntime-genai"
KV = ("key", "value")
OUR_GRAPH = "edge_qwen_qwen2"  # export/writer.py's graph name
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # Qwen2.5's turn and text terminators
# The decoder convention our engine binds (edge_qwen/cache.py, engine.py).
EXPECTED_NAMES = {
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
    "past_key_names": "past_key_values.%d.key",
    "past_value_names": "past_key_values.%d.value",
    "logits": "logits",
    "present_key_names": "present.%d.key",
    "present_value_names": "present.%d.value",
}


def genai_manifest(root: Path) -> Manifest:
    """A Manifest for an onnxruntime-genai folder; PackageError naming what it lacks or we cannot run."""
    model, decoder = read_genai_config(root)
    facts = graph_facts(root / "model.onnx")
    config = QwenConfig(
        vocab_size=int(model["vocab_size"]),
        hidden_size=int(decoder["hidden_size"]),
        intermediate_size=facts["intermediate_size"],
        num_hidden_layers=int(decoder["num_hidden_layers"]),
        num_attention_heads=int(decoder["num_attention_heads"]),
        num_key_value_heads=int(decoder["num_key_value_heads"]),
        head_dim=int(decoder["head_size"]),
        rms_norm_eps=facts["rms_norm_eps"],
        rope_theta=rope_theta(facts["cos_row"], facts["sin_row"], int(decoder["head_size"])),
        max_position_embeddings=facts["max_positions"],
        tie_word_embeddings=False,  # the builder writes lm_head's matrix apart from the embedding's
    )
    layers = range(config.num_hidden_layers)
    io = {
        "inputs": [
            "input_ids",
            "attention_mask",
            *(f"past_key_values.{i}.{kv}" for i in layers for kv in KV),
        ],
        "outputs": ["logits", *(f"present.{i}.{kv}" for i in layers for kv in KV)],
    }
    files = {
        p.name: {"size": p.stat().st_size, "sha256": None} for p in sorted(root.iterdir()) if p.is_file()
    }
    stops = stop_ids(root, model)
    raw: dict[str, Any] = {
        "format": FORMAT,
        "kind": "cpu",
        "tool": "onnxruntime-genai model builder",
        "config": config.to_dict(),
        "precision": facts["precision"],
        "max_context": int(model["context_length"]),
        "logits": "all",  # no logits_start: the lm_head runs on every position
        "runs_in": {"onnxruntime-genai": "yes", "optimum": "no: no config.json or position_ids input"},
        "io": io,
        "op_counts": facts["op_counts"],
        "stop_token_ids": stops,
        "files": files,  # no recorded hashes: sizes only
    }
    return Manifest(
        config=config,
        precision=raw["precision"],
        max_context=raw["max_context"],
        logits="all",
        inputs=tuple(io["inputs"]),
        outputs=tuple(io["outputs"]),
        stop_token_ids=tuple(stops),
        files=files,
        raw=raw,
    )


def read_genai_config(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """genai_config.json's model and decoder sections, checked against what our engine binds."""
    try:
        model = json.loads((root / GENAI_CONFIG).read_text())["model"]
        decoder = model["decoder"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PackageError(f"{root / GENAI_CONFIG} is not a readable onnxruntime-genai config ({e})") from e
    if model.get("type") != "qwen2":
        raise PackageError(
            f"{root}: onnxruntime-genai model type {model.get('type')!r}; edge-qwen runs Qwen2 ('qwen2') only"
        )
    names = {**decoder.get("inputs", {}), **decoder.get("outputs", {})}
    for key, expected in EXPECTED_NAMES.items():
        if names.get(key, expected) != expected:
            raise PackageError(
                f"{root}: {GENAI_CONFIG} names {key} {names[key]!r}, edge-qwen binds {expected!r}"
            )
    if decoder.get("filename") != "model.onnx":
        raise PackageError(f"{root}: the decoder is {decoder.get('filename')!r}; edge-qwen loads model.onnx")
    for name in ("model.onnx", "tokenizer.json"):
        if not (root / name).is_file():
            raise PackageError(f"{root}: {name} is missing: the onnxruntime-genai folder is incomplete")
    return model, decoder


def stop_ids(root: Path, model: dict[str, Any]) -> list[int]:
    """genai_config's eos ids, and Qwen's turn and text terminators where the vocabulary has them."""
    eos = model.get("eos_token_id", [])
    ids = {int(i) for i in (eos if isinstance(eos, list) else [eos])}
    added = json.loads((root / "tokenizer.json").read_text()).get("added_tokens", [])
    ids |= {t["id"] for t in added if t.get("content") in STOP_TOKENS}
    return sorted(ids)


def graph_facts(path: Path) -> dict[str, Any]:
    """What the graph tells beyond genai_config: sizes, epsilon, the RoPE caches' second row, ops."""
    import onnx
    from onnx import external_data_helper, numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    if graph.name == OUR_GRAPH:
        raise PackageError(
            f"{path.parent} has no edge_qwen.json: an edge-qwen package missing its manifest, re-export it"
        )
    inits = {t.name: t for t in graph.initializer}
    facts: dict[str, Any] = {"op_counts": {}}
    for node in graph.node:
        facts["op_counts"][node.op_type] = facts["op_counts"].get(node.op_type, 0) + 1
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            facts.setdefault("precision", f"int{attrs.get('bits', 4)}")
        if "/mlp/down_proj/" in node.name and node.op_type in ("MatMul", "MatMulNBits"):
            k = attrs.get("K") or (inits[node.input[1]].dims[0] if node.input[1] in inits else None)
            facts.setdefault("intermediate_size", int(k) if k else None)
        if node.op_type == "SimplifiedLayerNormalization":
            facts.setdefault("rms_norm_eps", float(f"{attrs.get('epsilon', 1e-6):.6g}"))
        if node.op_type == "GroupQueryAttention" and "caches" not in facts:
            facts["caches"] = (node.input[7], node.input[8])
    logits = next(o for o in graph.output if o.name == "logits")
    facts.setdefault(
        "precision", "fp16" if logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "fp32"
    )
    if not facts.get("intermediate_size") or "caches" not in facts or "rms_norm_eps" not in facts:
        raise PackageError(f"{path}: not a Qwen2 decoder graph of onnxruntime-genai's builder (CPU)")
    rows = []
    for name in facts.pop("caches"):  # (max_positions, head_dim / 2)
        tensor = inits[name]
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
        table = numpy_helper.to_array(tensor)
        facts["max_positions"] = int(table.shape[0])
        rows.append(table[1].astype(float))
    facts["cos_row"], facts["sin_row"] = rows
    return facts


def rope_theta(cos_row: Any, sin_row: Any, head_dim: int) -> float:
    """RoPE's base from the caches' position-1 row: angle i = base ** (-2i / head_dim)."""
    angle = math.atan2(float(sin_row[1]), float(cos_row[1]))  # i = 1: the first angle below pi
    return float(f"{angle ** (-head_dim / 2):.5g}")
