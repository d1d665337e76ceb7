"""The CPU a package is exported for, and what its weights may be there.

Which MatMulNBits kernel ONNX Runtime runs depends on the CPU (`edge-qwen info --providers` finds it
by running one; docs/arm64.md has the table per CPU):

- x86: 4-bit and 8-bit weights both run int8-activation kernels (AVX2, AVX-512 VNNI).
- a76, an ARM core with dot products (`asimddp`: Raspberry Pi 5's Cortex-A76, most phones): 4-bit
  weights, with zero points or without, run KleidiAI's int8-activation kernels (onnxruntime 1.32), and
  8-bit weights MLAS's.
- a72, an ARM core without them (Raspberry Pi 4's Cortex-A72): 4-bit weights run a float32 kernel, and
  8-bit weights are dequantized to float32 at every call. A package for it holds no int8 matrix.

The default INT4 recipe holds no int8 matrix, so it is the same for every target; what the target
changes is which other recipes are refused, and what `info` says the package is for.
"""

from __future__ import annotations

import platform

TARGET_CPUS = {
    "x86": "x86-64",
    "a76": "ARM with dot products (Cortex-A76: Raspberry Pi 5; A55, A78, X1 and later)",
    "a72": "ARM without dot products (Cortex-A72: Raspberry Pi 4; A53)",
}
ANY = "any"  # no check: what a library call exports unless told


def this_cpu(arch: str | None = None, cpuinfo: str | None = None) -> str:
    """The target that fits the CPU this runs on."""
    from edge_qwen.providers import cpuinfo_text

    arch = (arch or platform.machine()).lower()
    if arch not in ("aarch64", "arm64"):
        return "x86"
    text = cpuinfo_text() if cpuinfo is None else cpuinfo
    return "a76" if "asimddp" in text.split() else "a72"


def resolve(target: str) -> str:
    """`auto` -> this machine's target; anything else must be a known target."""
    if target == "auto":
        return this_cpu()
    if target != ANY and target not in TARGET_CPUS:
        raise ValueError(f"target CPU must be auto, {', '.join(TARGET_CPUS)} or {ANY}, got {target!r}")
    return target


def check(target: str, int8_matrices: list[str]) -> None:
    """Refuse int8 matrices (MatMulNBits weights, not the gathered embedding table) for the a72."""
    if target == "a72" and int8_matrices:
        raise ValueError(
            f"int8 {', '.join(int8_matrices)} would run a float32 fallback on the a72 target (no dot "
            "products: ONNX Runtime dequantizes int8 weights at every call); export int4 with an int4 "
            "lm_head and no --mixed, or fp32, or name another --target-cpu"
        )
