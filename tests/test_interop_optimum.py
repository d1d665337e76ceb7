"""Our packages in optimum's ORTModelForCausalLM and transformers' pipeline, unmodified.

optimum runs in an environment of its own (tests/optimum_env.py says why), through
tests/optimum_probe.py, which prints what optimum computed; these tests compare it with edge-qwen.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_qwen
from edge_qwen.export.options import ExportOptions, default_options
from edge_qwen.export.readers import read_checkpoint
from edge_qwen.export.writer import write_package
from edge_qwen.sampling import make_sampler
from tests.conftest import TinyModel
from tests.optimum_env import PROBE, optimum_python

PROMPT = np.random.default_rng(7).integers(3, 500, 9).tolist()
CONTINUATION = np.random.default_rng(8).integers(3, 500, 5).tolist()
NEW_TOKENS = 8
ATOL = 1e-4  # the same graph on the same onnxruntime; optimum runs every position, we the last
KINDS = {"fp32": ExportOptions(), "int8": default_options("int8"), "int4-default": default_options("int4")}


@pytest.fixture(scope="module")
def python() -> Path:
    return optimum_python()


def run_optimum(python: Path, package: Path, **spec: Any) -> dict[str, Any]:
    result = subprocess.run(
        [str(python), str(PROBE), str(package), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", list(KINDS))
def test_optimum_runs_our_package_as_we_do(python: Path, tiny: TinyModel, tmp_path: Path, kind: str) -> None:
    package = write_package(read_checkpoint(tiny.hf_dir), tmp_path / kind, KINDS[kind], show_progress=False)
    seen = run_optimum(python, package, prompt=PROMPT, continuation=CONTINUATION, new_tokens=NEW_TOKENS)
    assert seen["load_warnings"] == []  # no "legacy ONNX model", no missing position_ids or cache
    ours = edge_qwen.load(package)
    cache = ours.new_cache()
    expected = [ours.forward(PROMPT, cache)] + [ours.forward([t], cache) for t in CONTINUATION]
    np.testing.assert_allclose(np.array(seen["logits"]), np.stack(expected), atol=ATOL, rtol=0)
    greedy = list(ours.generate_tokens(PROMPT, make_sampler(temperature=0), NEW_TOKENS))
    assert seen["greedy"] == greedy
    chat = [{"role": "user", "content": "Capital of France?"}]
    assert seen["chat_ids"] == ours.encode_prompt(chat)
    assert seen["pipeline"] == ours.generate(chat, max_tokens=NEW_TOKENS, temperature=0)
