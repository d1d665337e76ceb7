"""Execution providers by name, the CPU fallback, strict mode, and the default thread count."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnxruntime as ort
import pytest

import edge_qwen
from edge_qwen import providers
from edge_qwen.providers import (
    CPU,
    ProviderUnavailableError,
    count_cores,
    int8_fallback_warning,
    ort_provider_name,
    session_providers,
)
from tests.conftest import TinyModel, export_tiny


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cpu", "CPUExecutionProvider"),
        ("CPU", "CPUExecutionProvider"),
        ("xnnpack", "XnnpackExecutionProvider"),
        ("qnn", "QNNExecutionProvider"),
        ("nnapi", "NnapiExecutionProvider"),
        ("coreml", "CoreMLExecutionProvider"),
        ("CoreMLExecutionProvider", "CoreMLExecutionProvider"),
        ("CUDAExecutionProvider", "CUDAExecutionProvider"),  # any name onnxruntime knows
    ],
)
def test_provider_names(name: str, expected: str) -> None:
    assert ort_provider_name(name) == expected


def test_unknown_provider_lists_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown provider 'tpu': use one of cpu, xnnpack, qnn, nnapi, coreml"
    ):
        ort_provider_name("tpu")


def test_missing_provider_falls_back_to_cpu_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    missing = next(
        p
        for p in ("xnnpack", "qnn", "nnapi", "coreml")
        if ort_provider_name(p) not in ort.get_available_providers()
    )
    with caplog.at_level(logging.WARNING, logger="edge_qwen.providers"):
        assert session_providers(missing, {"backend_path": "x.so"}) == [CPU]
    records = [r for r in caplog.records if r.name == "edge_qwen.providers"]
    assert len(records) == 1
    assert f"provider '{missing}'" in records[0].getMessage()
    assert f"available: {', '.join(ort.get_available_providers())}" in records[0].getMessage()
    with pytest.raises(ProviderUnavailableError, match=f"provider '{missing}'"):
        session_providers(missing, strict=True)


def test_available_provider_comes_first_with_its_options_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["QNNExecutionProvider", CPU])
    assert session_providers("qnn", {"backend_path": "libQnnHtp.so", "htp_performance_mode": 1}) == [
        ("QNNExecutionProvider", {"backend_path": "libQnnHtp.so", "htp_performance_mode": "1"}),
        CPU,
    ]
    assert session_providers("cpu") == [CPU]
    assert session_providers("cpu", {"arena_extend_strategy": "kSameAsRequested"}) == [
        (CPU, {"arena_extend_strategy": "kSameAsRequested"})
    ]
    with pytest.raises(ValueError, match="provider_options must be a mapping"):
        session_providers("cpu", ["x"])  # type: ignore[arg-type]


def test_load_falls_back_or_fails(tiny_fp32: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        model = edge_qwen.load(tiny_fp32, provider="xnnpack")
    assert model.providers == [CPU]
    assert "running on the CPU" in caplog.text
    on_cpu = edge_qwen.load(tiny_fp32, provider="cpu")
    pieces = [(p.token_id, p.text) for p in model.stream("hello", max_tokens=8, temperature=1.0, seed=3)]
    assert pieces == [
        (p.token_id, p.text) for p in on_cpu.stream("hello", max_tokens=8, temperature=1.0, seed=3)
    ]
    with pytest.raises(ProviderUnavailableError, match="XnnpackExecutionProvider"):
        edge_qwen.load(tiny_fp32, provider="xnnpack", strict=True)
    with pytest.raises(ValueError, match="unknown provider"):
        edge_qwen.load(tiny_fp32, provider="gpu")


def test_threads(tiny_fp32: Path) -> None:
    assert edge_qwen.load(tiny_fp32, threads=1).session.get_session_options().intra_op_num_threads == 1
    default = edge_qwen.load(tiny_fp32).session.get_session_options().intra_op_num_threads
    assert default == providers.physical_cores()
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=f"threads must be an integer >= 1, got {bad}"):
            edge_qwen.load(tiny_fp32, threads=bad)  # type: ignore[arg-type]


X86_SMT = "\n\n".join(
    f"processor\t: {cpu}\nphysical id\t: {cpu // 4}\ncore id\t\t: {cpu % 4 // 2}\nsiblings\t: 4"
    for cpu in range(8)
)  # 2 sockets x 2 cores x 2 threads
RASPBERRY_PI = "\n\n".join(f"processor\t: {cpu}\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08" for cpu in range(4))


def test_physical_cores_from_cpuinfo() -> None:
    assert count_cores(X86_SMT) == 4
    assert count_cores(RASPBERRY_PI) is None  # no core ids: every logical CPU is a core
    assert 1 <= providers.physical_cores() <= (os.cpu_count() or 1)


A72 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08\n"
A76 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp\n"
MIXED = {
    "body": "int4 b32 asym gptq",
    "lm_head": "int4 b32 asym gptq",
    "sensitive (...)": "int8 b32 asym gptq",
}


def test_int8_fallback_warning_names_the_fix_on_a_cpu_without_dot_products() -> None:
    warning = int8_fallback_warning(MIXED, "aarch64", A72)
    assert (
        warning is not None
        and "asimddp" in warning
        and "--recipe small" in warning
        and "sensitive" in warning
    )
    assert int8_fallback_warning(MIXED, "aarch64", A76) is None  # dotprod: int8 kernels
    assert int8_fallback_warning(MIXED, "x86_64", "flags\t: fpu sse2 avx2\n") is None
    all_int4 = {**MIXED, "sensitive (...)": None}
    assert int8_fallback_warning(all_int4, "aarch64", A72) is None
    assert int8_fallback_warning({**all_int4, "embeddings": "int8 b32 asym rtn"}, "aarch64", A72) is None
    assert int8_fallback_warning({"body": "fp32"}, "arm64", A72) is None


def test_an_exact_gguf_import_with_8_bit_blocks_warns_too() -> None:
    exact = {
        "gguf blocks, exactly": "Q4_K x12, Q5_0 x133, Q6_K x12, Q8_0 x13",
        "other types (requantized)": None,
    }
    warning = int8_fallback_warning(exact, "aarch64", A72)
    assert warning is not None and "the GGUF's Q8_0, Q5_0, Q6_K blocks" in warning
    assert int8_fallback_warning(exact, "aarch64", A76) is None
    all_4_bit = {"gguf blocks, exactly": "Q4_0 x169, Q4_K x29", "other types (requantized)": None}
    assert int8_fallback_warning(all_4_bit, "aarch64", A72) is None


@pytest.mark.parametrize("tiny", [True], ids=["tied"], indirect=True)
def test_load_warns_once_where_int8_weights_would_fall_back(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    mixed = export_tiny(tiny.hf_dir, tmp_path / "mixed", precision="int4")  # int8 sensitive tensors
    all_int4 = export_tiny(tiny.hf_dir, tmp_path / "int4", precision="int4", mixed=False, lm_head="int4")
    monkeypatch.setattr("edge_qwen.loader.platform.machine", lambda: "aarch64")  # this x86 has no asimddp
    with caplog.at_level(logging.WARNING, logger="edge_qwen.loader"):
        edge_qwen.load(mixed)
        edge_qwen.load(all_int4)
    warnings = [r.getMessage() for r in caplog.records if r.name == "edge_qwen.loader"]
    assert len(warnings) == 1 and "--recipe small" in warnings[0]
