"""Block-wise INT4/INT8 quantization, numpy in and numpy out, in ONNX Runtime's contrib-op layouts.

Make the quantized weights here (`quantize`, `quantize_embedding`); the exporter uses them as
MatMulNBits / GatherBlockQuantized initializers. Nothing in this package imports onnx.
"""

from __future__ import annotations

from .blockwise import (
    SUPPORTED_ALGOS,
    SUPPORTED_BITS,
    SUPPORTED_BLOCK_SIZES,
    QuantError,
    QuantizedMatrix,
    check_scheme,
    dequantize,
    quantization_error,
    quantize,
    zero_points_of,
)
from .embedding import QuantizedEmbedding, dequantize_embedding, embedding_view, quantize_embedding

__all__ = [
    "SUPPORTED_ALGOS",
    "SUPPORTED_BITS",
    "SUPPORTED_BLOCK_SIZES",
    "QuantError",
    "QuantizedEmbedding",
    "QuantizedMatrix",
    "check_scheme",
    "dequantize",
    "dequantize_embedding",
    "embedding_view",
    "quantization_error",
    "quantize",
    "quantize_embedding",
    "zero_points_of",
]
