"""Our packages in onnxruntime-genai, and folders of onnxruntime-genai's model builder in edge-qwen.

onnxruntime-genai installs beside the dev extras (it needs only numpy and onnxruntime >= 1.31, and
its builder torch, transformers and onnx-ir, which the dev extras pin alike), so these tests run it
in this process, on the same onnxruntime, as an app embedding both would.

The tiny random checkpoints repeat one token under greedy decoding, so token equality alone would
prove little: the tests also compare the logits of the prompt and of a teacher-forced continuation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest
from click.testing import CliRunner

import edge_qwen
from edge_qwen.apps.cli import cli
from edge_qwen.export.options import ExportOptions, default_options
from edge_qwen.export.readers import read_checkpoint
from edge_qwen.export.writer import write_package
from edge_qwen.sampling import make_sampler
from tests.conftest import TinyModel

PROMPT = np.random.default_rng(5).integers(3, 500, 11).tolist()
CONTINUATION = np.random.default_rng(6).integers(3, 500, 6).tolist()
GREEDY_TOKENS = 12
# Same graph, same onnxruntime: what differs is the lm_head on the last row alone (ours) or on all.
ATOL = 1e-4
KINDS = {
    "fp32": ExportOptions(),
    "int8": default_options("int8"),
    "int4-default": default_options("int4"),
    "int4-mixed": ExportOptions(precision="int4", mixed=True),
    "int4-block64": ExportOptions(precision="int4", block_size=64),
}
TEXTS = ["def add(a, b):\n    return a + b\n", "  spaces\tand\ttabs  ", "naïve café 東京 🙂", "x" * 40]


@pytest.fixture(scope="module", params=list(KINDS))
def package(
    request: pytest.FixtureRequest, tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("genai") / request.param
    return write_package(read_checkpoint(tiny.hf_dir), out, KINDS[request.param], show_progress=False)


def genai_logits(model: og.Model, steps: list[list[int]]) -> list[np.ndarray]:
    """onnxruntime-genai's last-position logits after appending each list of tokens in turn."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=sum(map(len, steps)) + 1, do_sample=False)
    generator = og.Generator(model, params)
    rows = []
    for tokens in steps:
        generator.append_tokens(tokens)
        rows.append(np.array(generator.get_output("logits"))[0, -1])  # (batch, seq, vocab) -> (vocab,)
    return rows


def genai_greedy(model: og.Model, prompt: list[int], n: int) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def ours_greedy(m: edge_qwen.Model, prompt: list[int], n: int) -> list[int]:
    return list(m.generate_tokens(prompt, make_sampler(temperature=0), n))


def assert_same_runs(folder: Path) -> None:
    """edge-qwen and onnxruntime-genai on the same folder: same logits, same greedy tokens."""
    ours, theirs = edge_qwen.load(folder), og.Model(str(folder))
    cache = ours.new_cache()
    expected = [ours.forward(PROMPT, cache)] + [ours.forward([t], cache) for t in CONTINUATION]
    got = genai_logits(theirs, [PROMPT, *([t] for t in CONTINUATION)])
    for step, (e, g) in enumerate(zip(expected, got, strict=True)):
        np.testing.assert_allclose(g, e, atol=ATOL, rtol=0, err_msg=f"step {step}")
    assert genai_greedy(theirs, PROMPT, GREEDY_TOKENS) == ours_greedy(ours, PROMPT, GREEDY_TOKENS)


def test_genai_runs_our_package_as_we_do(package: Path) -> None:
    assert_same_runs(package)


def test_genai_tokenizer_and_chat_template_give_our_ids(package: Path) -> None:
    ours, theirs = edge_qwen.load(package), og.Model(str(package))
    tokenizer = og.Tokenizer(theirs)
    for text in TEXTS:
        assert list(tokenizer.encode(text)) == ours.tokenizer.encode(text, add_special_tokens=False).ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    rendered = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    assert list(tokenizer.encode(rendered)) == ours.encode_prompt(messages)


def test_info_says_where_a_package_runs(tiny: TinyModel, tmp_path: Path) -> None:
    ckpt = read_checkpoint(tiny.hf_dir)
    everywhere = write_package(ckpt, tmp_path / "all", ExportOptions(), show_progress=False)
    ours_only = write_package(ckpt, tmp_path / "last", ExportOptions(logits="last"), show_progress=False)
    runner = CliRunner()
    assert "onnxruntime-genai: yes; optimum: yes" in runner.invoke(cli, ["info", str(everywhere)]).output
    shown = runner.invoke(cli, ["info", str(ours_only)]).output
    assert "onnxruntime-genai: no: exported with logits=last" in shown
    # ... and it is so: onnxruntime-genai allocates every position's logits for a prompt.
    with pytest.raises(Exception, match="logits"):
        genai_logits(og.Model(str(ours_only)), [PROMPT])


# ---- the reverse: onnxruntime-genai's builder output in edge-qwen ----------------------------------


@pytest.fixture(scope="module", params=["fp32", "int4"])
def builder_folder(
    request: pytest.FixtureRequest, tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """onnxruntime-genai's model builder run on the tiny checkpoint, as its documentation says."""
    out = tmp_path_factory.mktemp("builder") / request.param
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tiny.hf_dir), "-o", str(out)]
    cmd += ["-p", request.param, "-e", "cpu", "-c", str(out.parent / "cache")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return out


def test_edge_qwen_runs_a_genai_builder_folder_as_genai_does(builder_folder: Path) -> None:
    assert_same_runs(builder_folder)


def test_genai_builder_folder_manifest_matches_the_checkpoint(builder_folder: Path, tiny: TinyModel) -> None:
    derived = edge_qwen.load(builder_folder).manifest
    hf = json.loads((tiny.hf_dir / "config.json").read_text())
    cfg = derived.config
    assert (cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (
        hf["intermediate_size"],
        hf["num_hidden_layers"],
        hf["vocab_size"],
    )
    assert cfg.rms_norm_eps == pytest.approx(hf["rms_norm_eps"])
    assert cfg.rope_theta == pytest.approx(hf["rope_theta"], rel=1e-4)  # read back from the cos/sin caches
    assert derived.precision == builder_folder.name
    assert derived.raw["format"] == "onnxruntime-genai"


def test_info_and_bench_work_on_a_genai_builder_folder(builder_folder: Path) -> None:
    runner = CliRunner()
    info = runner.invoke(cli, ["info", str(builder_folder)])
    assert info.exit_code == 0, info.output
    assert "tool        onnxruntime-genai model builder" in info.output
    bench = runner.invoke(
        cli, ["bench", str(builder_folder), "--prompt-tokens", "16", "--gen-tokens", "4", "--json"]
    )
    assert bench.exit_code == 0, bench.output
    assert json.loads(bench.output[bench.output.index("{") :])["precision"] == builder_folder.name
