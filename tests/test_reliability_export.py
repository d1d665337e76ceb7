"""Export under faults: killed at any point, out of disk, over an existing package.

Each kill is a real SIGKILL of a child process running the export, sent by the child to itself at a
chosen step (the step's function wrapped in the child only), or by this process after a delay.
Whatever the point, nothing at OUT may load as a package unless it is a complete one, and the next
export must succeed and leave no debris.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_qwen.package import read_manifest
from tests.conftest import export_tiny
from tests.test_cli import assert_one_line_error, run
from tests.tiny import make_tiny_checkpoint

# Runs an export of argv[1] to argv[2] at precision argv[3] (argv[4] == "force": over an existing
# package) and SIGKILLs itself at the step named argv[5].
CHILD = r"""
import os, signal, sys
from pathlib import Path
from edge_qwen.export import writer
from edge_qwen.export.options import ExportOptions
from edge_qwen.export.readers import read_checkpoint

source, out, precision, mode, point = sys.argv[1:6]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def before(fn, when=lambda *a, **k: True):
    def wrapped(*a, **k):
        if when(*a, **k):
            die()
        return fn(*a, **k)
    return wrapped

def after(fn, when):
    def wrapped(*a, **k):
        result = fn(*a, **k)
        if when(*a, **k):
            die()
        return result
    return wrapped

renames = []
if point == "weights-written":  # model.onnx.data complete, no graph yet
    writer.save_model = before(writer.save_model)
elif point == "files-written":  # every file but the manifest
    writer.sha256_file = before(writer.sha256_file)
elif point == "manifest-written":  # a complete package, still in its work folder
    writer._write_json = after(writer._write_json, lambda path, obj: path.name == "edge_qwen.json")
elif point == "old-moved-aside":  # --force: the old package renamed away, the new one not yet in
    os.replace = after(os.replace, lambda src, dst: renames.append(dst) or len(renames) == 1)
elif point == "none":
    pass
else:
    raise SystemExit(f"unknown point {point}")
writer.write_package(
    read_checkpoint(source), Path(out), ExportOptions(precision=precision),
    overwrite=mode == "force", show_progress=False,
)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "hf", tied=True, seed=5)


def export_child(checkpoint: Path, out: Path, precision: str, mode: str, point: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", CHILD, str(checkpoint), str(out), precision, mode, point]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def state(out: Path) -> str:
    """'absent', or the precision of the complete package at `out` (every hash checked)."""
    if not out.exists():
        return "absent"
    return read_manifest(out, verify_hashes=True).precision


def assert_rerun_succeeds_and_cleans_up(checkpoint: Path, out: Path) -> None:
    from edge_qwen.export.options import ExportOptions
    from edge_qwen.export.readers import read_checkpoint
    from edge_qwen.export.writer import write_package

    ckpt = read_checkpoint(checkpoint)
    write_package(ckpt, out, ExportOptions(precision="int8"), overwrite=True, show_progress=False)
    assert state(out) == "int8"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no work folder, no old package


@pytest.mark.parametrize("point", ["weights-written", "files-written", "manifest-written"])
def test_export_killed_at_a_step_leaves_nothing_that_loads(
    checkpoint: Path, tmp_path: Path, point: str
) -> None:
    out = tmp_path / "pkg"
    child = export_child(checkpoint, out, "fp32", "new", point)
    _, err = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, err
    assert state(out) == "absent"
    debris = [p.name for p in tmp_path.iterdir()]
    assert len(debris) == 1 and debris[0].startswith(".pkg.") and debris[0].endswith(".partial"), debris
    assert_rerun_succeeds_and_cleans_up(checkpoint, out)


@pytest.mark.parametrize("point", ["files-written", "old-moved-aside"])
def test_force_over_a_package_killed_leaves_the_old_one_or_none(
    checkpoint: Path, tmp_path: Path, point: str
) -> None:
    out = export_tiny(checkpoint, tmp_path / "pkg", precision="fp16")
    child = export_child(checkpoint, out, "fp32", "force", point)
    _, err = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, err
    # Killed before the swap, the old package is untouched; during it, OUT is briefly absent.
    assert state(out) == ("fp16" if point == "files-written" else "absent")
    assert_rerun_succeeds_and_cleans_up(checkpoint, out)


def test_export_killed_after_random_delays_never_leaves_a_broken_package(
    checkpoint: Path, tmp_path: Path
) -> None:
    started = time.perf_counter()
    child = export_child(checkpoint, tmp_path / "timing" / "pkg", "fp32", "new", "none")
    assert child.wait(timeout=300) == 0
    duration = time.perf_counter() - started
    for i, fraction in enumerate((0.3, 0.6, 0.8, 0.9, 0.97)):
        out = tmp_path / f"run{i}" / "pkg"
        child = export_child(checkpoint, out, "fp32", "new", "none")
        time.sleep(duration * fraction)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=300)
        # Wherever it died (or if it finished first), OUT is absent or a complete, verified package.
        assert state(out) in ("absent", "fp32")
        assert_rerun_succeeds_and_cleans_up(checkpoint, out)


def test_export_over_a_package_asks_for_force_and_force_replaces_it(checkpoint: Path, tmp_path: Path) -> None:
    out = export_tiny(checkpoint, tmp_path / "pkg", precision="fp16")
    manifest = (out / "edge_qwen.json").read_bytes()
    result = run("export", str(checkpoint), str(out), "--precision", "fp32")
    assert_one_line_error(result, "already exists", "--force")
    assert (out / "edge_qwen.json").read_bytes() == manifest
    result = run("export", str(checkpoint), str(out), "--precision", "fp32", "--force")
    assert result.returncode == 0, result.stderr
    assert state(out) == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def assert_export_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 1 and, besides the progress bar's lines, one error line holding every needle."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("export:")]
    assert len(errors) == 1 and errors[0].startswith("Error: "), result.stderr
    assert all(needle in errors[0] for needle in needles), errors[0]


def export_with_file_size_limit(
    checkpoint: Path, out: Path, limit_bytes: int
) -> subprocess.CompletedProcess[str]:
    """The CLI's export with writes beyond `limit_bytes` per file failing (EFBIG), as a full disk would."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    cmd = [
        sys.executable,
        "-m",
        "edge_qwen.apps.cli",
        "export",
        str(checkpoint),
        str(out),
        "--precision",
        "fp32",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit)


def test_a_file_size_limit_is_one_line_and_leaves_nothing(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    result = export_with_file_size_limit(checkpoint, out, 64 * 1024)  # the weights take ~700 kB
    assert_export_error(result, "no room to write the package", "File too large", "nothing was left behind")
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder`; skips the test where mounting is not allowed (not root)."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if shutil.which("mount") is None or mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(checkpoint: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        result = run("export", str(checkpoint), str(disk / "pkg"), "--precision", "fp32")
        assert_export_error(result, "no room to write the package", "No space left on device")
        assert list(disk.iterdir()) == []
