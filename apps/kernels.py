"""Which MatMulNBits kernel ONNX Runtime runs on this CPU for each kind of quantized weight, found by
running one small MatMulNBits of each kind rather than guessed from the CPU's feature flags.

The kinds differ in what ONNX Runtime's CPU kernels (MLAS, and KleidiAI on ARM) accept, and the
int8-activation kernels need dot-product instructions (x86 AVX2/VNNI, ARM `asimddp`). docs/arm64.md
has what each CPU ran. What one run shows, and how:

- `unpacked fp32`: the weights are dequantized to float32 at every call, then multiplied. ONNX Runtime
  says so in its log at INFO level, which the probe reads.
- `KleidiAI int8`: the output changes when the session option `mlas.disable_kleidiai` is set.
- `MLAS int8`: activations are quantized to int8 (accuracy_level 4), so the output differs from the
  float32 computation that accuracy_level 1 asks for.
- `MLAS fp32`: none of the above; accuracy_level 4 computes exactly what accuracy_level 1 does.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# kind -> (bits, zero points). Packages hold int4 asymmetric weights by default (`--symmetric` for the
# other), and int8 only where a recipe asks for it.
KINDS = {
    "int4 asymmetric": (4, True),
    "int4 symmetric": (4, False),
    "int8 asymmetric": (8, True),
    "int8 symmetric": (8, False),
}
K, N, BLOCK = 256, 64, 32
FALLBACK_LOG = "Falling back to using unpacked compute mode"


@dataclass(frozen=True)
class KernelPath:
    kind: str
    decode: str  # one row of activations, as each generated token
    prefill: str  # several rows, as a prompt

    def describe(self) -> str:
        same = self.decode == self.prefill
        return self.decode if same else f"{self.decode} (decode), {self.prefill} (prefill)"


def matmul_nbits_model(bits: int, zero_points: bool, accuracy_level: int, seed: int = 0) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    n_blocks = K // BLOCK
    packed = rng.integers(0, 256, (N, n_blocks, BLOCK * bits // 8), dtype=np.uint8)
    scales = rng.uniform(0.005, 0.02, N * n_blocks).astype(np.float32)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["A", "B", "scales"]
    if zero_points:
        zp = rng.integers(0, 256, N * ((n_blocks * bits + 7) // 8), dtype=np.uint8)
        inits.append(numpy_helper.from_array(zp, "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node(
        "MatMulNBits", inputs, ["Y"], domain="com.microsoft",
        K=K, N=N, bits=bits, block_size=BLOCK, accuracy_level=accuracy_level,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


@contextmanager
def captured_stderr() -> Iterator[Path]:
    """ONNX Runtime logs from C++ to file descriptor 2: point it at a file for the duration."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stderr"
        saved = os.dup(2)
        with path.open("wb") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield path
            finally:
                os.dup2(saved, 2)
                os.close(saved)


def run(model: bytes, a: np.ndarray, disable_kleidiai: bool = False) -> tuple[np.ndarray, bool]:
    """The output, and whether ONNX Runtime said it fell back to dequantizing the weights."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 1  # INFO: where the fallback is reported
    if disable_kleidiai:
        options.add_session_config_entry("mlas.disable_kleidiai", "1")
    with captured_stderr() as log:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"A": a})
        fell_back = FALLBACK_LOG in log.read_text(errors="replace")
    return y, fell_back


def path_for(bits: int, zero_points: bool, rows: int) -> str:
    a = np.random.default_rng(1).standard_normal((rows, K)).astype(np.float32)
    fast = matmul_nbits_model(bits, zero_points, accuracy_level=4)
    y4, fell_back = run(fast, a)
    if fell_back:
        return "unpacked fp32"
    y4_plain, _ = run(fast, a, disable_kleidiai=True)
    if not np.array_equal(y4, y4_plain):
        return "KleidiAI int8"
    y1, _ = run(matmul_nbits_model(bits, zero_points, accuracy_level=1), a)
    return "MLAS fp32" if np.array_equal(y4, y1) else "MLAS int8"


def kernel_paths() -> list[KernelPath]:
    """For each kind of weight, the kernel this CPU's onnxruntime runs, for decode and for prefill."""
    return [
        KernelPath(kind, path_for(*spec, rows=1), path_for(*spec, rows=16)) for kind, spec in KINDS.items()
    ]
