"""What only an arm64 machine shows: run by the arm64 check (scripts/arm64.sh) on emulated Cortex-A72
and Cortex-A76 cores, which sets EDGE_QWEN_ARM64_CPU to the core it asked qemu for. Elsewhere these
skip; the check fails on any skip."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from edge_qwen import heap
from edge_qwen.apps.machine import machine_info
from edge_qwen.cache import small_page_zeros
from edge_qwen.export.targets import this_cpu
from edge_qwen.providers import physical_cores

CPU = os.environ.get("EDGE_QWEN_ARM64_CPU")
pytestmark = pytest.mark.skipif(
    CPU is None or platform.machine() != "aarch64", reason="the arm64 check's (EDGE_QWEN_ARM64_CPU)"
)


def test_the_cpu_is_the_one_asked_for() -> None:
    machine = machine_info()
    assert machine.cpu == {"a72": "Cortex-A72", "a76": "Cortex-A76"}[str(CPU)]
    assert this_cpu() == CPU
    dot = {"asimddp", "fphp"} <= set(machine.features)
    assert dot == (CPU == "a76")
    assert physical_cores() == len(os.sched_getaffinity(0))  # ARM lists no core ids: one thread per core


def test_platform_code_works_quietly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert heap.release_free_heap()  # Debian's glibc on arm64 has malloc_trim
        cache = small_page_zeros((4, 1024, 64), np.float32)
        cache[1, 7] = 1.0
        assert cache.sum() == 64
    assert not caplog.records


def test_info_reports_the_features_and_kernels() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edge_qwen.apps.cli", "info", "--providers"],
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout
    assert "(aarch64), export target " + str(CPU) in out
    if CPU == "a76":
        assert "asimddp" in out and "fphp" in out
        assert "int4 symmetric   KleidiAI int8" in out
    else:
        assert "asimddp" not in out
        assert "int8 asymmetric  unpacked fp32" in out
