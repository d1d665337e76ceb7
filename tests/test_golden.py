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
from tests.conftest import export_tiny
from tests.golden import CONTINUATION, MODELS, PACKAGES, PROMPT, checkpoint, load_golden, stop_ids

# Largest |logit - transformers' fp32 logit| and mean KL divergence allowed, per package. fp32 is the
# parity bound. The quantized bounds are about twice the worst measured on any CPU (docs/arm64.md has
# the figures per CPU: x86 and the A76 compute int8 activations, the A72 computes in float32).
BOUNDS = {
    "fp32": (1e-4, 1e-8),
    "int8": (0.02, 2e-5),
    "int4": (0.15, 1e-3),
    "int4-sym": (0.15, 1e-3),
}


def kld(ref: np.ndarray, ours: np.ndarray) -> float:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

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
    for file in ("model.onnx", "model.onnx.data"):
        assert (here / file).read_bytes() == (x86 / file).read_bytes(), f"{kind} {file} differs from x86's"
