"""Which weights of a W4A16 NPU package stay int8, and how its int4 weights are rounded (GPTQ onto the
LPBQ grid, or to nearest), on the tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge_qwen.export.npu_package import NpuOptions
from edge_qwen.export.npu_quant import stats_name, weight_bits
from tests.conftest import TinyModel
from tests.test_npu import export_npu


def lpbq_weights(package: Path) -> dict[str, np.ndarray]:
    """Every LPBQ weight of the package's parts, by the name of the float weight it encodes."""
    out = {}
    for graph in sorted(package.glob("*.prefill.onnx")):
        model = onnx.load(str(graph))
        for t in model.graph.initializer:
            if t.name.endswith(".weight_lpbq"):
                out[t.name.removesuffix("_lpbq")] = numpy_helper.to_array(t)
    return out


def test_the_edge_layers_qkv_and_down_proj_are_int8_in_w4a16() -> None:
    assert weight_bits("model.layers.0.self_attn.k_proj.weight", "w4a16", 24, True) == 8
    assert weight_bits("model.layers.23.mlp.down_proj.weight", "w4a16", 24, True) == 8
    assert weight_bits("model.layers.20.self_attn.v_proj.weight", "w4a16", 24, True) == 8
    assert weight_bits("model.layers.4.self_attn.q_proj.weight", "w4a16", 24, True) == 4
    assert weight_bits("model.layers.0.self_attn.o_proj.weight", "w4a16", 24, True) == 4
    assert weight_bits("model.layers.0.mlp.gate_proj.weight", "w4a16", 24, True) == 4
    assert weight_bits("lm_head.weight", "w4a16", 24, True) == 4
    assert weight_bits("model.layers.0.self_attn.k_proj.weight", "w4a16", 24, False) == 4
    assert weight_bits("model.layers.5.mlp.up_proj.weight", "w8a16", 24, True) == 8


def test_each_npu_weight_finds_its_calibration_statistics() -> None:
    assert stats_name("model.layers.3.self_attn.v_proj.weight") == "model.layers.3.self_attn.qkv_proj"
    assert stats_name("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.gate_up_proj"
    assert stats_name("model.layers.3.mlp.down_proj.weight") == "model.layers.3.mlp.down_proj"
    assert stats_name("lm_head.weight") == "lm_head"


def test_w4a16_package_holds_int8_edges_and_gptq_rounding(tiny: TinyModel) -> None:
    gptq = lpbq_weights(export_npu(tiny, "npu-w4a16", precision="w4a16"))
    rtn = lpbq_weights(export_npu(tiny, "npu-w4a16-rtn", precision="w4a16", algo="rtn", int8_edges=False))
    # The tiny checkpoints have 2 layers: both are edge layers
    for name, q in gptq.items():
        sensitive = any(f".{kind}." in name for kind in ("q_proj", "k_proj", "v_proj", "down_proj"))
        assert q.dtype == (np.int8 if sensitive else ml_dtypes.int4), name
        assert rtn[name].dtype == ml_dtypes.int4, name
    shared = [n for n in gptq if gptq[n].dtype == rtn[n].dtype]
    assert shared and any(not np.array_equal(gptq[n], rtn[n]) for n in shared)
    manifest = json.loads((export_npu(tiny, "npu-w4a16", precision="w4a16") / "edge_qwen.json").read_text())
    quantization = manifest["quantization"]
    assert "GPTQ" in quantization["weights"] and "int8 qkv/down_proj" in quantization["weights"]
    assert quantization["calibration"]["weights"]["name"] == "calibration"


def test_an_unknown_rounding_is_refused() -> None:
    with pytest.raises(ValueError, match="NPU algo must be one of gptq, rtn"):
        NpuOptions(precision="w4a16", algo="awq")
