"""The real Qwen2.5-Coder-0.5B-Instruct, exported and run as a user would (slow tier)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edge_qwen
from tests import real_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp32_package() -> Path:
    return real_model.exported("q05-fp32", "--precision", "fp32")


def test_answers_the_capital_of_france(fp32_package: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "edge_qwen.apps.cli",
        "generate",
        str(fp32_package),
        "What is the capital of France? Answer in one word.",
        "--max-tokens",
        "16",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_logits_match_transformers(fp32_package: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    m = edge_qwen.load(fp32_package)
    ids = m.encode_prompt("def fibonacci(n):")
    continuation = m.tokenizer.encode("\n    if n < 2:", add_special_tokens=False).ids
    ref = AutoModelForCausalLM.from_pretrained(real_model.hf_folder(), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids + continuation])).logits[0].numpy()
    cache = m.new_cache()
    got = [m.forward(ids, cache)] + [m.forward([t], cache) for t in continuation]
    diff = max(float(np.abs(g - expected[len(ids) - 1 + i]).max()) for i, g in enumerate(got))
    assert diff < 2e-3, f"max |logit difference| {diff}"
    assert all(int(np.argmax(g)) == int(np.argmax(expected[len(ids) - 1 + i])) for i, g in enumerate(got))
