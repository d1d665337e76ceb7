"""QDQ quantization of the NPU parts with ONNX Runtime's own tooling, for QNN's HTP backend.

Each part's float graph (at the prefill length) goes through `qnn_preprocess_model` and
`quantize` with the config `get_qnn_qdq_config` makes for QNN: activations uint16 with ranges
calibrated (MinMax) on a short text, weights per output channel, int8 or int4, symmetric. The
quantized graph is then written at both static lengths over one weights file (npu_graph.fix_shapes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_qwen.config import QwenConfig
from edge_qwen.export.npu_graph import fix_shapes
from edge_qwen.export.recipe import is_sensitive
from edge_qwen.npu import NpuPart
from edge_qwen.quant.lpbq import gptq_lpbq, quantize_lpbq

log = logging.getLogger(__name__)

WEIGHT_BITS = {"w8a16": 8, "w4a16": 4, "fp32": 32}
LPBQ_BLOCKS = (64, 32, 16)  # input rows per block scale of a weight: the first that divides them
# Each NPU weight's input statistics (X^T X) in export/calibrate.py's names: q, k and v share an input.
STATS_NAMES = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
}  # fmt: skip


def stats_name(weight: str) -> str:
    """`model.layers.3.self_attn.k_proj.weight` -> `model.layers.3.self_attn.qkv_proj`; lm_head too."""
    path, _, kind = weight.removesuffix(".weight").rpartition(".")
    return f"{path}.{STATS_NAMES[kind]}" if kind in STATS_NAMES else weight.removesuffix(".weight")


def weight_bits(weight: str, precision: str, num_layers: int, int8_edges: bool) -> int:
    """The bits of one weight: the precision's, or 8 for qkv and down_proj of the first and last sixth
    of the layers (the CPU INT4 default's sensitive tensors, export/recipe.py) when `int8_edges`."""
    bits = WEIGHT_BITS[precision]
    parts = weight.split(".")
    if bits == 4 and int8_edges and len(parts) > 4 and parts[1] == "layers":
        kind = STATS_NAMES.get(parts[4])
        if kind and is_sensitive(kind, int(parts[2]), num_layers):
            return 8
    return bits


class FeedsReader:
    """onnxruntime.quantization's CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._iter: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)


def quantize_part(
    fp32_model: Path, out_dir: Path, part: NpuPart, feeds: list[dict[str, np.ndarray]],
    bits_of: Callable[[str], int], cfg: QwenConfig, prefill_len: int, context: int,
    stats: Mapping[str, np.ndarray] | None = None,
) -> None:  # fmt: skip
    """Quantize one part (its float graph at the prefill length) and write both lengths into out_dir.

    `bits_of` gives each weight's bits; with `stats` (input X^T X per weight, export/calibrate.py) the
    weights are rounded by GPTQ onto their LPBQ grid, else to nearest."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    class Reader(FeedsReader, CalibrationDataReader):
        pass

    source = fp32_model
    preprocessed = out_dir / f".{part.name}.preprocessed.onnx"
    if qnn_preprocess_model(
        str(fp32_model), str(preprocessed), save_as_external_data=True,
        all_tensors_to_one_file=True, external_data_location=f"{preprocessed.name}.data",
    ):  # fmt: skip
        source = preprocessed  # it fused something (Gelu, LpNormalization): quantize that graph
    # QNN's config gives MatMul weights one scale per tensor (its HTP MatMul takes no per-channel
    # weights): quantized so here, they are then re-encoded block-wise (LPBQ) from the float weights.
    config = get_qnn_qdq_config(
        str(source), Reader(feeds), activation_type=QuantType.QUInt16, weight_type=QuantType.QInt8
    )
    config.use_external_data_format = True
    quantized = out_dir / f".{part.name}.qdq.onnx"
    quantize(str(source), str(quantized), config)
    model = onnx.load(str(quantized))
    floats = onnx.load(str(fp32_model), load_external_data=False)
    originals = {t.name: t for t in floats.graph.initializer}

    def float_weight(name: str) -> np.ndarray:
        return numpy_helper.to_array(originals[name], base_dir=str(fp32_model.parent))

    lpbq_weights(model, float_weight, bits_of, stats)
    data = f"{part.name}.onnx.data"
    prefill = fix_shapes(model, cfg, prefill_len, context)
    onnx.save_model(
        prefill, str(out_dir / part.prefill), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data, size_threshold=1024,
    )  # fmt: skip
    del model, prefill
    decode = fix_shapes(onnx.load(str(out_dir / part.prefill), load_external_data=False), cfg, 1, context)
    (out_dir / part.decode).write_bytes(decode.SerializeToString())
    (out_dir / data).chmod(0o644)  # onnx writes it private; a package is shareable
    for leftover in out_dir.glob(f".{part.name}.*"):
        leftover.unlink()


def lpbq_weights(
    model: onnx.ModelProto, float_weight: Callable[[str], np.ndarray], bits_of: Callable[[str], int],
    stats: Mapping[str, np.ndarray] | None = None,
) -> None:  # fmt: skip
    """Re-encode the weight of every MatMul block-wise, in the pattern QNN's LPBQ MatMul fusion takes.

    #   W (int8 per tensor) -> DequantizeLinear -> MatMul        becomes
    #   block scales (uint8), channel scales -> DequantizeLinear(axis 1) -> block scales (float)
    #   W (int4/int8) , block scales -> DequantizeLinear(axis 0, block_size) -> MatMul
    (microsoft/onnxruntime onnxruntime/core/providers/qnn/builder/qnn_node_group/lpbqmatmul_fusion.cc)
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {t.name: t for t in graph.initializer}
    for matmul in [n for n in graph.node if n.op_type == "MatMul"]:
        dequantize = producers.get(matmul.input[1])
        if (
            dequantize is None
            or dequantize.op_type != "DequantizeLinear"
            or dequantize.input[0] not in initializers
        ):
            continue
        name = dequantize.input[0].removesuffix("_quantized")
        weight = float_weight(name)
        block = next((b for b in LPBQ_BLOCKS if weight.shape[0] % b == 0), None)
        if block is None:
            raise ValueError(f"{name}: {weight.shape[0]} inputs divide into no block size of {LPBQ_BLOCKS}")
        bits = bits_of(name)
        dtype = ml_dtypes.int4 if bits == 4 else np.int8
        if stats is None:
            encoded = quantize_lpbq(weight, block, bits)
        else:
            encoded = gptq_lpbq(weight, stats[stats_name(name)], block, bits)
        for old in dequantize.input:
            graph.initializer.remove(initializers.pop(old))
        blocks, channels = encoded.block_scales.shape
        new = {
            f"{name}_lpbq": encoded.q.astype(dtype),
            f"{name}_lpbq_zero_point": np.zeros((blocks, channels), dtype),
            f"{name}_block_scales": encoded.block_scales,
            f"{name}_channel_scales": encoded.channel_scales,
            f"{name}_block_scales_zero_point": np.zeros(channels, np.uint8),
        }
        graph.initializer.extend(numpy_helper.from_array(array, key) for key, array in new.items())
        scales = helper.make_node(
            "DequantizeLinear",
            [f"{name}_block_scales", f"{name}_channel_scales", f"{name}_block_scales_zero_point"],
            [f"{name}_block_scales_float"],
            name=f"{name}_block_scales_DequantizeLinear",
            axis=1,
        )
        graph.node.insert(list(graph.node).index(dequantize), scales)
        del dequantize.input[:]
        dequantize.input.extend([f"{name}_lpbq", f"{name}_block_scales_float", f"{name}_lpbq_zero_point"])
        del dequantize.attribute[:]
        dequantize.attribute.extend(
            [helper.make_attribute("axis", 0), helper.make_attribute("block_size", block)]
        )
