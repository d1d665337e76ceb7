#!/usr/bin/env python3
"""How close decode is to what its matrix products alone cost: a package's decode step, taken apart.

    python bench/floor.py PACKAGE [--prompt-tokens 128] [--steps 128] [--rounds 3]
    python bench/floor.py --layouts [--rounds 5]     # the matmul floor of other block layouts

Times, interleaved over `rounds` (the machine is shared and noisy), medians per decode step:
- step: `Model.forward` of one token plus the argmax, as `edge-qwen bench` decodes;
- session: ONNX Runtime's run alone (the rest of the step is Python: binding, logits, argmax);
- matmuls: the package's MatMulNBits nodes alone, same weights, same order, one session run. No
  graph of this package can decode faster than this with ONNX Runtime's kernels: it is the floor.
session - matmuls is everything else the graph runs: attention (GroupQueryAttention, whose cost grows
with the cached length), norms, the activation, and the dispatch of ~220 nodes.

--layouts times the same chain of products (the 0.5B's shapes, lm_head in 8 parts) for several
per-tensor block sizes on random weights (their values do not change the time), interleaved: what a
layout could gain before its quality is even asked. Needs `onnx`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import edge_qwen
from edge_qwen.package import WEIGHTS
from edge_qwen.providers import session_options


def matmul_only(package: Path, folder: Path) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:
    """A session running only the package's MatMulNBits nodes, reading the package's own weights file."""
    source = onnx.load(str(package / "model.onnx"), load_external_data=False)
    initializers = {t.name: t for t in source.graph.initializer}
    nodes, weights, feeds, outputs = [], {}, {}, []
    rng = np.random.default_rng(0)
    for node in (n for n in source.graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x = f"x{attrs['K']}"  # one input per width: what feeds a product does not change its cost
        if x not in feeds:
            feeds[x] = rng.standard_normal((1, attrs["K"])).astype(np.float32)
        inputs = [x, *node.input[1:]]
        nodes.append(
            helper.make_node(node.op_type, inputs, node.output[:1], node.name, domain=node.domain, **attrs)
        )
        weights.update({name: initializers[name] for name in node.input[1:] if name in initializers})
        outputs.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, [1, attrs["N"]]))
    graph_inputs = [
        helper.make_tensor_value_info(x, TensorProto.FLOAT, list(v.shape)) for x, v in feeds.items()
    ]
    graph = helper.make_graph(nodes, "matmuls", graph_inputs, outputs, list(weights.values()))
    model = helper.make_model(graph, opset_imports=source.opset_import)
    onnx.save(model, str(folder / "model.onnx"))
    os.link(package / WEIGHTS, folder / WEIGHTS)  # same offsets, no copy (ORT refuses symlinks)
    session = ort.InferenceSession(
        str(folder / "model.onnx"), session_options(None), providers=["CPUExecutionProvider"]
    )
    return session, feeds


# qkv, o, gate_up, down per layer, then the lm_head's parts: (name, K, N) of the 0.5B
SHAPES_05B = [
    ("qkv_proj", 896, 1152),
    ("o_proj", 896, 896),
    ("gate_up_proj", 896, 9728),
    ("down_proj", 4864, 896),
]
LAYERS_05B, HEAD_PARTS_05B = 24, [("lm_head", 896, 18992)] * 8
LAYOUTS = {  # block size per tensor; "default" is default_options("int4")
    "default (b32, gate_up b64)": {"gate_up_proj": 64},
    "b32 everywhere": {"gate_up_proj": 32},
    "default + lm_head b64": {"gate_up_proj": 64, "lm_head": 64},
    "default + down_proj b64": {"gate_up_proj": 64, "down_proj": 64},
    "b64 everywhere": dict.fromkeys(("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"), 64),
    "b128 everywhere": dict.fromkeys(("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"), 128),
}


def layout_chain(blocks: dict[str, int], rng: np.random.Generator) -> ort.InferenceSession:
    """The 0.5B's products with random int4 weights (asymmetric), block sizes from `blocks` (else 32)."""
    nodes, weights, outputs = [], [], []
    for i, (name, k, n) in enumerate(SHAPES_05B * LAYERS_05B + HEAD_PARTS_05B):
        block = blocks.get(name, 32)
        b, s, z = (f"{name}.{i}.{part}" for part in ("q4", "scales", "zero_points"))
        weights += [
            numpy_helper.from_array(rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8), b),
            numpy_helper.from_array(rng.random(n * k // block, dtype=np.float32) * 0.01, s),
            numpy_helper.from_array(rng.integers(0, 256, (n, (k // block + 1) // 2), dtype=np.uint8), z),
        ]
        attrs = {"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": 4}
        nodes.append(
            helper.make_node("MatMulNBits", [f"x{k}", b, s, z], [f"y{i}"], domain="com.microsoft", **attrs)
        )
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in (896, 4864)]
    graph = helper.make_graph(nodes, "layout", inputs, outputs, weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(
        model.SerializeToString(), session_options(None), providers=["CPUExecutionProvider"]
    )


def compare_layouts(rounds: int) -> None:
    rng = np.random.default_rng(0)
    sessions = {name: layout_chain(blocks, rng) for name, blocks in LAYOUTS.items()}
    feeds = {f"x{k}": rng.standard_normal((1, k)).astype(np.float32) for k in (896, 4864)}
    medians: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            session.run(None, feeds)
            times = []
            for _ in range(16):
                start = time.perf_counter()
                session.run(None, feeds)
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times))
    base = statistics.median(medians[next(iter(LAYOUTS))])
    print(f"matmul floor per decode step, 0.5B shapes, median of {rounds} interleaved rounds:")
    for name, values in medians.items():
        ms = statistics.median(values)
        print(f"  {name:28s} {1e3 * ms:6.2f} ms  ({ms / base:.2f}x the default)")


def decode_round(model: edge_qwen.Model, prompt: np.ndarray, steps: int) -> tuple[float, float]:
    """Median seconds per decode step: whole step, and the session run within it."""
    cache = model.new_cache(prompt.size + steps)
    token = int(np.argmax(model.forward(prompt, cache)))
    session_run = model.session.run_with_iobinding
    runs: list[float] = []

    def timed(binding: ort.IOBinding) -> None:
        start = time.perf_counter()
        session_run(binding)
        runs.append(time.perf_counter() - start)

    model.session.run_with_iobinding = timed  # type: ignore[method-assign]
    whole = []
    try:
        for _ in range(steps):
            start = time.perf_counter()
            token = int(np.argmax(model.forward([token], cache)))
            whole.append(time.perf_counter() - start)
    finally:
        del model.session.run_with_iobinding
    return statistics.median(whole), statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package", type=Path, nargs="?")
    p.add_argument("--layouts", action="store_true", help="compare block layouts' matmul floors instead")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.layouts:
        compare_layouts(args.rounds)
        return
    if args.package is None:
        p.error("give a PACKAGE, or --layouts")
    model = edge_qwen.load(args.package)
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, args.prompt_tokens)
    step, run, floor = [], [], []
    with tempfile.TemporaryDirectory(dir=args.package.parent) as tmp:  # a hard link stays on one disk
        matmuls, feeds = matmul_only(args.package, Path(tmp))
        matmuls.run(None, feeds)
        for _ in range(args.rounds):
            s, r = decode_round(model, prompt, args.steps)
            step.append(s)
            run.append(r)
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                matmuls.run(None, feeds)
                times.append(time.perf_counter() - start)
            floor.append(statistics.median(times))
    ms = {k: 1e3 * statistics.median(v) for k, v in (("step", step), ("session", run), ("matmuls", floor))}
    print(f"{args.package.name}: {args.prompt_tokens}-token prompt, {args.steps} steps, {args.rounds} rounds")
    print(f"  step     {ms['step']:6.2f} ms  = {1e3 / ms['step']:5.1f} tok/s")
    print(f"  session  {ms['session']:6.2f} ms  (Python around it: {ms['step'] - ms['session']:.2f} ms)")
    print(f"  matmuls  {ms['matmuls']:6.2f} ms  = {1e3 / ms['matmuls']:5.1f} tok/s if nothing else ran")
    print(f"  rest of the graph {ms['session'] - ms['matmuls']:.2f} ms")


if __name__ == "__main__":
    main()
