"""The `edge-qwen` commands as a user runs them: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import edge_qwen
from tests.conftest import TinyModel


def run(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edge_qwen.apps.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_export_generate_info(tiny: TinyModel, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    result = run("export", str(tiny.hf_dir), str(out), "--precision", "fp32", "--max-context", "256")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "edge_qwen.json").read_text())["max_context"] == 256

    result = run("generate", str(out), "The capital of France", "--max-tokens", "12", "--raw")
    assert result.returncode == 0, result.stderr
    m = edge_qwen.load(out)
    assert result.stdout == m.generate("The capital of France", max_tokens=12, chat=False) + "\n"
    assert result.stderr == ""

    result = run("info", str(out))
    assert result.returncode == 0, result.stderr
    assert "GroupQueryAttention" in result.stdout and "model.onnx.data" in result.stdout
    assert "fp32" in result.stdout


def test_generate_chat_mode_uses_the_template(tiny_fp32: Path) -> None:
    result = run("generate", str(tiny_fp32), "hello", "--max-tokens", "5", "--system", "be brief")
    assert result.returncode == 0, result.stderr
    m = edge_qwen.load(tiny_fp32)
    expected = m.generate(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}], max_tokens=5
    )
    assert result.stdout == expected + "\n"


def test_seeded_sampling_is_reproducible(tiny_fp32: Path) -> None:
    args = ("generate", str(tiny_fp32), "x", "--max-tokens", "12", "--temperature", "1.0", "--seed", "7")
    first, second = run(*args), run(*args)
    assert first.returncode == 0 and first.stdout == second.stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("generate", "/nonexistent/pkg", "hi"), ("model package not found", "/nonexistent/pkg")),
        (("export", "/nonexistent/ckpt", "/tmp/never"), ("checkpoint not found",)),
        (("info", "/tmp"), ("has no edge_qwen.json",)),
    ],
)
def test_bad_paths_are_one_line_errors(args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    assert_one_line_error(run(*args), *needles)


def test_bad_values_are_one_line_errors(tiny_fp32: Path) -> None:
    assert_one_line_error(run("generate", str(tiny_fp32), "hi", "--max-tokens", "0"), "--max-tokens", "0")
    assert_one_line_error(run("generate", str(tiny_fp32), "hi", "--top-p", "1.5"), "top_p", "1.5")
    assert_one_line_error(run("generate", str(tiny_fp32), "hi", "--temperature", "-1"), "temperature", "-1")


def test_refused_checkpoint_is_a_one_line_error(tiny: TinyModel, tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(tiny.hf_dir, tmp_path / "llama"))
    config = json.loads((folder / "config.json").read_text()) | {"architectures": ["LlamaForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run("export", str(folder), str(tmp_path / "out")), "LlamaForCausalLM")
    assert not (tmp_path / "out").exists()


def test_generate_passes_sampling_options_stop_strings_and_provider(tiny_fp32: Path) -> None:
    options = {"temperature": 1.0, "seed": 3, "min_p": 0.05, "repetition_penalty": 1.2}
    options |= {"presence_penalty": 0.3, "frequency_penalty": 0.2, "max_tokens": 16}
    m = edge_qwen.load(tiny_fp32)
    full = m.generate("hello", **options)
    stop = full[3:5]
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    result = run(
        "generate", str(tiny_fp32), "hello", *args, "--stop", stop, "--stop", "never", "--provider", "cpu"
    )
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout
        == m.generate("hello", stop=[stop, "never"], **options) + "\n"
        == full[: full.find(stop)] + "\n"
    )


def test_generate_on_a_missing_provider_warns_and_runs_on_the_cpu(tiny_fp32: Path) -> None:
    result = run("generate", str(tiny_fp32), "hello", "--max-tokens", "4", "--provider", "coreml")
    assert result.returncode == 0, result.stderr
    assert "provider 'coreml' (CoreMLExecutionProvider) is not in this onnxruntime" in result.stderr
    assert "running on the CPU" in result.stderr


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--min-p", "2"), ("min_p", "2")),
        (("--repetition-penalty", "0"), ("repetition_penalty", "0")),
        (("--presence-penalty", "3"), ("presence_penalty", "3")),
        (("--stop", ""), ("stop",)),
        (("--provider", "tpu"), ("unknown provider 'tpu'", "xnnpack")),
        (("--threads", "0"), ("threads", "0")),
    ],
)
def test_bad_generate_options_are_one_line_errors(args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    # Options are checked before the package is read: the bad option is what the error names.
    assert_one_line_error(run("generate", "/nonexistent/pkg", "hi", *args), *needles)


def test_info_providers(tiny_fp32: Path) -> None:
    result = run("info", "--providers")
    assert result.returncode == 0, result.stderr
    assert "CPUExecutionProvider" in result.stdout and "cpu" in result.stdout
    found = json.loads(run("info", "--providers", "--json").stdout)
    assert {"name": "CPUExecutionProvider", "short_name": "cpu"} in found["available"]
    assert found["default_threads"] >= 1
    both = run("info", str(tiny_fp32), "--providers")
    assert "GroupQueryAttention" in both.stdout and "CPUExecutionProvider" in both.stdout
    assert_one_line_error(run("info"), "MODEL is required", "--providers")


def test_generate_beyond_the_context_is_a_one_line_error_naming_the_numbers(tiny_fp32: Path) -> None:
    result = run("generate", str(tiny_fp32), "hello", "--max-tokens", "5000")
    assert_one_line_error(result, "max_tokens (5000)", "> the context of 1024 tokens")


def test_info_says_whether_this_machine_has_the_prepacked_copy(
    tiny_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_QWEN_HOME", str(tmp_path))  # the subprocesses inherit it
    before = run("info", str(tiny_fp32))
    assert before.returncode == 0, before.stderr
    assert "none yet on this machine" in before.stdout
    assert run("generate", str(tiny_fp32), "hi", "--max-tokens", "1").returncode == 0  # a load writes it
    after = next(
        line for line in run("info", str(tiny_fp32)).stdout.splitlines() if line.startswith("prepacked")
    )
    [copy] = (tmp_path / "prepacked").iterdir()
    assert str(copy) in after and after.endswith(" MB)")
