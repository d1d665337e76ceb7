"""NPU readiness of a package: what Qualcomm's HTP, through ONNX Runtime's QNN execution provider,
would take of each graph, checked here without a device.

Each graph is checked for: operators against QNN's op builders (an op without a builder falls back to
the CPU), static shapes, QDQ around every compute op (HTP runs quantized tensors: an op whose float
inputs or outputs are not Q/DQ'd is "outside QDQ"), the dtypes of the QDQ tensors, and its size.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from edge_qwen.package import read_manifest

# The ONNX ops the QNN execution provider has a builder for: OpBuilderRegistrations in
# microsoft/onnxruntime onnxruntime/core/providers/qnn/builder/op_builder_factory.cc at commit
# 00cd7c6df0a66cd628a5ab7e682cb870134a27ee (ONNX Runtime 1.23 development). Default domain only:
# no com.microsoft op (GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNormalization) is there.
QNN_OP_BUILDERS = frozenset(
    """Add Asin Atan Mul Abs And Ceil Cos Sign Div Equal Exp Floor Greater GreaterOrEqual LeakyRelu Less
    LessOrEqual Log Max Min Neg Not Or Pow PRelu Relu Gelu Elu Round Where ScatterND Sigmoid Sin Sqrt
    Sub Sum Tanh Concat QuantizeLinear DequantizeLinear HardSwish HardSigmoid DepthToSpace SpaceToDepth
    GridSample LpNormalization ScatterElements Softmax LogSoftmax Cast ReduceMax ReduceMean ReduceMin
    ReduceProd ReduceSum ReduceL2 Conv ConvTranspose GlobalAveragePool AveragePool MaxPool
    GlobalMaxPool Reshape Flatten Squeeze Unsqueeze Gemm Gather GatherElements ArgMax ArgMin Clip Slice
    Split Resize Upsample TopK Tile InstanceNormalization BatchNormalization LayerNormalization
    RMSNormalization LRN Transpose Reciprocal Pad Expand Einsum MatMul Mean LSTM CumSum
    RandomUniformLike GatherND Mod ThresholdedRelu STFT Inverse FusedMatMul""".split()  # noqa: SIM905
)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Ops that only move or reshape data: QNN takes them at the dtype of their input, quantized or not.
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Concat", "Slice", "Split", "Squeeze", "Unsqueeze", "Gather"})
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}


@dataclass
class GraphReport:
    """What the checks found in one graph file."""

    file: str
    nodes: int = 0
    weight_bytes: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    unsupported: Counter[str] = field(default_factory=Counter)  # op (domain-qualified) -> count
    dynamic: list[str] = field(default_factory=list)  # "name: shape" of inputs/outputs not fixed
    qdq_types: Counter[str] = field(default_factory=Counter)  # "activation uint16" -> tensors
    outside_qdq: Counter[str] = field(default_factory=Counter)  # op -> nodes with float I/O not Q/DQ'd
    matmuls_without_qdq: int = 0

    @property
    def ready(self) -> bool:
        quantized = sum(self.qdq_types.values()) > 0
        return quantized and not (
            self.unsupported or self.dynamic or self.outside_qdq or self.matmuls_without_qdq
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "ready": self.ready,
            "nodes": self.nodes,
            "weight_bytes": self.weight_bytes,
            "ops": dict(self.ops),
            "unsupported_ops": dict(self.unsupported),
            "dynamic_shapes": self.dynamic,
            "qdq_tensors": dict(self.qdq_types),
            "ops_outside_qdq": dict(self.outside_qdq),
            "matmuls_without_qdq": self.matmuls_without_qdq,
        }


def check_graph(path: Path) -> GraphReport:
    """Run every check on one ONNX file (its weights are not read: sizes come from their records)."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    report = GraphReport(path.name, nodes=len(graph.node))
    report.weight_bytes = sum(_tensor_bytes(t) for t in graph.initializer)
    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        report.ops[op] += 1
        if op not in QNN_OP_BUILDERS:
            report.unsupported[op] += 1
    for value in [*graph.input, *graph.output]:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or any(not d.HasField("dim_value") for d in dims):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            report.dynamic.append(f"{value.name}: {shape}")
    _check_qdq(model, initializers, report)
    return report


def _check_qdq(
    model: onnx.ModelProto, initializers: dict[str, onnx.TensorProto], report: GraphReport
) -> None:
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    float_tensors = _float_tensors(model, initializers)
    for node in graph.node:
        if node.op_type in QDQ_OPS:
            if node.op_type == "QuantizeLinear" or node.input[0] in initializers:
                kind = "weight" if node.input[0] in initializers else "activation"
                zero_point = initializers.get(node.input[2]) if len(node.input) > 2 else None
                dtype = (
                    onnx.helper.tensor_dtype_to_np_dtype(zero_point.data_type).name if zero_point else "uint8"
                )
                per_channel = zero_point is not None and len(zero_point.dims) > 0 and zero_point.dims[0] > 1
                blocked = any(a.name == "block_size" and a.i > 0 for a in node.attribute)
                if kind == "weight" and any(c.op_type in QDQ_OPS for c in consumers.get(node.output[0], [])):
                    kind = "LPBQ block scales"
                layout = " block-wise (LPBQ)" if blocked else " per-channel" if per_channel else ""
                report.qdq_types[f"{kind} {dtype}{layout}"] += 1
            continue
        if node.op_type in LAYOUT_OPS:
            continue
        inputs = [i for i in node.input if i and i in float_tensors and i not in initializers]
        outputs = [o for o in node.output if o in float_tensors]
        fed = all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in inputs)
        taken = all(c.op_type == "QuantizeLinear" for o in outputs for c in consumers.get(o, [])) and all(
            o in consumers for o in outputs
        )
        if not (fed and taken):
            report.outside_qdq[node.op_type] += 1
            if node.op_type == "MatMul":
                report.matmuls_without_qdq += 1


def _float_tensors(model: onnx.ModelProto, initializers: dict[str, onnx.TensorProto]) -> set[str]:
    """Names of the float tensors of a graph (after shape inference, which needs no weights)."""
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    values = [*graph.input, *graph.output, *graph.value_info, *inferred.graph.value_info]
    names = {v.name for v in values if v.type.tensor_type.elem_type in FLOAT_TYPES}
    names |= {t.name for t in initializers.values() if t.data_type in FLOAT_TYPES}
    return names


def _tensor_bytes(t: onnx.TensorProto) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(t.raw_data)


def package_graphs(root: Path) -> dict[str, list[Path]]:
    """The graphs an NPU would run, by part; for a CPU package, its one graph."""
    manifest = read_manifest(root)
    npu = manifest.raw.get("npu")
    if manifest.raw.get("kind") != "npu" or not npu:
        return {"model": [root / "model.onnx"]}
    parts = [*npu["parts"], npu["head"]]
    return {p["name"]: [root / p["prefill"], root / p["decode"]] for p in parts}


def mobile_usability(path: Path) -> list[str]:
    """What onnxruntime's check_onnx_model_mobile_usability says of a graph: its NNAPI and CoreML lines."""
    cmd = [sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln.split(":", 1)[-1].strip() for ln in (done.stdout + done.stderr).splitlines()]
    keep = ("NNAPI", "CoreML", "partition", "supported", "dynamic", "recommended", "CPU EP")
    return [ln for ln in lines if ln and any(k in ln for k in keep)] or [
        f"(the tool printed nothing; exit {done.returncode})"
    ]
