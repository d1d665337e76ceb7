"""Checkpoint reading, the package on disk, and the clear errors for each kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edge_qwen
from edge_qwen.config import QwenConfig
from edge_qwen.errors import PackageError
from edge_qwen.export import writer
from edge_qwen.export.hf_reader import read_hf_folder
from edge_qwen.package import read_manifest
from tests.conftest import TinyModel, export_tiny


def copy_hf(tiny: TinyModel, dest: Path) -> Path:
    return Path(shutil.copytree(tiny.hf_dir, dest))


def test_config_reads_rope_theta_from_transformers_5_rope_parameters(tiny: TinyModel) -> None:
    raw = json.loads((tiny.hf_dir / "config.json").read_text())
    assert QwenConfig.from_hf(raw).rope_theta == 123456.0
    legacy = {k: v for k, v in raw.items() if k != "rope_parameters"} | {"rope_theta": 5e5}
    assert QwenConfig.from_hf(legacy).rope_theta == 5e5


def test_other_architecture_is_refused_by_name(tiny: TinyModel, tmp_path: Path) -> None:
    folder = copy_hf(tiny, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text()) | {"architectures": ["LlamaForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture LlamaForCausalLM"):
        read_hf_folder(folder)


def test_pickle_weights_are_refused(tiny: TinyModel, tmp_path: Path) -> None:
    folder = copy_hf(tiny, tmp_path / "pickle")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle weights .*pytorch_model.bin"):
        read_hf_folder(folder)


def test_rope_scaling_is_refused(tiny: TinyModel) -> None:
    raw = json.loads((tiny.hf_dir / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    with pytest.raises(ValueError, match="unsupported RoPE scaling"):
        QwenConfig.from_hf(raw)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_and_sharded_checkpoints_read_without_torch(
    tiny: TinyModel, tmp_path: Path, dtype: str
) -> None:
    import torch
    from transformers import Qwen2ForCausalLM

    ref = Qwen2ForCausalLM.from_pretrained(tiny.hf_dir, dtype=getattr(torch, dtype))
    out = tmp_path / dtype
    ref.save_pretrained(out, safe_serialization=True, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny.hf_dir / name, out / name)
    assert (out / "model.safetensors.index.json").is_file(), "the checkpoint should be sharded"
    ckpt = read_hf_folder(out)
    for name, param in ref.state_dict().items():
        if name in ckpt.names:
            np.testing.assert_array_equal(ckpt.tensor(name), param.float().numpy(), err_msg=name)


def test_missing_shard_is_named(tiny: TinyModel, tmp_path: Path) -> None:
    from transformers import Qwen2ForCausalLM

    out = tmp_path / "sharded"
    Qwen2ForCausalLM.from_pretrained(tiny.hf_dir).save_pretrained(out, max_shard_size="60KB")
    shard = sorted(out.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        read_hf_folder(out)


def test_manifest_lists_every_file_with_its_hash(tiny_fp32: Path) -> None:
    manifest = read_manifest(tiny_fp32, verify_hashes=True)
    on_disk = {p.name for p in tiny_fp32.iterdir()} - {"edge_qwen.json"}
    assert set(manifest.files) == on_disk
    assert {
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "tokenizer_config.json",
        "genai_config.json",
        "config.json",
        "generation_config.json",
    } <= on_disk
    assert manifest.precision == "fp32" and manifest.logits == "all"
    assert manifest.inputs[:2] == ("input_ids", "attention_mask") and manifest.outputs[0] == "logits"
    assert manifest.raw["op_counts"]["GroupQueryAttention"] == manifest.config.num_hidden_layers


def test_external_weights_are_4k_aligned(tiny_fp32: Path) -> None:
    import onnx

    model = onnx.load(str(tiny_fp32 / "model.onnx"), load_external_data=False)
    offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % 4096 == 0 for o in offsets)


@pytest.mark.parametrize("victim", ["model.onnx.data", "tokenizer.json", "edge_qwen.json"])
def test_missing_package_file_is_a_clear_error(tiny_fp32: Path, tmp_path: Path, victim: str) -> None:
    pkg = Path(shutil.copytree(tiny_fp32, tmp_path / "pkg"))
    (pkg / victim).unlink()
    with pytest.raises(PackageError, match=victim):
        edge_qwen.load(pkg)


def test_truncated_weights_are_a_clear_error(tiny_fp32: Path, tmp_path: Path) -> None:
    pkg = Path(shutil.copytree(tiny_fp32, tmp_path / "pkg"))
    data = pkg / "model.onnx.data"
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(PackageError, match="model.onnx.data has .* bytes, the manifest says"):
        edge_qwen.load(pkg)


def test_corrupted_file_fails_hash_check(tiny_fp32: Path, tmp_path: Path) -> None:
    pkg = Path(shutil.copytree(tiny_fp32, tmp_path / "pkg"))
    with open(pkg / "model.onnx.data", "r+b") as f:
        f.seek(5000)
        f.write(b"\x13\x37")
    read_manifest(pkg)  # sizes still match: only the hash check sees it
    with pytest.raises(PackageError, match="sha256"):
        read_manifest(pkg, verify_hashes=True)


def test_interrupted_export_leaves_nothing_behind(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "save_model", explode)
    with pytest.raises(KeyboardInterrupt):
        export_tiny(tiny.hf_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny: TinyModel, tiny_fp32: Path, tmp_path: Path) -> None:
    out = export_tiny(tiny.hf_dir, tmp_path / "pkg")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_tiny(tiny.hf_dir, out)
    from edge_qwen.export.options import ExportOptions
    from edge_qwen.export.readers import read_checkpoint

    writer.write_package(
        read_checkpoint(tiny.hf_dir),
        out,
        ExportOptions(precision="fp16"),
        overwrite=True,
        show_progress=False,
    )
    assert read_manifest(out).precision == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_max_context_above_the_model_maximum_is_refused(tiny: TinyModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_context 4096 exceeds the model's max_position_embeddings 1024"):
        export_tiny(tiny.hf_dir, tmp_path / "pkg", max_context=4096)
    assert not (tmp_path / "pkg").exists()


def test_the_package_namespace_loads_its_names_on_first_use() -> None:
    """`import edge_qwen` and the command's start stay cheap (no numpy, no ONNX Runtime until a
    command needs them), and every public name resolves to what its home module defines."""
    code = (
        "import sys, edge_qwen, edge_qwen.apps.cli\n"
        "print(sorted(m for m in ('numpy', 'onnxruntime', 'tokenizers') if m in sys.modules))\n"
        "print(all(getattr(edge_qwen, n).__module__ == home for n, home in edge_qwen._HOMES.items()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "True"]
    assert sorted(edge_qwen.__all__) == sorted([*edge_qwen._HOMES, "__version__"])
    with pytest.raises(AttributeError):
        edge_qwen.not_a_name  # noqa: B018
