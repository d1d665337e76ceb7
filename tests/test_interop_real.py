"""The real Qwen2.5-Coder-0.5B-Instruct across runtimes (slow tier): our packages answer the same, token
for token, in edge-qwen, onnxruntime-genai and optimum; onnxruntime-genai's own package answers the
same in edge-qwen as in onnxruntime-genai."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime_genai as og
import pytest
from click.testing import CliRunner

import edge_qwen
from edge_qwen.apps.cli import cli
from tests import real_model
from tests.optimum_env import PROBE, optimum_python
from tests.test_interop_genai import genai_greedy, ours_greedy

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France? Answer in one word."
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["fp32", "int4"])
def package(request: pytest.FixtureRequest) -> Path:
    if request.param == "fp32":
        return real_model.exported("q05-fp32", "--precision", "fp32")
    # kquant rather than the default GPTQ: the same graph and MatMulNBits kernels, minutes less export
    return real_model.exported("q05-int4-kquant", "--precision", "int4", "--algo", "kquant")


@pytest.fixture(scope="module")
def genai_builder_int4() -> Path:
    """onnxruntime-genai's own INT4 CPU package of the model, made by its builder once and cached."""
    out = real_model.cache_dir() / f"ortgenai-int4-{og.__version__}"
    if not (out / "genai_config.json").is_file():
        work = out.with_name(out.name + ".partial")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(real_model.hf_folder())]
        cmd += ["-o", str(work), "-p", "int4", "-e", "cpu", "-c", str(work) + "-cache"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=3600)
        os.replace(work, out)
    return out


def assert_genai_answers_as_ours(package: Path) -> None:
    """Greedy from the same prompt ids: Paris in ours, and onnxruntime-genai gives the same tokens."""
    ours = edge_qwen.load(package)
    prompt = ours.encode_prompt(QUESTION)
    tokens = ours_greedy(ours, prompt, NEW_TOKENS)
    assert "Paris" in ours.tokenizer.decode(tokens)
    assert genai_greedy(og.Model(str(package)), prompt, NEW_TOKENS) == tokens


def test_genai_answers_with_our_tokens(package: Path) -> None:
    assert_genai_answers_as_ours(package)


def test_optimum_answers_with_our_tokens(package: Path) -> None:
    ours = edge_qwen.load(package)
    prompt = ours.encode_prompt(QUESTION)
    spec = {
        "prompt": prompt,
        "continuation": [],
        "new_tokens": NEW_TOKENS,
        "question": QUESTION,
        "logits": False,
    }
    result = subprocess.run(
        [str(optimum_python()), str(PROBE), str(package), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["load_warnings"] == []
    assert seen["chat_ids"] == prompt
    assert seen["greedy"] == ours_greedy(ours, prompt, NEW_TOKENS)
    answer = ours.generate(QUESTION, max_tokens=NEW_TOKENS, temperature=0)
    assert "Paris" in answer and seen["pipeline"] == answer


def test_genai_builder_package_answers_the_same_in_edge_qwen(genai_builder_int4: Path) -> None:
    assert_genai_answers_as_ours(genai_builder_int4)
    runner = CliRunner()
    assert runner.invoke(cli, ["info", str(genai_builder_int4)]).exit_code == 0
    bench = runner.invoke(
        cli, ["bench", str(genai_builder_int4), "--prompt-tokens", "32", "--gen-tokens", "8"]
    )
    assert bench.exit_code == 0, bench.output
