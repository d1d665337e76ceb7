"""Bad checkpoints: each is one clear ValueError / FileNotFoundError from the reader, and one line and
exit 1 from `edge-qwen export`, with nothing written at OUT.

Pickle weights (never unpickled), configs of other architectures, missing shards, truncated GGUF
files or GGUF files of another architecture, and tensors whose shape does not match the config.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tests.gguf_writer as gguf_writer
from edge_qwen.export.readers import read_checkpoint
from tests.test_cli import assert_one_line_error, run
from tests.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "hf", tied=False, seed=9)


@pytest.fixture
def copy(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "hf"))


def assert_export_refused(source: Path, out: Path, *needles: str) -> None:
    assert_one_line_error(run("export", str(source), str(out), "--precision", "fp32"), *needles)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


class _Payload:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_pickle_weights_are_refused_and_never_unpickled(copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "the-pickle-ran"
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="pickle weights .*pytorch_model.bin.*safetensors"):
        read_checkpoint(copy)
    assert_export_refused(copy, tmp_path / "out", "pickle", "safetensors")
    assert not marker.exists()
    pickle.loads((copy / "pytorch_model.bin").read_bytes())  # the payload works when unpickled
    assert marker.exists()


@pytest.mark.parametrize(
    "architecture",
    ["LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen2VLForConditionalGeneration", "Qwen2MoeForCausalLM"],
)
def test_configs_of_other_architectures_are_refused_by_name(
    copy: Path, tmp_path: Path, architecture: str
) -> None:
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = [architecture]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"unsupported architecture {architecture}: .*Qwen2ForCausalLM"):
        read_checkpoint(copy)
    if architecture == "Qwen3ForCausalLM":
        assert_export_refused(copy, tmp_path / "out", architecture, "Qwen2ForCausalLM")


def test_a_shard_listed_in_the_index_but_missing_is_named(copy: Path, tmp_path: Path) -> None:
    tensors = load_file(copy / "model.safetensors")
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({n: tensors[n] for n in first}, copy / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map |= {n: "model-00002-of-00002.safetensors" for n in second}
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (copy / "model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match="shard model-00002-of-00002.safetensors named in .* is missing"
    ):
        read_checkpoint(copy)
    assert_export_refused(copy, tmp_path / "out", "model-00002-of-00002.safetensors", "missing")


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("model.layers.1.self_attn.k_proj.weight", None),  # transposed
        ("model.layers.0.mlp.down_proj.weight", "one row fewer"),
        ("model.norm.weight", "one row fewer"),
    ],
)
def test_a_tensor_of_the_wrong_shape_is_named(copy: Path, name: str, shape: str | None) -> None:
    tensors = load_file(copy / "model.safetensors")
    tensors[name] = np.ascontiguousarray(tensors[name].T if shape is None else tensors[name][:-1])
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(ValueError, match=f"tensor {name} has shape .* but the model's config implies"):
        read_checkpoint(copy)


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    gguf_writer.write_tiny_gguf(path)
    return path


@pytest.mark.parametrize("keep", [3, 8, 20, 100, 2000, "half", "all but 1"])
def test_a_truncated_gguf_is_one_clear_error(tiny_gguf: Path, tmp_path: Path, keep: int | str) -> None:
    data = tiny_gguf.read_bytes()
    n = len(data) // 2 if keep == "half" else len(data) - 1 if keep == "all but 1" else int(keep)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:n])
    with pytest.raises(ValueError, match=r"cut\.gguf is not (a valid|a) GGUF file"):
        read_checkpoint(cut)
    if keep in (20, "half"):
        assert_export_refused(cut, tmp_path / "out", "cut.gguf", "GGUF")


def test_a_gguf_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    gguf_writer.write_tiny_gguf(path, arch="llama")
    assert_export_refused(path, tmp_path / "out", "unsupported GGUF architecture 'llama'")


def test_a_gguf_tensor_of_the_wrong_shape_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = gguf_writer.tiny_tensors

    def with_a_short_bias(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
        tensors = made(vocab, tied, seed)
        tensors["blk.0.attn_v.bias"] = tensors["blk.0.attn_v.bias"][:-2]
        return tensors

    monkeypatch.setattr(gguf_writer, "tiny_tensors", with_a_short_bias)
    path = tmp_path / "short.gguf"
    gguf_writer.write_tiny_gguf(path)
    with pytest.raises(
        ValueError,
        match=r"model.layers.0.self_attn.v_proj.bias has shape \[14\], but the model.s config implies \[16\]",
    ):
        read_checkpoint(path)


def test_a_file_that_is_neither_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "weights.txt"
    path.write_text("not a model")
    assert_export_refused(path, tmp_path / "out", "neither a Hugging Face model folder nor a .gguf file")
