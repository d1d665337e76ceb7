"""The model package on disk: the manifest `edge_qwen.json`, its checks, and atomic writes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_qwen.errors import PackageError
from edge_qwen.manifest import FORMAT, FORMAT_VERSION, MANIFEST, Manifest  # noqa: F401  (their home before)

log = logging.getLogger(__name__)

WEIGHTS = "model.onnx.data"  # every initializer's bytes (export/graph.py)
MAX_MANIFEST_BYTES = 16 << 20  # ~3 kB in practice: anything this large is not a manifest


def read_manifest(path: str | Path, verify_hashes: bool = False) -> Manifest:
    """Read a package's manifest and check every file it lists: present, full size (and hash)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"model package not found: {root}")
    if not root.is_dir():
        raise PackageError(f"{root} is not a model package folder (export one with `edge-qwen export`)")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file() and (root / "genai_config.json").is_file():
        from edge_qwen.genai_folder import genai_manifest  # a folder of onnxruntime-genai's builder

        return genai_manifest(root)
    if not manifest_path.is_file():
        raise PackageError(
            f"{root} has no {MANIFEST}: not an edge-qwen package{_other_model(root)}, or its export "
            "did not finish (export one with `edge-qwen export`)"
        )
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise PackageError(f"{manifest_path} is {manifest_path.stat().st_size} bytes: not a manifest")
    try:
        manifest = Manifest.from_dict(json.loads(manifest_path.read_bytes()))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
        if isinstance(e, PackageError):
            raise
        raise PackageError(f"{manifest_path} is corrupted ({e}): re-export the model") from e
    for name, meta in manifest.files.items():
        file = root / name
        if not file.is_file():
            raise PackageError(f"{root}: {name} is missing: the package is incomplete, re-export it")
        size = file.stat().st_size
        if size != meta["size"]:
            raise PackageError(
                f"{root}: {name} has {size} bytes, the manifest says {meta['size']}: truncated or replaced, "
                "re-export it"
            )
        if verify_hashes and sha256_file(file) != meta["sha256"]:
            raise PackageError(f"{root}: {name} does not match its sha256 in the manifest: re-export it")
    return manifest


def _other_model(root: Path) -> str:
    """', but a <architecture> model' when the folder's config.json names one, else ''."""
    try:
        config = json.loads((root / "config.json").read_bytes()[:MAX_MANIFEST_BYTES])
        architectures = config.get("architectures") or [config["model_type"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""
    return f" but a {', '.join(map(str, architectures))} model folder"


def sha256() -> Any:
    """A new hashlib.sha256(). hashlib is imported here, not with the module: it loads libcrypto
    (~3.5 MB resident), which only downloads and hash checks need."""
    import hashlib

    return hashlib.sha256()


def sha256_file(path: Path) -> str:
    h = sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def home() -> Path:
    """edge-qwen's cache folder: $EDGE_QWEN_HOME, or ~/.cache/edge-qwen (downloads, packages, and the
    prepacked copies of packages for this machine)."""
    configured = os.environ.get("EDGE_QWEN_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "edge-qwen"


# ---- atomic writes: work folders and locks ------------------------------------------------------

PARTIAL = ".partial"
# A work folder that names no owner (made before owners were recorded) is stale after this long.
UNOWNED_STALE_SECONDS = 24 * 3600


def work_dir(parent: Path, stem: str) -> Path:
    """A fresh hidden folder `.<stem>.<pid>.<random>.partial` in `parent`, for work that becomes real
    by a rename; first, work folders of runs that died before cleaning up (SIGKILL, power loss) are
    removed, so that they do not fill a small card.
    """
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_work(parent)
    return Path(tempfile.mkdtemp(prefix=f".{stem}.{os.getpid()}.", suffix=PARTIAL, dir=parent))


def sweep_stale_work(parent: Path) -> list[Path]:
    """Remove the `.partial` work folders in `parent` whose owner process is gone; returns them."""
    removed = []
    for path in parent.glob(f".*{PARTIAL}"):
        if path.is_dir() and not _owner_alive(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _owner_alive(path: Path) -> bool:
    fields = path.name[: -len(PARTIAL)].split(".")
    pid = int(fields[-2]) if len(fields) >= 3 and fields[-2].isdigit() else None
    if pid is None:
        return time.time() - path.stat().st_mtime < UNOWNED_STALE_SECONDS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


@contextmanager
def exclusive(folder: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` itself (made if missing; no lock file is left) within; log
    `waiting` once if another process holds it. Where there is no fcntl (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s", waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
