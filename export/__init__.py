"""The export pipeline: checkpoints (Hugging Face folders, GGUF files) to model packages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from edge_qwen.package import MANIFEST

if TYPE_CHECKING:
    from edge_qwen.config import QwenConfig
    from edge_qwen.export.options import ExportOptions


def source_fingerprint() -> str:
    """A short hash of the exporter's own source (export/ and quant/, the recipes included).

    It changes whenever a re-export could give different files: caches of exported packages (the
    benchmarks', the real-model tests') key on it.
    """
    from edge_qwen import quant

    h = hashlib.sha256()
    for folder in (Path(__file__).parent, Path(quant.__file__).parent):
        for file in sorted(folder.rglob("*.py")):
            h.update(file.read_bytes())
    return h.hexdigest()[:12]


def is_current(package: Path, opts: ExportOptions, config: QwenConfig) -> bool:
    """Whether a cached `package` was exported by this source with `opts`' recipe and accuracy level."""
    manifest, marker = package / MANIFEST, _marker(package)
    if not manifest.is_file() or not marker.is_file() or marker.read_text() != source_fingerprint():
        return False
    from edge_qwen.export.options import GGUF_EXACT  # options imports this package

    quantization = json.loads(manifest.read_text())["quantization"]
    if opts.algo == GGUF_EXACT:  # the recipe is the GGUF's own (export/writer.py records its types)
        same_recipe = "gguf blocks, exactly" in quantization["recipe"]
    else:
        same_recipe = quantization["recipe"] == opts.recipe_for(config).to_dict()
    return same_recipe and quantization["accuracy_level"] == opts.accuracy_level


def mark_current(package: Path) -> Path:
    """Record (next to it) which exporter source wrote `package`, for is_current."""
    _marker(package).write_text(source_fingerprint())
    return package


def _marker(package: Path) -> Path:
    return package.with_name(package.name + ".exported-by")
