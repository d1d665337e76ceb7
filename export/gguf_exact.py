"""A GGUF's quantized tensors carried into the graph exactly (`--algo gguf`).

Each tensor whose block type quant/ggml.py maps becomes MatMulNBits (or GatherBlockQuantized) inputs
that dequantize to gguf-py's values bit for bit; nothing is rounded again. The k-quant "min" types
(Q4_K, Q5_K, Q2_K) and Q4_1/Q5_1 add a per-block offset, which MatMulNBits has no input for (float
zero points would hold it, but take its slow unpacked path). The graph adds it as the product of the
activations' block sums with a small offsets matrix:

    x (.., K) ─MatMulNBits(B, scales, uint8 zero_points, bias)──────────────────────────► Add ─► y (.., N)
      └─Reshape (.., K/ob, ob)─ReduceSum(-1)─► sums (.., K/ob)─MatMul(offsets^T (K/ob, N))──┘

(ob, the offset block: 32 for Q4_K/Q5_K/Q4_1/Q5_1, 16 for Q2_K). A tensor of a type with no map
(IQ*, F16, ...) is dequantized and quantized with the fallback recipe, int8 kquant block 32, the
closest to its values without calibration; a log line names it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import ReaderTensor

from edge_qwen.export.graph import MS_DOMAIN, Graph
from edge_qwen.export.linear import LM_HEAD_ROWS, row_ranges
from edge_qwen.export.options import ExportOptions, default_options
from edge_qwen.quant.ggml import BLOCK_TYPES, GgmlMatrix, from_blocks, stack_rows

from .checkpoint import Checkpoint

logger = logging.getLogger(__name__)

FloatLinear = Callable[[str, np.ndarray, np.ndarray | None, str, str], str]  # x, w, b, name, prefix -> y


@dataclass(frozen=True)
class ExactTensors:
    """The raw blocks of a GGUF's tensors, by Hugging Face name, read one at a time from the file."""

    path: Path
    tensors: dict[str, ReaderTensor]

    @classmethod
    def of(cls, ckpt: Checkpoint) -> ExactTensors:
        """The GGUF tensors behind a checkpoint read by export/gguf_reader.py."""
        tensors = ckpt.extra.get("gguf_tensors")
        if tensors is None:
            raise ValueError(
                f"--algo gguf carries a GGUF's own quantization: {ckpt.source} is not a .gguf file"
            )
        return cls(Path(ckpt.source), tensors)

    def qtype(self, name: str) -> str:
        return self.tensors[f"{name}.weight"].tensor_type.name

    def is_exact(self, name: str) -> bool:
        return self.qtype(name) in BLOCK_TYPES

    def any_exact(self) -> bool:
        return any(t.tensor_type.name in BLOCK_TYPES for t in self.tensors.values())

    def matrix(self, name: str, rows: tuple[int, int] | None = None) -> GgmlMatrix:
        """`name`'s weight (N, K), or its rows [start, stop), as MatMulNBits arrays.

        The bytes are read, not mapped: a conversion's memory holds one tensor (or one lm_head part),
        not the pages of every tensor it has touched."""
        t = self.tensors[f"{name}.weight"]
        n, cols = int(t.shape[1]), int(t.shape[0])  # GGUF lists dimensions innermost first
        start, stop = rows or (0, n)
        row_bytes = int(t.n_bytes) // n
        with self.path.open("rb") as f:
            f.seek(int(t.data_offset) + start * row_bytes)
            raw = np.fromfile(f, np.uint8, (stop - start) * row_bytes)
        return from_blocks(t.tensor_type.name, raw.reshape(stop - start, row_bytes), (stop - start, cols))

    def rows(self, name: str) -> int:
        return int(self.tensors[f"{name}.weight"].shape[1])

    def summary(self) -> dict[str, int]:
        """How many matrices of each GGUF type (1-D tensors left out)."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if len(t.shape) == 2:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return dict(sorted(counts.items()))

    def record(self, fallback: str) -> dict[str, str | None]:
        """The manifest's recipe of an exact package: which GGUF types went in as they are, and the
        recipe of the matrices of a type without a map (None when there are none)."""
        counts = self.summary()
        exact = [f"{t} x{n}" for t, n in counts.items() if t in BLOCK_TYPES]
        other = [f"{t} x{n}" for t, n in counts.items() if t not in BLOCK_TYPES]
        return {
            "gguf blocks, exactly": ", ".join(exact) or None,
            "other types (requantized)": f"{', '.join(other)}: {fallback}" if other else None,
        }


def options_for(ckpt: Checkpoint, opts: ExportOptions) -> ExportOptions:
    """`--algo gguf` on a GGUF with no quantized matrix (F16, BF16, F32) quantizes as a float checkpoint
    is: with the default recipe of the precision asked for, and a line saying so."""
    exact = ExactTensors.of(ckpt)
    if exact.any_exact():
        return opts
    types = ", ".join(exact.summary())
    logger.warning(
        "%s holds no quantized matrix (%s): quantizing it with the default %s recipe",
        Path(ckpt.source).name,
        types,
        opts.precision,
    )
    chosen = default_options(opts.precision, opts.target_cpu)
    kept = {"max_context": opts.max_context, "logits": opts.logits, "accuracy_level": opts.accuracy_level}
    return replace(chosen, **kept)


def linear(
    g: Graph,
    x: str,
    exact: ExactTensors,
    parts: list[str],
    b: np.ndarray | None,
    name: str,
    prefix: str,
    accuracy_level: int,
    fallback: FloatLinear,
) -> str:
    """y = x @ concat(parts).T + b, each run of parts of one layout as one MatMulNBits."""
    unmapped = [p for p in parts if not exact.is_exact(p)]
    if unmapped:
        for p in unmapped:
            _warn_fallback(exact, p)
        w = np.concatenate([exact_float(exact, p) for p in parts])
        return fallback(x, w, b, name, prefix)
    groups: list[list[GgmlMatrix]] = []
    for p in parts:
        m = exact.matrix(p)
        if groups and groups[-1][0].layout[:2] == m.layout[:2]:
            groups[-1].append(m)
        else:
            groups.append([m])
    if len(groups) == 1:
        return matmul(g, x, stack_rows(groups[0]), b, name, prefix, accuracy_level)
    outputs, row = [], 0
    for i, group in enumerate(groups):
        m = stack_rows(group)
        bias = None if b is None else b[row : row + m.shape[0]]
        row += m.shape[0]
        outputs.append(matmul(g, x, m, bias, f"{name}.part{i}", f"{prefix}/part{i}", accuracy_level))
    return g.op("Concat", outputs, f"{prefix}/Concat", axis=-1)


def exact_float(exact: ExactTensors, name: str) -> np.ndarray:
    from .gguf_reader import dequantize_tensor

    return dequantize_tensor(exact.tensors[f"{name}.weight"])


@dataclass(frozen=True)
class NBitsInputs:
    """Initializer names of one exact matrix: MatMulNBits' B, scales, zero points, and the offsets."""

    packed: str
    scales: str
    zero_points: str
    offsets: str  # "" when the type has none; (n_offset_blocks, N) float32


def add_matrix(g: Graph, m: GgmlMatrix, name: str) -> NBitsInputs:
    offsets = ""
    if m.offsets is not None:  # (K / offset_block, N): the right-hand side of the correction's MatMul
        offsets = g.weight(f"{name}.weight_offsets", np.ascontiguousarray(m.offsets.T))
    return NBitsInputs(
        packed=g.weight(f"{name}.weight_q{m.bits}", m.packed()),  # (N, n_blocks, block_size * bits / 8)
        scales=g.weight(f"{name}.weight_scales", m.scales.reshape(-1)),
        zero_points=g.weight(f"{name}.weight_zero_points", m.packed_zero_points().reshape(-1)),
        offsets=offsets,
    )


def matmul(
    g: Graph, x: str, m: GgmlMatrix, b: np.ndarray | None, name: str, prefix: str, accuracy_level: int
) -> str:
    return matmul_inputs(g, x, m, add_matrix(g, m, name), b, name, prefix, accuracy_level)


def matmul_inputs(
    g: Graph,
    x: str,
    m: GgmlMatrix,
    w: NBitsInputs,
    b: np.ndarray | None,
    name: str,
    prefix: str,
    accuracy_level: int,
) -> str:
    rows, cols = m.shape
    inputs = [x, w.packed, w.scales, w.zero_points]
    if b is not None:
        inputs += ["", g.weight(f"{name}.bias", b.astype(np.float32))]
    y = g.op(
        "MatMulNBits",
        inputs,
        f"{prefix}/MatMulNBits",
        domain=MS_DOMAIN,
        K=cols,
        N=rows,
        bits=m.bits,
        block_size=m.block_size,
        accuracy_level=accuracy_level,
    )
    if not w.offsets:
        return y
    #   x (.., K) -> (.., K / ob, ob) -> sums (.., K / ob) -> @ offsets (K / ob, N)
    blocks = g.op(
        "Reshape",
        [x, g.constant([0, 0, cols // m.offset_block, m.offset_block])],
        f"{prefix}/offsets/Reshape",
    )
    sums = g.op("ReduceSum", [blocks, g.constant([-1])], f"{prefix}/offsets/ReduceSum", keepdims=0)
    correction = g.op("MatMul", [sums, w.offsets], f"{prefix}/offsets/MatMul")
    return g.op("Add", [y, correction], f"{prefix}/offsets/Add")


def lm_head(
    g: Graph, x: str, exact: ExactTensors, name: str, accuracy_level: int, tied: NBitsInputs | None = None
) -> str:
    """lm_head over parts of at most LM_HEAD_ROWS rows (as the float path), their logits concatenated;
    each part is read from the file on its own.

    `tied`: the embedding's initializers; each part is then a view of their bytes (stored once)."""
    parts = row_ranges(exact.rows(name), LM_HEAD_ROWS)
    logits = []
    for i, (a, z) in enumerate(parts):
        part = exact.matrix(name, (a, z))
        one = len(parts) == 1
        head, prefix = ("lm_head", "/lm_head") if one else (f"lm_head.part{i}", f"/lm_head/part{i}")
        w = add_matrix(g, part, head) if tied is None else _tied_part(g, part, tied, a, head)
        logits.append(matmul_inputs(g, x, part, w, None, head, prefix, accuracy_level))
    return logits[0] if len(logits) == 1 else g.op("Concat", logits, "/lm_head/Concat", axis=-1)


def _tied_part(g: Graph, part: GgmlMatrix, table: NBitsInputs, start: int, name: str) -> NBitsInputs:
    packed, scales, zeros = part.packed(), part.scales.reshape(-1), part.packed_zero_points()
    offsets = ""
    if table.offsets:
        # The embedding keeps offsets as (vocab, blocks): MatMul needs them transposed, so store a copy.
        assert part.offsets is not None
        offsets = g.weight(f"{name}.weight_offsets", np.ascontiguousarray(part.offsets.T))
    return NBitsInputs(
        packed=g.alias(f"{name}.weight_q_tied", table.packed, packed, start * packed[0].nbytes),
        scales=g.alias(f"{name}.weight_scales_tied", table.scales, scales, start * part.scales[0].nbytes),
        zero_points=g.alias(
            f"{name}.weight_zero_points_tied", table.zero_points, zeros.reshape(-1), start * zeros[0].nbytes
        ),
        offsets=offsets,
    )


def embedding(g: Graph, ids: str, m: GgmlMatrix) -> tuple[str, NBitsInputs]:
    """The lookup of an exact table; returns the hidden states and the table's initializers.

    ids ─GatherBlockQuantized(data, scales, zero_points)────────────────────► Add ─► (.., K)
     └─Gather(offsets (vocab, K/ob))─Unsqueeze(-1)─Expand(.., ob)─Reshape(.., K)─┘    (offset types)
    """
    name, prefix = "model.embed_tokens", "/model/embed_tokens"
    vocab, hidden = m.shape
    packed = m.packed().reshape(vocab, hidden * m.bits // 8)  # the bytes of MatMulNBits' B
    w = NBitsInputs(
        packed=g.weight(f"{name}.weight_q{m.bits}", packed),
        scales=g.weight(f"{name}.weight_scales", m.scales),
        zero_points=g.weight(f"{name}.weight_zero_points", m.packed_zero_points()),
        offsets="" if m.offsets is None else g.weight(f"{name}.weight_offsets", m.offsets),
    )
    x = g.op(
        "GatherBlockQuantized",
        [w.packed, ids, w.scales, w.zero_points],
        f"{prefix}/GatherBlockQuantized",
        domain=MS_DOMAIN,
        gather_axis=0,
        quantize_axis=1,
        block_size=m.block_size,
        bits=m.bits,
    )
    if not w.offsets:
        return x, w
    ob = m.offset_block
    rows = g.op("Gather", [w.offsets, ids], f"{prefix}/offsets/Gather")  # (.., K / ob)
    rows = g.op("Unsqueeze", [rows, g.constant([-1])], f"{prefix}/offsets/Unsqueeze")
    rows = g.op("Expand", [rows, g.constant([1, 1, 1, ob])], f"{prefix}/offsets/Expand")
    rows = g.op("Reshape", [rows, g.constant([0, 0, hidden])], f"{prefix}/offsets/Reshape")
    return g.op("Add", [x, rows], f"{prefix}/offsets/Add"), w


def embed(
    g: Graph,
    ids: str,
    exact: ExactTensors,
    tied: bool,
    accuracy_level: int,
    embed_float: Callable[[np.ndarray], str],
    head_float: Callable[[str, np.ndarray], str],
) -> tuple[str, Callable[[str], str]]:
    """The exact embedding lookup and the lm_head to run at the end (both read when they are built)."""
    table = "model.embed_tokens"
    table_inputs = None
    if exact.is_exact(table):
        x, table_inputs = embedding(g, ids, exact.matrix(table))
    else:
        _warn_fallback(exact, table)
        x = embed_float(exact_float(exact, table))

    def head(normed: str) -> str:
        name = table if tied else "lm_head"
        if not exact.is_exact(name):
            _warn_fallback(exact, name)
            return head_float(normed, exact_float(exact, name))
        return lm_head(g, normed, exact, name, accuracy_level, table_inputs if tied else None)

    return x, head


def _warn_fallback(exact: ExactTensors, name: str) -> None:
    logger.warning(
        "%s is %s, which has no exact map: quantized with the fallback recipe (int8 kquant, block 32)",
        name,
        exact.qtype(name),
    )
