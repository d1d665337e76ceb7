"""Load a model package: check its manifest and files, build the ONNX Runtime session, parse the tokenizer.

On the CPU the session is built from the package's prepacked copy for this machine (prepacked.py):
ONNX Runtime maps the weights it packed once instead of packing them again. The first load of a
package on a machine writes that copy, and so takes longer.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnxruntime as ort
from tokenizers import Tokenizer

from edge_qwen.errors import PackageError
from edge_qwen.heap import release_free_heap
from edge_qwen.model import Model
from edge_qwen.package import read_manifest
from edge_qwen.prepacked import prepacked_model
from edge_qwen.providers import cpuinfo_text, int8_fallback_warning, session_options, session_providers

log = logging.getLogger(__name__)

__all__ = ["load"]


def load(
    path: str | Path,
    provider: str = "cpu",
    provider_options: Mapping[str, Any] | None = None,
    threads: int | None = None,
    strict: bool = False,
    prepack: bool = True,
) -> Model:
    """Load a model package folder, checking its manifest and files first.

    `provider`: cpu, xnnpack, qnn, nnapi, coreml or an ONNX Runtime name. One the installed
    onnxruntime lacks falls back to the CPU with a warning, or raises when `strict`. `threads`
    defaults to the physical core count. `prepack=False` loads the package itself, packing the
    weights in memory, and writes nothing to the cache.
    """
    options = session_options(threads)  # bad options fail first, before any file is read
    providers = session_providers(provider, provider_options, strict, options.intra_op_num_threads)
    root = Path(path)
    manifest = read_manifest(root)
    on_cpu = len(providers) == 1  # the CPU alone: asked for, or fallen back to
    graph = root / "model.onnx"
    if on_cpu and prepack:
        # Other providers compile their nodes from the package's own graph.
        copy = prepacked_model(root)
        if copy is not None:
            graph = copy
            # The copy is the graph ONNX Runtime optimized for this CPU: optimizing it again finds
            # nothing and takes time.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # The tokenizer first: its parse's scratch (freed, then returned) peaks before the weights are
    # mapped rather than on top of them.
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    release_free_heap()
    try:
        session = ort.InferenceSession(str(graph), options, providers=providers)
    except Exception as e:  # ONNX Runtime raises its own exception types for bad graphs
        fix = "re-export the model" if on_cpu else f"provider {provider!r} may not run it: try provider='cpu'"
        raise PackageError(f"{root}: ONNX Runtime could not load model.onnx ({e}); {fix}") from e
    release_free_heap()  # what building the session freed: the graph's protobuf, optimizer scratch
    recipe = (manifest.raw.get("quantization") or {}).get("recipe") or {}
    warning = int8_fallback_warning(recipe, platform.machine(), cpuinfo_text())
    if warning:
        log.warning("%s", warning)
    return Model(root, manifest, session, tokenizer)
