"""Load a model package: check its manifest and files, build the ONNX Runtime session, parse the tokenizer."""

from __future__ import annotations

import logging
import os
import platform
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from edge_qwen.errors import PackageError
from edge_qwen.memory import (
    collapse_in_background,
    huge_pages_wanted,
    release_free_heap,
    release_weight_pages,
)
from edge_qwen.model import Model
from edge_qwen.package import WEIGHTS, read_manifest
from edge_qwen.providers import cpuinfo_text, int8_fallback_warning, session_options, session_providers
from edge_qwen.weights import MappedWeights, WeightsSession, external_tensors

log = logging.getLogger(__name__)

__all__ = ["load"]


def load(
    path: str | Path,
    provider: str = "cpu",
    provider_options: Mapping[str, Any] | None = None,
    threads: int | None = None,
    strict: bool = False,
) -> Model:
    """Load a model package folder, checking its manifest and files first.

    `provider`: cpu, xnnpack, qnn, nnapi, coreml or an ONNX Runtime name. One the installed
    onnxruntime lacks falls back to the CPU with a warning, or raises when `strict`. `threads`
    defaults to the physical core count.
    """
    options = session_options(threads)  # bad options fail first, before any file is read
    providers = session_providers(provider, provider_options, strict, options.intra_op_num_threads)
    root = Path(path)
    manifest = read_manifest(root)
    # ONNX Runtime builds the session in a thread of its own (it lets go of the GIL) while this one
    # parses the tokenizer (which holds the GIL throughout, ~0.3-0.4 s): the two overlap on two cores.
    # The parse starts only once the build is past its Python steps (`native`): started at once, it
    # took the GIL first and the build waited for the whole parse. Our page-dropping thread waits for
    # the GIL meanwhile, so the bulk of what the build reads, the quantized weights, is left to ONNX
    # Runtime, which lets each go once packed (weights.py, PACKED). Fresh processes
    # (`edge-qwen bench --repetitions 1`) loaded in 0.61-0.70 s against 0.90-1.53 s one after the
    # other, at the same peak (docs/memory.md, "Load time").
    on_cpu = len(providers) == 1  # the CPU alone: asked for, or fallen back to
    # On the CPU the weights file is ours to map (weights.py), so what the build reads from our mapping
    # (scales, zero points) is dropped as it goes.
    # Other providers compile their nodes from the file themselves: it is left to ONNX Runtime.
    weights = MappedWeights(root / WEIGHTS, external_tensors(root / "model.onnx")) if on_cpu else None
    dropping = weights.dropping() if weights else nullcontext()
    with ThreadPoolExecutor(1, thread_name_prefix="edge-qwen-load") as pool, dropping:
        native = threading.Event()
        building = pool.submit(WeightsSession, root / "model.onnx", options, providers, weights, native)
        native.wait()
        tokenizer = _parse_tokenizer(root)
        try:
            session = building.result()
        except Exception as e:  # ONNX Runtime raises its own exception types for bad graphs
            other = f"provider {provider!r} may not run it: try provider='cpu'"
            fix = "re-export the model" if on_cpu else other
            raise PackageError(f"{root}: ONNX Runtime could not load model.onnx ({e}); {fix}") from e
    release_free_heap()  # what building the session freed: the graph's protobuf, optimizer scratch
    if weights is not None:
        weights.sparse_rows()  # the embedding table, read a row per token from now on (weights.py)
    else:
        release_weight_pages(root / WEIGHTS)  # scales ONNX Runtime keeps mapped after packing
    # The packed weights into 2 MiB pages while the model already runs (memory.py).
    huge_pages = collapse_in_background() if huge_pages_wanted(os.environ) else None
    recipe = (manifest.raw.get("quantization") or {}).get("recipe") or {}
    warning = int8_fallback_warning(recipe, platform.machine(), cpuinfo_text())
    if warning:
        log.warning("%s", warning)
    model = Model(root, manifest, session, tokenizer)
    model.huge_pages = huge_pages
    return model


def _parse_tokenizer(root: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(root / "tokenizer.json"))
    finally:
        release_free_heap()  # the parse's scratch, while the weights are still arriving
