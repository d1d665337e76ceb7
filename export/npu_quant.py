"""QDQ quantization of the NPU parts with ONNX Runtime's own tooling, for QNN's HTP backend.

Each part's float graph (at the prefill length) goes through `qnn_preprocess_model` and
`quantize` with the config `get_qnn_qdq_config` makes for QNN: activations uint16 with ranges
calibrated (MinMax) on a short text, weights per output channel, int8 or int4, symmetric. The
quantized graph is then written at both static lengths over one weights file (npu_graph.fix_shapes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from edge_qwen.config import QwenConfig
from edge_qwen.export.npu_graph import fix_shapes
from edge_qwen.npu import NpuPart

log = logging.getLogger(__name__)

WEIGHT_BITS = {"w8a16": 8, "w4a16": 4, "fp32": 32}


class FeedsReader:
    """onnxruntime.quantization's CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._iter: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)


def quantize_part(
    fp32_model: Path, out_dir: Path, part: NpuPart, feeds: list[dict[str, np.ndarray]], weights: str,
    cfg: QwenConfig, prefill_len: int, context: int,
) -> None:  # fmt: skip
    """Quantize one part (its float graph at the prefill length) and write both lengths into out_dir."""
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
    weight_type = QuantType.QInt8 if weights == "w8a16" else QuantType.QInt4
    config = get_qnn_qdq_config(
        str(source),
        Reader(feeds),
        activation_type=QuantType.QUInt16,
        weight_type=weight_type,
        per_channel=True,
    )
    config.use_external_data_format = True
    quantized = out_dir / f".{part.name}.qdq.onnx"
    quantize(str(source), str(quantized), config)
    model = onnx.load(str(quantized), load_external_data=False)
    data = f"{part.name}.onnx.data"
    (out_dir / f"{quantized.name}.data").rename(out_dir / data)
    (out_dir / data).chmod(0o644)  # the quantizer writes it private; a package is shareable
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data
    for seq, name in ((prefill_len, part.prefill), (1, part.decode)):
        (out_dir / name).write_bytes(fix_shapes(model, cfg, seq, context).SerializeToString())
    quantized.unlink()
    for leftover in out_dir.glob(f".{part.name}.preprocessed.onnx*"):
        leftover.unlink()
