"""Load a model package: check its manifest and files, build the ONNX Runtime session, parse the tokenizer.

On the CPU the session is built from the package's prepacked copy for this machine (prepacked.py):
ONNX Runtime maps the weights it packed once instead of packing them again. The first load of a
package on a machine writes that copy, and so takes longer.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import onnxruntime as ort
from tokenizers import Tokenizer

from edge_qwen.engine import parse_tokenizer
from edge_qwen.errors import PackageError
from edge_qwen.heap import release_free_heap
from edge_qwen.model import Model
from edge_qwen.package import read_manifest
from edge_qwen.prepacked import prepacked_model
from edge_qwen.providers import cpuinfo_text, int8_fallback_warning, session_options, session_providers

log = logging.getLogger(__name__)

HEAD_START_SECONDS = 0.03

__all__ = ["load"]


def load(
    path: str | Path,
    provider: str = "cpu",
    provider_options: Mapping[str, Any] | None = None,
    threads: int | None = None,
    strict: bool = False,
    prepack: bool = True,
    verify: bool = False,
) -> Model:
    """Load a model package folder, checking its manifest and files first.

    `provider`: cpu, xnnpack, qnn, nnapi, coreml or an ONNX Runtime name. One the installed
    onnxruntime lacks falls back to the CPU with a warning, or raises when `strict`. `threads`
    defaults to the physical core count. `prepack=False` loads the package itself, packing the
    weights in memory, and writes nothing to the cache. Every load checks that each file the
    manifest lists is there at its full size; `verify=True` also checks their sha256 (reading every
    byte: 0.3-0.8 s for the 0.5B INT4 package on a 2-core x86), which catches a same-size edit.
    """
    options = session_options(threads)  # bad options fail first, before any file is read
    providers = session_providers(provider, provider_options, strict, options.intra_op_num_threads)
    root = Path(path)
    manifest = read_manifest(root, verify_hashes=verify)
    if manifest.raw.get("kind") == "npu":  # static parts over a fixed window (edge_qwen/npu.py)
        from edge_qwen.npu import load_npu

        return load_npu(root, manifest, options, providers)
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
    # The tokenizer parses in a thread while this one builds the session (~0.3 s each for the 0.5B).
    # The parse holds the GIL throughout, and the build's first steps are Python: the parse starts
    # once those are done, when ONNX Runtime's C++ builds the session without the GIL.
    with ThreadPoolExecutor(1, thread_name_prefix="edge-qwen-tokenizer") as pool:
        parsing = pool.submit(_parse_after, HEAD_START_SECONDS, root)
        try:
            session = ort.InferenceSession(str(graph), options, providers=providers)
        except Exception as e:  # ONNX Runtime raises its own exception types for bad graphs
            fix = (
                "re-export the model"
                if on_cpu
                else f"provider {provider!r} may not run it: try provider='cpu'"
            )
            raise PackageError(f"{root}: ONNX Runtime could not load model.onnx ({e}); {fix}") from e
        tokenizer = parsing.result()
    release_free_heap()  # the parse's and the build's scratch
    recipe = (manifest.raw.get("quantization") or {}).get("recipe") or {}
    warning = int8_fallback_warning(recipe, platform.machine(), cpuinfo_text())
    if warning:
        log.warning("%s", warning)
    return Model(root, manifest, session, tokenizer)


def _parse_after(seconds: float, root: Path) -> Tokenizer:
    time.sleep(seconds)
    return parse_tokenizer(root)
