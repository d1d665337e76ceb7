"""Where a figure was measured: the CPU, its architecture, and the features ONNX Runtime's kernels use."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from edge_qwen.providers import cpuinfo_text

# CPU features that decide which int8/int4 kernels ONNX Runtime takes (see docs/performance.md).
KERNEL_FEATURES = (
    *("asimddp", "i8mm", "fphp", "asimdhp", "bf16", "sve", "sme2"),  # ARM ('fphp': half-precision math)
    *("avx2", "avx_vnni", "avx512_vnni", "amx_int8"),  # x86
)
# /proc/cpuinfo on ARM names no model, only the core's part number (Arm Ltd, implementer 0x41).
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd05": "Cortex-A55", "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76"}


@dataclass(frozen=True)
class Machine:
    """Where the numbers were measured."""

    cpu: str
    arch: str
    logical_cores: int
    features: tuple[str, ...]  # those of KERNEL_FEATURES this CPU has


def machine_info() -> Machine:
    """CPU name, architecture and the kernel-relevant features, from /proc/cpuinfo where there is one."""
    cpu, features = parse_cpuinfo(cpuinfo_text())
    return Machine(
        cpu=cpu or platform.processor() or "unknown",
        arch=platform.machine(),
        logical_cores=os.cpu_count() or 1,
        features=features,
    )


def parse_cpuinfo(text: str) -> tuple[str | None, tuple[str, ...]]:
    """The CPU's name (x86 'model name', or the ARM core from its part number) and which of
    KERNEL_FEATURES its flags list (x86 'flags', ARM 'Features': dotprod is 'asimddp')."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    cpu = fields.get("model name") or ARM_PARTS.get(fields.get("CPU part", ""))
    return cpu, tuple(f for f in KERNEL_FEATURES if f in flags)
