"""The prepacked-weights cache: written once per package and machine, safe to share, never stale."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import edge_qwen
from edge_qwen import prepacked
from edge_qwen.package import PARTIAL
from tests.conftest import TinyModel, export_tiny

REPO = Path(__file__).resolve().parents[1]
X86 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: sse2 avx2 fma avx512_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm fphp\nCPU part\t: 0xd0b\n"


@pytest.fixture(scope="module")
def int4(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tiny.hf_dir, tmp_path_factory.mktemp("int4") / "pkg", precision="int4")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGE_QWEN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def copies(home: Path) -> list[Path]:
    root = home / prepacked.FOLDER
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def logits(model: edge_qwen.Model) -> np.ndarray:
    ids = [5, 17, 99, 3, 250, 7]
    return np.stack([model.forward(ids[: i + 1], model.new_cache(8)) for i in range(len(ids))])


def test_first_load_writes_the_copy_and_later_loads_map_it(
    int4: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = logits(edge_qwen.load(int4, prepack=False))
    assert copies(home) == []  # prepack=False writes nothing
    first = edge_qwen.load(int4)
    [copy] = copies(home)
    assert {p.name for p in copy.iterdir()} == {"model.onnx", "model.onnx.data", "source.json"}
    # ONNX Runtime saved the packed weights: the copy's graph points at them in its data file.
    assert b"prepacked" in (copy / "model.onnx").read_bytes()

    def no_second_write(*args: object) -> None:
        raise AssertionError("the copy was written again")

    monkeypatch.setattr(prepacked, "write", no_second_write)
    second = edge_qwen.load(int4)
    # The packed weights compute what packing at load computes.
    np.testing.assert_array_equal(logits(first), plain)
    np.testing.assert_array_equal(logits(second), plain)
    assert second.generate("The capital", temperature=0, max_tokens=6) == edge_qwen.load(
        int4, prepack=False
    ).generate("The capital", temperature=0, max_tokens=6)


def test_the_key_follows_the_package_onnxruntime_and_cpu(int4: Path, tmp_path: Path) -> None:
    key = prepacked.cache_key(int4, X86)["key"]
    assert prepacked.cache_key(int4, X86)["key"] == key
    assert prepacked.cache_key(int4, ARM)["key"] != key
    assert prepacked.cache_key(int4, X86.replace(" avx512_vnni", ""))["key"] != key
    moved = shutil.copytree(int4, tmp_path / "elsewhere" / int4.name)  # same name, another folder
    assert prepacked.cache_key(moved, X86)["key"] != key
    data = moved / "model.onnx.data"
    before = prepacked.cache_key(moved, X86)["key"]
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # an edit in place
    assert prepacked.cache_key(moved, X86)["key"] != before


def test_another_onnxruntime_writes_a_new_copy_and_drops_the_old(
    int4: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edge_qwen.load(int4)
    [old] = copies(home)
    monkeypatch.setattr(ort, "__version__", ort.__version__ + ".post1")
    edge_qwen.load(int4)
    [new] = copies(home)
    assert new != old
    assert json.loads((new / "source.json").read_text())["onnxruntime"].endswith(".post1")


def test_a_copied_package_never_loads_the_original_copy(int4: Path, home: Path, tmp_path: Path) -> None:
    edge_qwen.load(int4)
    moved = shutil.copytree(int4, tmp_path / "moved")
    edge_qwen.load(moved)
    sources = {json.loads((c / "source.json").read_text())["package"] for c in copies(home)}
    assert sources == {str(int4.resolve()), str(moved.resolve())}


def test_cpu_signature_reads_the_flags_that_choose_kernels() -> None:
    assert prepacked.cpu_signature(X86).split()[1:] == ["avx2", "avx512_vnni", "fma", "sse2"]
    assert "asimddp" in prepacked.cpu_signature(ARM).split()
    assert prepacked.cpu_signature("") != prepacked.cpu_signature(X86)


def test_an_unwritable_cache_loads_without_it(
    int4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("EDGE_QWEN_HOME", str(blocked))
    with caplog.at_level(logging.WARNING, logger="edge_qwen.prepacked"):
        model = edge_qwen.load(int4)
    assert "loading without them" in caplog.text
    assert model.generate("The capital", temperature=0, max_tokens=4) == edge_qwen.load(
        int4, prepack=False
    ).generate("The capital", temperature=0, max_tokens=4)


KILLED_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from edge_qwen import prepacked
    def killed(src, dst):
        os.kill(os.getpid(), signal.SIGKILL)  # after ONNX Runtime wrote the files, before the rename
    prepacked.os.replace = killed
    prepacked.prepacked_model(Path(sys.argv[1]))
    """
)


def test_a_load_killed_while_writing_leaves_nothing_a_later_load_takes(int4: Path, home: Path) -> None:
    env = {**os.environ, "EDGE_QWEN_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(int4)], env=env, cwd=REPO)
    assert done.returncode == -signal.SIGKILL
    root = home / prepacked.FOLDER
    [partial] = [p for p in root.iterdir() if p.name.endswith(PARTIAL)]
    assert (partial / "model.onnx.data").is_file()  # the work folder was written, never renamed
    assert copies(home) == []
    model = edge_qwen.load(int4)
    assert not partial.exists()  # swept: its owner is dead
    assert len(copies(home)) == 1
    np.testing.assert_array_equal(logits(model), logits(edge_qwen.load(int4, prepack=False)))


RACE = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import edge_qwen
    print(edge_qwen.load(sys.argv[1]).generate("The capital", temperature=0, max_tokens=5))
    """
)


def test_two_processes_loading_at_once_write_one_copy(int4: Path, home: Path) -> None:
    env = {**os.environ, "EDGE_QWEN_HOME": str(home)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(int4)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    assert sum(err.count("packing") for _, err in outs) == 1  # one wrote it, the other waited and mapped it
    assert len(copies(home)) == 1


def test_a_tokenizer_that_does_not_parse_is_a_package_error(int4: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(int4, tmp_path / "broken")
    size = (broken / "tokenizer.json").stat().st_size
    (broken / "tokenizer.json").write_bytes(b"{" + b" " * (size - 1))  # same size: only a parse tells
    with pytest.raises(edge_qwen.PackageError, match=r"tokenizer.json does not parse.*re-export"):
        edge_qwen.load(broken)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KB file system (a tmpfs; needs root, as in CI), too small for any prepacked copy."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_gives_one_line_and_loads_without_the_copy(
    int4: Path, full_disk: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("EDGE_QWEN_HOME", str(full_disk))
    with caplog.at_level(logging.WARNING, logger="edge_qwen.prepacked"):
        model = edge_qwen.load(int4)
    [warning] = [r.getMessage() for r in caplog.records]
    assert "\n" not in warning and "MB are free" in warning and "EDGE_QWEN_HOME" in warning
    assert list((full_disk / prepacked.FOLDER).iterdir()) == []  # nothing half-written left behind
    np.testing.assert_array_equal(logits(model), logits(edge_qwen.load(int4, prepack=False)))
