"""Export targets (export/targets.py) and the MatMulNBits kernel probe (apps/kernels.py)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from edge_qwen.apps import kernels
from edge_qwen.apps.cli import cli
from edge_qwen.apps.machine import parse_cpuinfo
from edge_qwen.export.options import ExportOptions, default_options
from edge_qwen.export.targets import this_cpu
from edge_qwen.providers import cpuinfo_text
from tests.conftest import TinyModel, export_tiny

A72 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n"
A76 = (
    "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
    "asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n"
)


def test_this_cpu_reads_the_architecture_and_dot_products() -> None:
    assert this_cpu("x86_64", "flags : avx2") == "x86"
    assert this_cpu("aarch64", A72) == "a72"
    assert this_cpu("aarch64", A76) == "a76"
    assert parse_cpuinfo(A76) == ("Cortex-A76", ("asimddp", "fphp", "asimdhp"))
    assert parse_cpuinfo(A72) == ("Cortex-A72", ())


@pytest.mark.parametrize(
    "options",
    [{"precision": "int8"}, {"precision": "int4", "lm_head": "int8"}, {"precision": "int4", "mixed": True}],
)
def test_a72_refuses_int8_matrices(options: dict) -> None:
    with pytest.raises(ValueError, match="int8 .* float32 fallback on the a72 target"):
        ExportOptions(target_cpu="a72", **options)
    ExportOptions(target_cpu="a76", **options)  # dot products: int8 is a fast path there


def test_default_int4_fits_every_target_and_auto_is_this_machine() -> None:
    for target in ("x86", "a76", "a72"):  # on the a72 the default drops its int8 matrices
        assert default_options("int4", target).target_cpu == target
    expected = this_cpu(platform.machine(), cpuinfo_text())
    assert default_options("int4", "auto").target_cpu == expected
    with pytest.raises(ValueError, match="target CPU must be"):
        ExportOptions(target_cpu="pentium")


def test_manifest_and_info_name_the_target(tiny: TinyModel, tmp_path: Path) -> None:
    pkg = export_tiny(
        tiny.hf_dir, tmp_path / "a72", precision="int4", mixed=False, lm_head="int4", target_cpu="a72"
    )
    assert json.loads((pkg / "edge_qwen.json").read_text())["quantization"]["target_cpu"] == "a72"
    shown = CliRunner().invoke(cli, ["info", str(pkg)])
    assert shown.exit_code == 0 and "target cpu  a72" in shown.output


def test_export_for_a72_with_int8_is_one_clear_error(tiny: TinyModel, tmp_path: Path) -> None:

    args = [str(tiny.hf_dir), str(tmp_path / "out"), "--precision", "int8", "--target-cpu", "a72"]
    done = subprocess.run(
        [sys.executable, "-m", "edge_qwen.apps.cli", "export", *args], capture_output=True, text=True
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "a72" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


# -- the kernel probe -------------------------------------------------------------------------------


def test_probe_sees_the_unpacked_fallback() -> None:
    """Float zero points make ONNX Runtime dequantize the weights at every call, and say so."""
    model = onnx.load_from_string(kernels.matmul_nbits_model(4, True, accuracy_level=4))
    blocks = kernels.N * kernels.K // kernels.BLOCK
    model.graph.initializer[2].CopyFrom(
        numpy_helper.from_array(np.full(blocks, 8.0, np.float32), "zero_points")
    )
    a = np.ones((1, kernels.K), np.float32)
    assert kernels.run(model.SerializeToString(), a)[1]
    assert not kernels.run(kernels.matmul_nbits_model(4, True, accuracy_level=4), a)[1]


def expected_paths(cpuinfo: str) -> dict[str, str]:
    """What ONNX Runtime 1.32's CPU kernels take on this CPU (docs/arm64.md)."""
    flags = set(" ".join(parse_cpuinfo(cpuinfo)[1]).split())
    if platform.machine().lower() not in ("aarch64", "arm64"):
        return dict.fromkeys(kernels.KINDS, "MLAS int8")
    if "asimddp" in flags:
        return {
            "int4 asymmetric": "KleidiAI int8",
            "int4 symmetric": "KleidiAI int8",
            "int8 asymmetric": "MLAS int8",
            "int8 symmetric": "MLAS int8",
        }
    return {
        "int4 asymmetric": "MLAS fp32",
        "int4 symmetric": "MLAS fp32",
        "int8 asymmetric": "unpacked fp32",
        "int8 symmetric": "unpacked fp32",
    }


def test_probe_finds_the_kernels_this_cpu_has() -> None:
    found = {p.kind: p.describe() for p in kernels.kernel_paths()}
    assert found == expected_paths(cpuinfo_text())
