"""Bad model packages: each is one PackageError from the library and one line + exit 1 from the CLI.

Missing, truncated and edited files; a manifest of a newer format or another architecture; folders
that are not packages at all. Sizes are checked on every load, hashes by `edge-qwen check` and
`load(verify=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import edge_qwen
from edge_qwen.errors import PackageError
from edge_qwen.package import read_manifest
from tests.conftest import export_tiny
from tests.test_cli import assert_one_line_error, run
from tests.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("packages")
    return export_tiny(make_tiny_checkpoint(root / "hf", tied=True, seed=7), root / "pkg")


@pytest.fixture
def copy(package: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(package, tmp_path / "pkg"))


def edit_manifest(pkg: Path, **changes: object) -> None:
    manifest = json.loads((pkg / "edge_qwen.json").read_text())
    manifest.update(changes)
    (pkg / "edge_qwen.json").write_text(json.dumps(manifest))


def flip_a_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_the_intact_package_loads_and_checks(package: Path) -> None:
    edge_qwen.load(package, verify=True)
    result = run("check", str(package))
    assert result.returncode == 0 and "files match the manifest" in result.stdout, result.stderr


@pytest.mark.parametrize(
    "victim", ["model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"]
)
def test_a_missing_file_is_named(copy: Path, victim: str) -> None:
    (copy / victim).unlink()
    with pytest.raises(PackageError, match=f"{victim} is missing.*re-export"):
        edge_qwen.load(copy)


def test_truncated_weights_are_named_with_both_sizes_in_the_cli(copy: Path) -> None:
    data = copy / "model.onnx.data"
    full = data.stat().st_size
    os.truncate(data, full - 4096)
    result = run("generate", str(copy), "hello", "--max-tokens", "2")
    assert_one_line_error(result, "model.onnx.data has", str(full - 4096), str(full), "re-export")
    assert result.stdout == ""  # no partial output


def test_a_longer_tokenizer_config_is_caught_by_its_size(copy: Path) -> None:
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ 'pwned' }}"
    (copy / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n" * 400)
    with pytest.raises(PackageError, match="tokenizer_config.json has .* bytes, the manifest says"):
        edge_qwen.load(copy)


@pytest.mark.parametrize("victim", ["model.onnx.data", "tokenizer_config.json", "model.onnx"])
def test_a_same_size_edit_is_caught_by_its_hash(copy: Path, victim: str) -> None:
    flip_a_byte(copy / victim, (copy / victim).stat().st_size // 2)
    read_manifest(copy)  # the sizes still match: a plain load checks only those
    with pytest.raises(PackageError, match=f"{victim} does not match its sha256"):
        edge_qwen.load(copy, verify=True)
    assert_one_line_error(run("check", str(copy)), victim, "sha256", "re-export")


def test_a_newer_format_version_asks_for_an_upgrade(copy: Path) -> None:
    edit_manifest(copy, format_version=2)
    with pytest.raises(PackageError, match="format version 2 is not supported.*upgrade edge-qwen"):
        edge_qwen.load(copy)
    assert_one_line_error(run("info", str(copy)), "format version 2", "upgrade edge-qwen")


def test_a_manifest_of_another_architecture_is_refused(copy: Path) -> None:
    edit_manifest(copy, architecture="LlamaForCausalLM")
    with pytest.raises(
        PackageError, match="holds a LlamaForCausalLM model; edge-qwen runs Qwen2ForCausalLM only"
    ):
        edge_qwen.load(copy)


def test_an_onnxruntime_genai_folder_of_another_model_is_refused(copy: Path) -> None:
    (copy / "edge_qwen.json").unlink()
    genai = json.loads((copy / "genai_config.json").read_text())
    genai["model"]["type"] = "phi3"
    (copy / "genai_config.json").write_text(json.dumps(genai))
    with pytest.raises(PackageError, match="model type 'phi3'; edge-qwen runs Qwen2"):
        edge_qwen.load(copy)


def test_a_model_folder_of_another_architecture_says_what_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "llama-onnx"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(PackageError, match="not an edge-qwen package but a LlamaForCausalLM model folder"):
        edge_qwen.load(folder)


@pytest.mark.parametrize("what", ["empty folder", "a file", "random files"])
def test_what_is_not_a_package_is_one_line(tmp_path: Path, what: str) -> None:
    target = tmp_path / "thing"
    if what == "a file":
        target.write_text("hello")
    else:
        target.mkdir()
        if what == "random files":
            (target / "notes.txt").write_text("nothing to see")
            (target / "model.onnx").write_bytes(os.urandom(256))
    with pytest.raises(PackageError, match="not a model package folder|not an edge-qwen package"):
        edge_qwen.load(target)
    assert_one_line_error(run("generate", str(target), "hi"), str(target), "edge-qwen export")


@pytest.mark.parametrize(
    "files",
    [
        {"../../etc/passwd": {"size": 1, "sha256": "0"}},
        {"/etc/passwd": {"size": 1, "sha256": "0"}},
        {"model.onnx": {"size": "big", "sha256": "0"}},
        {"model.onnx": {"size": -1, "sha256": "0"}},
        ["model.onnx"],
        {"model.onnx": {"size": 1}},  # found by fuzzing: a KeyError under verify_hashes
    ],
    ids=["parent", "absolute", "size-text", "size-negative", "list", "no-sha256"],
)
def test_a_manifest_file_list_that_leaves_the_folder_or_lies_is_refused(copy: Path, files: object) -> None:
    edit_manifest(copy, files=files)
    with pytest.raises(PackageError, match="edge_qwen.json is corrupted"):
        read_manifest(copy, verify_hashes=True)


def test_a_manifest_that_is_not_json_or_is_huge_is_refused(copy: Path) -> None:
    (copy / "edge_qwen.json").write_bytes(b"\xff\xfe{not json")
    with pytest.raises(PackageError, match="edge_qwen.json is corrupted"):
        edge_qwen.load(copy)
    with open(copy / "edge_qwen.json", "wb") as f:
        f.truncate(64 << 20)  # sparse: takes no disk
    with pytest.raises(PackageError, match="bytes: not a manifest"):
        edge_qwen.load(copy)
