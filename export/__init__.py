"""The export pipeline: checkpoints (Hugging Face folders, GGUF files) to model packages."""

from __future__ import annotations

import hashlib
from pathlib import Path


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
