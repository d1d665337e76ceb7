"""Weights packed once for this CPU, then mapped at every load: ONNX Runtime's prepacked-weights cache.

Building a session, ONNX Runtime packs every MatMulNBits weight into the layout its kernels for this
CPU read (at accuracy level 4 with the scales and block sums beside). Packing is most of a load's
work, and the packed buffers live on the heap: memory the kernel can neither reclaim nor share.

With `session.save_external_prepacked_constant_initializers`, ONNX Runtime also writes the optimized
graph and the packed weights to a file of its own format. A session built from that file maps the
packed weights instead of packing them: the load does no packing, and the weights sit in clean
file-backed pages that the kernel can drop under memory pressure and share between processes (a
chat and a server on one board), as llama.cpp's mapped GGUF does.

The packed layout depends on the CPU and on onnxruntime's version, so the copy is a cache, never part
of the package:

    $EDGE_QWEN_HOME/prepacked/<package folder name>-<key>/
        model.onnx, model.onnx.data    written by ONNX Runtime
        source.json                    what the key was made of, for people and for cleanup

The key hashes the package's manifest and graph, the size and modification time of each of its files,
onnxruntime's version, the architecture and the CPU's feature flags. A package copied to another
machine, or changed in place, or onnxruntime upgraded, makes a new key and so a new cache; the stale
one of the same package folder is removed when the new one is written. The cache is written into a
work folder and renamed into place, under a lock, so two processes never build it twice and a load
killed midway leaves nothing that a later load would take (package.work_dir sweeps its remains).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import onnxruntime as ort

from edge_qwen.package import MANIFEST, exclusive, home, sha256, work_dir
from edge_qwen.providers import cpuinfo_text

log = logging.getLogger(__name__)

MODEL = "model.onnx"
DATA = "model.onnx.data"
SOURCE = "source.json"
FOLDER = "prepacked"
# Initializers at least this large go to DATA, page-aligned, to be mapped; smaller ones stay in the graph.
EXTERNAL_MIN_BYTES = 1024


def cpu_signature(cpuinfo: str | None = None) -> str:
    """The architecture and the instruction-set features ONNX Runtime chooses its kernels by.

    On Linux the first processor's flags (x86 "flags", ARM "Features"), sorted; elsewhere what Python
    knows of the processor.
    """
    text = cpuinfo_text() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return f"{platform.machine()} {' '.join(sorted(value.split()))}"
    return f"{platform.machine()} {platform.processor()}"


def cache_key(package: Path, cpuinfo: str | None = None) -> dict[str, Any]:
    """What a prepacked copy of `package` depends on, with its hash under "key"."""
    files = sorted(p for p in package.iterdir() if p.is_file())
    stamps = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    h = sha256()
    # small: hashed whole; the weights by their manifest hash and stamp (onnxruntime-genai's folders
    # have genai_config.json instead of a manifest)
    manifest = MANIFEST if (package / MANIFEST).is_file() else "genai_config.json"
    for name in (manifest, MODEL):
        h.update((package / name).read_bytes())
    source = {
        "package": str(package.resolve()),
        "files": stamps,  # name -> [size, modification time in ns]
        "onnxruntime": ort.__version__,
        "cpu": cpu_signature(cpuinfo),
    }
    h.update(json.dumps(source, sort_keys=True).encode())
    return {**source, "key": h.hexdigest()[:16]}


def prepacked_model(package: Path, cache: Path | None = None) -> Path | None:
    """The prepacked copy of `package`'s graph for this machine, written first if there is none.

    Returns the copy's model.onnx, or None when it cannot be written (a read-only or full disk):
    the caller then loads the package itself, as ONNX Runtime packs it at every load. The reason
    is logged once as a warning.
    """
    source = cache_key(package)
    target = copy_folder(package, source, cache)
    root = target.parent
    if (target / SOURCE).is_file():
        return target / MODEL
    try:
        with exclusive(root, f"waiting for another process to pack {package.name}'s weights"):
            if not (target / SOURCE).is_file():  # not written meanwhile by the process we waited for
                write(package, target, source)
                remove_stale(root, source)
    except Exception as e:  # OSError, or ONNX Runtime's own error types (a full disk as it saves)
        log.warning("%s", _not_written(package, root, e))
        return None
    return target / MODEL


def _not_written(package: Path, root: Path, error: Exception) -> str:
    """One line: why the copy was not written, what the load does instead, and the fix."""
    detail = " ".join(str(error).split())  # ONNX Runtime's messages span lines; their end says what failed
    detail = detail if len(detail) <= 160 else "..." + detail[-157:]
    needed = 2 * (package / DATA).stat().st_size  # the copy: the weights as exported and as packed
    try:
        free = shutil.disk_usage(root if root.is_dir() else root.parent).free
    except OSError:
        free = None
    space = (
        f"; it needs about {needed / 1e6:.0f} MB, {free / 1e6:.0f} MB are free" if free is not None else ""
    )
    return (
        f"could not write the packed weights of {package} to {root} ({detail}{space}): loading without "
        "them, which packs them at every load; free some disk space or set EDGE_QWEN_HOME to another disk"
    )


def copy_folder(package: Path, source: dict[str, Any] | None = None, cache: Path | None = None) -> Path:
    """Where the prepacked copy of `package` for this machine is kept (whether or not it exists yet)."""
    key = (source or cache_key(package))["key"]
    return (cache or home()) / FOLDER / f"{package.resolve().name}-{key}"


def is_written(package: Path, cache: Path | None = None) -> bool:
    """Whether this machine has the prepacked copy of `package` already."""
    return (copy_folder(package, cache=cache) / SOURCE).is_file()


def write(package: Path, target: Path, source: dict[str, Any]) -> None:
    """Have ONNX Runtime pack `package`'s weights and save them with the optimized graph at `target`."""
    log.info("packing %s's weights for this CPU (once)", package)
    work = work_dir(target.parent, target.name)
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # its warning that the copy is for this machine only: we know
        options.optimized_model_filepath = str(work / MODEL)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_MIN_BYTES)
        )
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        ort.InferenceSession(str(package / MODEL), options, providers=["CPUExecutionProvider"])
        if not (work / DATA).is_file():
            raise OSError(f"ONNX Runtime wrote no {DATA}")
        (work / SOURCE).write_text(json.dumps(source, indent=1) + "\n")
        for name in (MODEL, DATA, SOURCE):  # on disk before the rename makes the copy real
            with open(work / name, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def remove_stale(root: Path, source: dict[str, Any]) -> list[Path]:
    """Remove the other prepacked copies of the same package folder (older keys); returns them."""
    removed = []
    for folder in root.iterdir():
        if folder.name.endswith(source["key"]) or not (folder / SOURCE).is_file():
            continue
        try:
            other = json.loads((folder / SOURCE).read_text())
        except (OSError, ValueError):
            continue
        if other.get("package") == source["package"]:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
