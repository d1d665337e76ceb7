"""Execution providers by short name, with the CPU as the fallback, and the default thread count."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnxruntime as ort

from edge_qwen.errors import EdgeQwenError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"

# Short names for the providers edge devices use; ONNX Runtime's own names are accepted as well.
PROVIDERS: dict[str, str] = {
    "cpu": CPU,
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}

# What InferenceSession(providers=...) takes: a name, or a (name, options) pair.
ProviderSpec = str | tuple[str, dict[str, str]]


class ProviderUnavailableError(EdgeQwenError):
    """The provider asked for with strict=True is not in the installed onnxruntime."""


def ort_provider_name(name: str) -> str:
    """ONNX Runtime's name for a short provider name (cpu, xnnpack, ...) or for its own name."""
    if not isinstance(name, str):
        raise ValueError(f"provider must be a string, got {name!r}")
    if name.lower() in PROVIDERS:
        return PROVIDERS[name.lower()]
    if name in ort.get_all_providers():
        return name
    raise ValueError(
        f"unknown provider {name!r}: use one of {', '.join(PROVIDERS)}, "
        "or an ONNX Runtime name such as CPUExecutionProvider"
    )


def available_providers() -> list[str]:
    """The providers this machine's onnxruntime offers, in its order of preference."""
    return list(ort.get_available_providers())


def short_name(ort_name: str) -> str | None:
    """The short name of an ONNX Runtime provider name, if it has one."""
    return next((short for short, full in PROVIDERS.items() if full == ort_name), None)


def session_providers(
    name: str, options: Mapping[str, Any] | None = None, strict: bool = False, threads: int | None = None
) -> list[ProviderSpec]:
    """The providers list for InferenceSession: the one asked for, then the CPU for what it cannot run.

    A provider the installed onnxruntime lacks falls back to the CPU with one warning naming what is
    available, or raises ProviderUnavailableError when strict.
    """
    wanted = ort_provider_name(name)
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"provider_options must be a mapping of option names to values, got {options!r}")
    opts = {str(k): str(v) for k, v in (options or {}).items()}
    if wanted == CPU:
        return [(CPU, opts)] if opts else [CPU]
    available = available_providers()
    if wanted not in available:
        message = (
            f"provider {name!r} ({wanted}) is not in this onnxruntime {ort.__version__} "
            f"(available: {', '.join(available)})"
        )
        if strict:
            raise ProviderUnavailableError(message)
        log.warning("%s; running on the CPU", message)
        return [CPU]
    if wanted == PROVIDERS["xnnpack"] and threads is not None:
        opts.setdefault("intra_op_num_threads", str(threads))  # XNNPACK keeps its own thread pool
    return [(wanted, opts), CPU]


def cpuinfo_text() -> str:
    """/proc/cpuinfo, or "" where there is none (macOS, Windows)."""
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.is_file() else ""


def physical_cores() -> int:
    """Physical cores this process may use: distinct (physical id, core id) pairs, within its affinity."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = count_cores(cpuinfo_text())
    return max(1, min(cores, usable)) if cores else usable


def count_cores(cpuinfo: str) -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo text; None when it does not list them.

    ARM kernels (Raspberry Pi, Android) list no core ids; their cores run one thread each, so the
    logical count is the physical one there.
    """
    pairs = set()
    for block in cpuinfo.split("\n\n"):
        fields = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in block.splitlines())
        )
        if "core id" in fields:
            pairs.add((fields.get("physical id", "0"), fields["core id"]))
    return len(pairs) or None


def int8_fallback_warning(recipe: Mapping[str, Any], arch: str, cpuinfo: str) -> str | None:
    """A warning when an ARM CPU without dot products (a Pi 4's Cortex-A72) would run int8 weights.

    ONNX Runtime has no fp32-compute kernel for 8-bit MatMulNBits: on such a CPU it dequantizes the
    whole matrix to float32 on every call (docs/performance.md), which it logs only at INFO level.
    `recipe` is the manifest's quantization recipe: part name -> scheme ("int8 b32 asym gptq") or None.
    """
    if arch.lower() not in ("aarch64", "arm64") or "asimddp" in cpuinfo.split():
        return None
    int8 = [part for part, scheme in recipe.items() if isinstance(scheme, str) and scheme.startswith("int8")]
    # An exact GGUF import records its block types: these go into 8-bit MatMulNBits (export/gguf_exact.py).
    exact = recipe.get("gguf blocks, exactly")
    eight_bit = [t for t in GGUF_8BIT if isinstance(exact, str) and f"{t} x" in exact]
    if eight_bit:
        int8 = [f"the GGUF's {', '.join(eight_bit)} blocks"]
    if not int8 or set(int8) <= {"embeddings"}:  # a gathered table reads one row: no matmul fallback
        return None
    return (
        f"this CPU has no int8 dot-product instructions (asimddp), so the package's int8 weights "
        f"({', '.join(int8)}) run a slow float32 fallback: for this machine, export an all-int4 package "
        "(edge-qwen export ... --recipe small, or edge-qwen pull NAME --recipe small)"
    )


GGUF_8BIT = ("Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K")  # GGUF types an exact import keeps at 8 bits


def session_options(threads: int | None) -> ort.SessionOptions:
    """Session options: full optimization, `threads` intra-op threads (default: physical cores), quiet."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ONNX Runtime's warnings are noise on a user's terminal
    options.intra_op_num_threads = threads if threads is not None else physical_cores()
    return options
