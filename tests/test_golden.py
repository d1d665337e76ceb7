"""The tiny checkpoints' packages against transformers' outputs recorded in tests/data/golden.npz.

Needs no torch, so the arm64 check (scripts/arm64.sh) runs it as well: packages exported on this
machine, and, when EDGE_QWEN_X86_PACKAGES names a folder of `python -m tests.golden --export`, the
packages exported on x86, loaded here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import edge_qwen
from edge_qwen.quant.metrics import log_softmax
from tests.conftest import export_tiny
from tests.golden import (
    CONTINUATION,
    MODELS,
    PACKAGES,
    PROMPT,
    checkpoint,
    differences,
    load_golden,
    stop_ids,
)

# Largest |logit - transformers' fp32 logit| and mean KL divergence allowed, per package. fp32's is
# the parity bound. The quantized bounds are about twice the worst measured on x86 (AMD EPYC), an
# emulated Cortex-A72 (float32 compute) and an emulated Cortex-A76 (int8 compute), docs/arm64.md:
# int8 8.2e-3 / 2.3e-6, int4 5.6e-2 / 1.1e-4, int4-sym 4.8e-2 / 9.5e-5.
BOUNDS = {
    "fp32": (1e-4, 1e-8),
    "int8": (0.02, 5e-6),
    "int4": (0.12, 2.5e-4),
    "int4-sym": (0.1, 2e-4),
}
MAX_OTHER_BLOCKS = 0.05  # the share of a quantized tensor that may differ between CPUs' exports


def graph_nodes(package: Path) -> list[bytes]:
    """The graph's nodes as bytes: what must not differ, whichever onnx version wrote the file."""
    import onnx

    return [
        n.SerializeToString()
        for n in onnx.load(str(package / "model.onnx"), load_external_data=False).graph.node
    ]


def kld(ref: np.ndarray, ours: np.ndarray) -> float:
    p, q = log_softmax(ref), log_softmax(ours)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def run(package: Path) -> tuple[np.ndarray, list[int]]:
    """Logits after the prompt and after each continuation token; the greedy continuation."""
    model = edge_qwen.load(package)
    cache = model.new_cache()
    logits = [model.forward(PROMPT, cache)] + [model.forward([t], cache) for t in CONTINUATION]
    greedy = list(model.generate_tokens(PROMPT, edge_qwen.sampling.make_sampler(), max_tokens=24))
    return np.stack(logits), greedy


def check(package: Path, kind: str, golden: dict[str, np.ndarray]) -> None:
    logits, greedy = run(package)
    atol, max_kld = BOUNDS[kind]
    assert logits.shape == golden["logits"].shape
    worst = float(np.abs(logits - golden["logits"]).max())
    assert worst <= atol, f"{package}: max |logit error| {worst:.3g} > {atol}"
    assert kld(golden["logits"], logits) <= max_kld
    if kind == "fp32":
        assert greedy == golden["greedy"].tolist()
    # Wherever transformers' choice is clearer than twice the bound, the package makes the same one.
    top2 = np.sort(golden["logits"], -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * atol
    assert (logits.argmax(-1)[clear] == golden["logits"].argmax(-1)[clear]).all()


@pytest.fixture(scope="module")
def golden() -> dict[str, dict[str, np.ndarray]]:
    return load_golden()


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, checkpoint(request.param, tmp_path_factory.mktemp("golden"))


def test_golden_file_is_what_transformers_computes(model: tuple[str, Path], golden: dict) -> None:
    pytest.importorskip("transformers")
    from tests.golden import transformers_outputs

    name, hf = model
    now = transformers_outputs(hf)
    np.testing.assert_allclose(now["logits"], golden[name]["logits"], atol=1e-5, rtol=0)
    assert now["greedy"].tolist() == golden[name]["greedy"].tolist()
    assert len(now["greedy"]) >= 8 and stop_ids(hf)


@pytest.mark.parametrize("kind", list(PACKAGES))
def test_export_here_matches_golden(model: tuple[str, Path], golden: dict, kind: str, tmp_path: Path) -> None:
    name, hf = model
    check(export_tiny(hf, tmp_path / kind, **PACKAGES[kind]), kind, golden[name])  # type: ignore[arg-type]


X86 = os.environ.get("EDGE_QWEN_X86_PACKAGES")


@pytest.mark.skipif(not X86, reason="EDGE_QWEN_X86_PACKAGES is not set (the arm64 check sets it)")
@pytest.mark.parametrize("kind", list(PACKAGES))
def test_x86_export_loads_here_and_matches(
    model: tuple[str, Path], golden: dict, kind: str, tmp_path: Path
) -> None:
    name, hf = model
    x86 = Path(str(X86)) / name / kind
    check(x86, kind, golden[name])
    here = export_tiny(hf, tmp_path / kind, **PACKAGES[kind])  # type: ignore[arg-type]
    assert graph_nodes(here) == graph_nodes(x86), f"{kind}: the graph differs from x86's"
    if kind == "fp32":
        assert (here / "model.onnx.data").read_bytes() == (x86 / "model.onnx.data").read_bytes()
    # Quantized: the exporter's search for each block's scale compares candidates whose errors can tie
    # to within float rounding, which the two CPUs' numpy builds round differently; so a few blocks
    # take another, equally good grid (measured: at most 3.1% of a tensor's, docs/arm64.md).
    for name, share in differences(here, x86).items():
        assert share <= MAX_OTHER_BLOCKS, f"{kind} {name}: {share:.1%} of it differs from x86's export"
