"""INT8/INT4 exports of tiny random checkpoints: closeness to fp32, recipes, tied sharing, eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import edge_qwen
from edge_qwen.apps.evaluate import evaluate
from edge_qwen.export.options import ExportOptions
from edge_qwen.quant.metrics import QualityAccumulator, log_softmax
from edge_qwen.sampling import make_sampler
from tests.conftest import TinyModel, export_tiny

# Measured on these tiny models (max |logit - fp32 logit|): int8 <= 0.0084, int4 <= 0.063 across recipes.
INT8_ATOL = 0.02
INT4_ATOL = 0.15
INT4_MAX_KLD = 1e-3  # measured <= 1.5e-4


def closeness(pkg: Path, ref: Path) -> tuple[float, float]:
    """Max |logit difference| and mean KLD against the fp32 package over 8 prompt lengths."""
    m, r = edge_qwen.load(pkg), edge_qwen.load(ref)
    ids = np.random.default_rng(0).integers(3, 500, 40).tolist()
    acc, maxdiff = QualityAccumulator(), 0.0
    for n in range(8, 40, 4):
        a, b = r.forward(ids[:n], r.new_cache()), m.forward(ids[:n], m.new_cache())
        maxdiff = max(maxdiff, float(np.abs(a - b).max()))
        acc.add(log_softmax(a[None]), b[None], np.array([ids[n]]))
    return maxdiff, acc.report().mean_kld


def test_int8_keeps_logits_and_greedy_output(tiny: TinyModel, tiny_fp32: Path, tmp_path: Path) -> None:
    pkg = export_tiny(tiny.hf_dir, tmp_path / "int8", precision="int8")
    maxdiff, _ = closeness(pkg, tiny_fp32)
    assert maxdiff < INT8_ATOL
    # Along fp32's greedy output, int8 picks the same token wherever fp32's choice is clear, that is,
    # by more than twice the error bound (a random tiny model has near-ties that any rounding flips).
    prompt = np.random.default_rng(0).integers(3, 500, 8).tolist()
    ref, ours = edge_qwen.load(tiny_fp32), edge_qwen.load(pkg)
    greedy = list(ref.generate_tokens(prompt, make_sampler(), 24))
    ref_cache, our_cache = ref.new_cache(), ours.new_cache()
    fed, decisive = prompt, 0
    for token in greedy:
        a, b = ref.forward(fed, ref_cache), ours.forward(fed, our_cache)
        assert int(a.argmax()) == token
        top2 = np.sort(a)[-2:]
        if top2[1] - top2[0] > 2 * INT8_ATOL:
            decisive += 1
            assert int(b.argmax()) == token
        fed = [token]
    assert decisive >= len(greedy) // 2


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"algo": "rtn", "block_size": 128, "symmetric": True},
        {"algo": "imatrix", "block_size": 64},
        {"algo": "gptq", "lm_head": "int4"},
        {"algo": "gptq", "symmetric": True, "block_size": 128},
        {"embeddings": "fp16", "lm_head": "int4", "mixed": False},
    ],
    ids=["default", "rtn-b128-sym", "imatrix-b64", "gptq-head4", "gptq-sym-b128", "fp16-embed-int4-head"],
)
def test_int4_recipes_stay_close(tiny: TinyModel, tiny_fp32: Path, tmp_path: Path, options: dict) -> None:
    pkg = export_tiny(tiny.hf_dir, tmp_path / "int4", precision="int4", **options)
    maxdiff, kld = closeness(pkg, tiny_fp32)
    assert maxdiff < INT4_ATOL and kld < INT4_MAX_KLD
    manifest = json.loads((pkg / "edge_qwen.json").read_text())
    recipe = manifest["quantization"]["recipe"]
    opts = ExportOptions(precision="int4", **options)
    assert recipe["body"] == opts.recipe.body.describe()
    assert (manifest["quantization"]["calibration"] is not None) == (
        options.get("algo") in ("imatrix", "gptq")
    )


def initializer_locations(pkg: Path) -> dict[str, tuple[str, str]]:
    model = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if ext:
            out[t.name] = (ext["offset"], ext["length"])
    return out


def test_tied_vocabulary_matrix_is_stored_once(tiny: TinyModel, tmp_path: Path) -> None:
    pkg = export_tiny(tiny.hf_dir, tmp_path / "int4", precision="int4", lm_head="int4", block_size=32)
    model = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.name == "/lm_head/MatMulNBits")
    where = initializer_locations(pkg)
    if tiny.tied:
        assert where[gather.input[0]] == where[head.input[1]]  # the same bytes, two shapes
        assert where[gather.input[2]] == where[head.input[2]]
    else:
        assert where[gather.input[0]] != where[head.input[1]]


@pytest.mark.parametrize(
    "scheme", [{"symmetric": False}, {"symmetric": True, "block_size": 32}], ids=["asym", "sym"]
)
def test_lm_head_in_parts_gives_the_same_logits(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: dict
) -> None:
    # The real vocabulary is split in 8 parts (memory at load); here 504/512 rows in parts of <= 192.
    options = {"precision": "int4", "lm_head": "int4", **scheme}
    whole = export_tiny(tiny.hf_dir, tmp_path / "whole", **options)
    monkeypatch.setattr("edge_qwen.export.linear.LM_HEAD_ROWS", 192)
    parts = export_tiny(tiny.hf_dir, tmp_path / "parts", **options)
    model = onnx.load(str(parts / "model.onnx"), load_external_data=False)
    heads = [n for n in model.graph.node if n.name.startswith("/lm_head/part")]
    assert len(heads) == 3 and all(n.op_type == "MatMulNBits" for n in heads)
    vocab = json.loads((tiny.hf_dir / "config.json").read_text())["vocab_size"]
    assert sum(next(a.i for a in n.attribute if a.name == "N") for n in heads) == vocab
    if tiny.tied:  # each part sees its rows of the embedding's bytes: stored once
        assert (parts / "model.onnx.data").stat().st_size == (whole / "model.onnx.data").stat().st_size
        gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
        table = int(initializer_locations(parts)[gather.input[0]][0])
        starts = sorted(int(initializer_locations(parts)[n.input[1]][0]) for n in heads)
        assert starts[0] == table and starts == sorted(set(starts))
    ids = np.random.default_rng(3).integers(3, 500, 24).tolist()
    a, b = edge_qwen.load(whole), edge_qwen.load(parts)
    np.testing.assert_array_equal(a.forward(ids, a.new_cache()), b.forward(ids, b.new_cache()))


def test_per_tensor_block_sizes_reach_the_graph(tiny: TinyModel, tiny_fp32: Path, tmp_path: Path) -> None:
    blocks = (("gate_up_proj", 64), ("lm_head", 64))
    options = {"algo": "gptq", "lm_head": "int4", "block_size": 32, "block_sizes": blocks}
    pkg = export_tiny(tiny.hf_dir, tmp_path / "int4", precision="int4", **options)
    model = onnx.load(str(pkg / "model.onnx"), load_external_data=False)

    def block(node: onnx.NodeProto) -> int:
        return next(a.i for a in node.attribute if a.name == "block_size")

    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    wide = [n for n in nbits if "gate_up_proj" in n.name or n.name.startswith("/lm_head/")]
    assert wide and all(block(n) == 64 for n in wide)
    assert all(block(n) == 32 for n in nbits if n not in wide)
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    assert block(gather) == (64 if tiny.tied else 32)  # a tied table is lm_head's matrix
    recipe = json.loads((pkg / "edge_qwen.json").read_text())["quantization"]["recipe"]
    assert recipe["gate_up_proj"] == "int4 b64 asym gptq" and recipe["lm_head"] == "int4 b64 asym gptq"
    maxdiff, kld = closeness(pkg, tiny_fp32)
    assert maxdiff < INT4_ATOL and kld < INT4_MAX_KLD


def test_int4_is_smaller_than_int8_and_fp32(tiny: TinyModel, tiny_fp32: Path, tmp_path: Path) -> None:
    sizes = {
        p: (export_tiny(tiny.hf_dir, tmp_path / p, precision=p) / "model.onnx.data").stat().st_size
        for p in ("int8", "int4")
    }
    assert sizes["int4"] < sizes["int8"] < (tiny_fp32 / "model.onnx.data").stat().st_size


def test_eval_of_identical_packages_is_exact(tiny_fp32: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris. def f(x):\n    return x * 2\n" * 40)
    report = evaluate(tiny_fp32, tiny_fp32, str(text), ctx=64, max_chunks=4, show_progress=False)
    assert report["mean_kld"] == 0.0 and report["p99_kld"] == 0.0
    assert report["top1_agreement"] == 1.0 and report["ppl_ratio"] == 1.0
    assert report["tokens_scored"] == report["chunks"] * (64 - 1 - 32)


def test_eval_sees_quantization_error(tiny: TinyModel, tiny_fp32: Path, tmp_path: Path) -> None:
    pkg = export_tiny(tiny.hf_dir, tmp_path / "int4", precision="int4", algo="rtn", mixed=False)
    report = evaluate(pkg, tiny_fp32, "prose", ctx=64, max_chunks=4, show_progress=False)
    assert 0.0 < report["mean_kld"] < INT4_MAX_KLD
    assert report["text"]["sources"] and report["text"]["python"]


def test_eval_cli_json(tiny_fp32: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "edge_qwen.apps.cli",
        "eval",
        str(tiny_fp32),
        "--reference",
        str(tiny_fp32),
        "--text",
        "code",
        "--ctx",
        "64",
        "--chunks",
        "2",
        "--json",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mean_kld"] == 0.0 and report["tokens_scored"] == 2 * 31


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"precision": "int4", "block_size": 48}, "block_size must be one of (32, 64, 128), got 48"),
        ({"precision": "int4", "algo": "awq"}, "algo must be one of rtn, kquant, imatrix, gptq, got 'awq'"),
        ({"precision": "int3"}, "precision must be one of fp32, fp16, int8, int4, got 'int3'"),
        ({"precision": "int4", "embeddings": "int2"}, "int2"),
        ({"precision": "int4", "block_sizes": (("mlp", 64),)}, "or lm_head, got .'mlp'."),
        ({"precision": "int4", "block_sizes": (("down_proj", 48),)}, "got 48"),
        ({"precision": "int4", "lm_head": "fp16", "block_sizes": (("lm_head", 64),)}, "lm_head is fp16"),
    ],
)
def test_bad_quantization_options_fail_before_any_work(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ExportOptions(**options)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--block-size", "48"], "48"),
        (["--block-size-for", "down_proj=48"], "down_proj: block_size must be one of"),
        (["--block-size-for", "o_proj"], "WEIGHT=SIZE"),
    ],
)
def test_bad_block_size_on_the_command_line(
    tiny: TinyModel, tmp_path: Path, args: list[str], needle: str
) -> None:
    cmd = [sys.executable, "-m", "edge_qwen.apps.cli", "export", str(tiny.hf_dir), str(tmp_path / "out")]
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and needle in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_gptq_falls_back_to_imatrix_when_memory_is_short(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from edge_qwen.export import writer

    monkeypatch.setattr(writer, "available_memory", lambda: 1000)  # bytes: far too little for X^T X
    with caplog.at_level("WARNING"):
        pkg = export_tiny(tiny.hf_dir, tmp_path / "int4", precision="int4", algo="gptq")
    recipe = json.loads((pkg / "edge_qwen.json").read_text())["quantization"]["recipe"]
    assert "imatrix" in recipe["body"] and "gptq" not in recipe["body"]
    assert sum("quantizing with imatrix instead" in r.message for r in caplog.records) == 1
