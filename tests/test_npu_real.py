"""NPU packages of the real Qwen2.5-Coder-0.5B-Instruct on the CPU execution provider (slow tier).

Bounds (docs/npu.md has the measurements): on the built-in code text, 4 chunks of 512 tokens, mean
KLD against the fp32 package at most 0.02 for W8A16, and for W4A16 (GPTQ onto the LPBQ grid, int8
edge layers) at most the default INT4 CPU package's own KLD on the same chunks plus 0.05. Both
packages answer Paris and Rome, and `check --target npu` calls both ready.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import edge_qwen
from edge_qwen.apps.cli import cli
from edge_qwen.apps.evaluate import evaluate
from tests import real_model

pytestmark = pytest.mark.slow

W8A16_MAX_KLD = 0.02
W4A16_MARGIN = 0.05  # over the default INT4 package's KLD
CHUNKS = 4
DEFAULT_INT4 = Path.home() / ".cache/edge-qwen-bench/compare/qwen2.5-coder-0.5b-instruct-int4"


def npu_package(precision: str) -> Path:
    return real_model.exported(
        f"q05-npu-{precision}", "--target", "npu", "--precision", precision, "--context", "1024"
    )


@pytest.fixture(scope="module")
def fp32_package() -> Path:
    return real_model.exported("q05-fp32", "--precision", "fp32")


@pytest.fixture(scope="module")
def w8a16() -> Path:
    return npu_package("int8")


@pytest.fixture(scope="module", params=["int8", "int4"], ids=["w8a16", "w4a16"])
def either(request: pytest.FixtureRequest) -> Path:
    return npu_package(request.param)


def test_answers_paris_and_rome(either: Path) -> None:
    model = edge_qwen.load(either)
    assert "Paris" in model.generate("What is the capital of France?", max_tokens=16)
    assert "Rome" in model.generate("What is the capital of Italy?", max_tokens=16)


def test_check_calls_it_ready(either: Path) -> None:
    result = CliRunner().invoke(cli, ["check", str(either), "--target", "npu", "--no-mobile"])
    assert result.exit_code == 0, result.output
    assert "verdict     READY" in result.output


def test_w8a16_kld_against_fp32(w8a16: Path, fp32_package: Path) -> None:
    report = evaluate(w8a16, fp32_package, "code", 512, CHUNKS, show_progress=False)
    assert report["mean_kld"] <= W8A16_MAX_KLD


def test_w4a16_kld_within_the_margin_of_the_int4_default(fp32_package: Path) -> None:
    # The benchmarks' default INT4 package when there is one, else the default export (as test_server_real)
    int4 = DEFAULT_INT4 if (DEFAULT_INT4 / "edge_qwen.json").is_file() else real_model.exported("q05-int4")
    default = evaluate(int4, fp32_package, "code", 512, CHUNKS, show_progress=False)
    report = evaluate(npu_package("int4"), fp32_package, "code", 512, CHUNKS, show_progress=False)
    assert report["mean_kld"] <= default["mean_kld"] + W4A16_MARGIN
