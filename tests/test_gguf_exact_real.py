"""The real 0.5B's GGUF carried over exactly (slow tier): what is left against its fp32 export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_qwen.apps.evaluate import evaluate
from tests import real_model

pytestmark = pytest.mark.slow

CHUNKS = 2  # of 512 tokens, the second half scored: 510 tokens of the built-in code text
# What rounding the activations to int8 (accuracy_level 4) may cost against float32 compute.
ACCURACY_LEVEL_4_MAX_KLD = 0.005
# With float32 compute the weights are the fp32 export's numbers: only the summation order differs.
FLOAT_COMPUTE_MAX_KLD = 1e-5


@pytest.fixture(scope="module")
def fp32_package() -> Path:
    return real_model.exported("q05-fp32", "--precision", "fp32")


def exact(level: int) -> Path:
    args = ("--recipe", "exact", "--accuracy-level", str(level))
    return real_model.exported(f"q05-exact-al{level}", *args, source=real_model.gguf_path())


def test_with_float_compute_the_exact_package_is_the_fp32_export(fp32_package: Path) -> None:
    report = evaluate(exact(0), fp32_package, "code", 512, CHUNKS, show_progress=False)
    assert report["mean_kld"] < FLOAT_COMPUTE_MAX_KLD
    assert report["top1_agreement"] > 0.995


def test_the_int8_activations_alone_cost_little(fp32_package: Path) -> None:
    report = evaluate(exact(4), fp32_package, "code", 512, CHUNKS, show_progress=False)
    assert report["mean_kld"] <= ACCURACY_LEVEL_4_MAX_KLD


def test_the_exact_package_answers_paris() -> None:
    prompt = "What is the capital of France? Answer in one word."
    cmd = [
        sys.executable,
        "-m",
        "edge_qwen.apps.cli",
        "generate",
        str(exact(4)),
        prompt,
        "--max-tokens",
        "16",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
