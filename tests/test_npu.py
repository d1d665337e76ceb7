"""NPU packages on the tiny checkpoints: structure (what QNN's HTP takes), numerics against the fp32
CPU package, prefill in steps, and the runtime's API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import edge_qwen
from edge_qwen.apps.cli import cli
from edge_qwen.apps.npu_check import QNN_OP_BUILDERS, check_graph
from edge_qwen.errors import ContextFullError
from edge_qwen.export.npu_package import NpuOptions, write_npu_package
from edge_qwen.export.readers import read_checkpoint
from edge_qwen.npu import NpuModel
from edge_qwen.quant.metrics import log_softmax
from tests.conftest import TinyModel

PREFILL, CONTEXT = 8, 64
# Bounds on the tiny checkpoints over TEXT, each a few times what was measured (tied, untied):
# fp32 parts within 4e-5 of the fused graph's logits; mean KLD W8A16 2.2e-5, 4.8e-6; W4A16 3.2e-4, 3.1e-4.
# The real 0.5B's bounds are in test_npu_real.py.
FP32_ATOL = 1e-4
MAX_KLD = {"w8a16": 1e-4, "w4a16": 1e-3}
TEXT = "The capital of France is Paris. def f(x): return x * 2 巴黎是法国的首都。 The capital of"


def export_npu(tiny: TinyModel, name: str, **options: object) -> Path:
    out = tiny.hf_dir.parent / name
    if not out.exists():
        # GPTQ (W4A16) calibrates on the built-in text: the suite's mix would be downloaded
        defaults = {"prefill_len": PREFILL, "context": CONTEXT, "part_bytes": 1, "calibration": "builtin"}
        opts = NpuOptions(**{**defaults, **options})  # type: ignore[arg-type]
        write_npu_package(read_checkpoint(tiny.hf_dir), out, opts, show_progress=False)
    return out


@pytest.fixture(scope="module")
def npu_fp32(tiny: TinyModel) -> Path:
    return export_npu(tiny, "npu-fp32", precision="fp32")


@pytest.fixture(scope="module")
def npu_w8(tiny: TinyModel) -> Path:
    return export_npu(tiny, "npu-w8a16", precision="w8a16")


def reference_logits(package: Path, ids: list[int]) -> np.ndarray:
    """Every position's logits from the fused CPU package (one run, from an empty cache)."""
    model = edge_qwen.load(package)
    cfg = model.config
    empty = np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
    feeds = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)}
    names = {i.name for i in model.session.get_inputs()}
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(len(ids))[None]
    feeds |= {
        f"past_key_values.{i}.{kv}": empty for i in range(cfg.num_hidden_layers) for kv in ("key", "value")
    }
    return model.session.run(["logits"], feeds | {"logits_start": np.array([0])})[0][0]


def mean_kld(reference: np.ndarray, logits: np.ndarray) -> float:
    ref, got = log_softmax(reference), log_softmax(logits)
    return float((np.exp(ref) * (ref - got)).sum(-1).mean())


# -- structure ------------------------------------------------------------------------------------


def npu_graphs(package: Path) -> list[Path]:
    return sorted(p for p in package.glob("*.onnx") if p.name != "embeddings.onnx")


def test_npu_parts_use_standard_ops_static_shapes_and_qdq_around_every_matmul(npu_w8: Path) -> None:
    graphs = npu_graphs(npu_w8)
    assert len(graphs) == 2 * 3  # two layer parts (one layer each, by the tiny part bound) and the head
    for path in graphs:
        model = onnx.load(str(path), load_external_data=False)
        nodes = model.graph.node
        assert {n.domain for n in nodes} <= {""}, path.name
        assert {n.op_type for n in nodes} <= QNN_OP_BUILDERS, path.name
        for value in [*model.graph.input, *model.graph.output]:
            dims = value.type.tensor_type.shape.dim
            assert dims and all(d.HasField("dim_value") for d in dims), f"{path.name}: {value.name}"
        producers = {o: n.op_type for n in nodes for o in n.output}
        consumers: dict[str, list[str]] = {}
        for n in nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n.op_type)
        matmuls = [n for n in nodes if n.op_type == "MatMul"]
        assert matmuls
        for n in matmuls:
            assert [producers.get(i) for i in n.input] == ["DequantizeLinear"] * 2, n.name
            assert consumers[n.output[0]] == ["QuantizeLinear"], n.name


def test_decode_and_prefill_graphs_share_one_weights_file(npu_w8: Path) -> None:
    for part in ("part0", "part1", "head"):
        locations = set()
        for kind in ("prefill", "decode"):
            model = onnx.load(str(npu_w8 / f"{part}.{kind}.onnx"), load_external_data=False)
            locations |= {
                e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"
            }
        assert locations == {f"{part}.onnx.data"}


def test_check_calls_the_npu_package_ready_and_the_cpu_package_not(npu_w8: Path, tiny_fp32: Path) -> None:
    runner = CliRunner()
    ready = runner.invoke(cli, ["check", str(npu_w8), "--target", "npu", "--no-mobile"])
    assert ready.exit_code == 0, ready.output
    assert "verdict     READY" in ready.output
    cpu = runner.invoke(cli, ["check", str(tiny_fp32), "--target", "npu", "--no-mobile"])
    assert cpu.exit_code == 1
    assert "NOT READY" in cpu.output
    assert "a CPU package" in cpu.output
    assert "GroupQueryAttention" in cpu.output
    assert "dynamic shape" in cpu.output


def test_check_finds_an_op_outside_qdq_and_a_float_part(npu_fp32: Path, npu_w8: Path, tmp_path: Path) -> None:
    assert not check_graph(npu_fp32 / "part0.decode.onnx").ready  # not quantized
    model = onnx.load(str(npu_w8 / "head.decode.onnx"), load_external_data=False)
    quantize = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and "logits" in n.input[0])
    dequantize = next(n for n in model.graph.node if n.input and n.input[0] == quantize.output[0])
    model.graph.node.remove(quantize)
    dequantize.input[0] = quantize.input[0]  # the float lm_head output straight into a DequantizeLinear
    broken = tmp_path / "head.onnx"
    broken.write_bytes(model.SerializeToString())
    report = check_graph(broken)
    assert not report.ready
    assert report.outside_qdq["MatMul"] == 1


# -- numerics -------------------------------------------------------------------------------------


def test_fp32_npu_package_matches_the_fused_cpu_graph(npu_fp32: Path, tiny_fp32: Path) -> None:
    model = edge_qwen.load(npu_fp32)
    assert isinstance(model, NpuModel)
    ids = model.tokenizer.encode(TEXT).ids
    assert len(ids) > 2 * PREFILL  # three prefill steps, the last padded
    np.testing.assert_allclose(model.logits(ids), reference_logits(tiny_fp32, ids), atol=FP32_ATOL)


@pytest.mark.parametrize("precision", ["w8a16", "w4a16"])
def test_quantized_packages_stay_close_to_fp32(precision: str, tiny: TinyModel, tiny_fp32: Path) -> None:
    model = edge_qwen.load(export_npu(tiny, f"npu-{precision}", precision=precision))
    ids = model.tokenizer.encode(TEXT).ids
    assert mean_kld(reference_logits(tiny_fp32, ids), model.logits(ids)) <= MAX_KLD[precision]


def test_prefill_in_steps_equals_one_long_prefill_and_decode_steps(npu_fp32: Path, tiny: TinyModel) -> None:
    stepped = edge_qwen.load(npu_fp32)
    long = edge_qwen.load(export_npu(tiny, "npu-fp32-long", precision="fp32", prefill_len=CONTEXT // 2))
    ids = stepped.tokenizer.encode(TEXT).ids
    whole = long.logits(ids)
    np.testing.assert_allclose(stepped.logits(ids), whole, atol=1e-5)
    cache = stepped.new_cache()
    stepped.forward(ids[:PREFILL], cache)
    for n, token in enumerate(ids[PREFILL:], start=PREFILL):  # the rest one token at a time (AR-1)
        np.testing.assert_allclose(stepped.forward([token], cache), whole[n], atol=1e-5)


# -- the runtime's API ----------------------------------------------------------------------------


def test_greedy_generation_matches_the_cpu_package(npu_fp32: Path, tiny_fp32: Path) -> None:
    npu, cpu = edge_qwen.load(npu_fp32), edge_qwen.load(tiny_fp32)
    prompt = "The capital of France"
    assert npu.generate(prompt, max_tokens=12) == cpu.generate(prompt, max_tokens=12)
    pieces = list(npu.stream(prompt, max_tokens=12))
    assert "".join(p.text for p in pieces) == cpu.generate(prompt, max_tokens=12)
    assert pieces[-1].finish_reason in ("stop", "length")


def test_chat_reuses_the_window_and_follows_the_overflow_policy(npu_fp32: Path) -> None:
    model = edge_qwen.load(npu_fp32)
    chat = model.chat(max_tokens=4)
    chat.send("The capital of France")
    chat.send("Paris")
    stats = chat.last_stats
    assert stats is not None and stats.reused_tokens > 0
    assert stats.prefilled_tokens < stats.prompt_tokens
    strict = model.chat(max_tokens=4)
    with pytest.raises(ContextFullError):
        for _ in range(20):
            strict.send("The capital of France is Paris.")
    rolling = model.chat(max_tokens=4, overflow="truncate-oldest")
    for _ in range(20):
        rolling.send("The capital of France is Paris.")
    assert sum(s.dropped_messages for s in rolling.stats) > 0
    assert all(s.prompt_tokens + 4 <= CONTEXT for s in rolling.stats)


def test_qnn_provider_falls_back_to_the_cpu_where_it_is_missing(
    npu_w8: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if "QNNExecutionProvider" in edge_qwen.available_providers():
        pytest.skip("this onnxruntime has the QNN provider")
    model = edge_qwen.load(npu_w8, provider="qnn")
    assert "running on the CPU" in caplog.text
    assert model.providers == ["CPUExecutionProvider"]
    assert model.generate("The capital of France", max_tokens=3)


def test_export_cli_refuses_what_an_npu_export_cannot_take(tiny: TinyModel, tmp_path: Path) -> None:
    runner = CliRunner()
    fp16 = runner.invoke(
        cli, ["export", str(tiny.hf_dir), str(tmp_path / "x"), "--target", "npu", "--precision", "fp16"]
    )
    assert fp16.exit_code == 2 and "int8 (W8A16), int4 (W4A16) or fp32" in fp16.output
    cpu = runner.invoke(cli, ["export", str(tiny.hf_dir), str(tmp_path / "y"), "--prefill-len", "64"])
    assert cpu.exit_code == 2 and "--target npu" in cpu.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
