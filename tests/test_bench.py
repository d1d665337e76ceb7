"""`edge-qwen bench` reports every field with sane values; the bytes-per-token arithmetic is exact.

Speed itself is never asserted: benchmarks are scripts (bench/compare.py), not timed tests.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest

from edge_qwen.apps.benchmark import (
    Stat,
    decode_traffic,
    package_size,
    run_benchmark,
    vm_hwm_bytes,
    weight_bytes_per_token,
)
from edge_qwen.apps.machine import parse_cpuinfo
from edge_qwen.cache import kv_bytes_per_token
from edge_qwen.errors import ContextFullError
from edge_qwen.package import read_manifest
from tests.conftest import TinyModel, export_tiny

REPO = Path(__file__).resolve().parents[1]
PROMPT, GEN, REPS = 16, 8, 2


def run_bench(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edge_qwen.apps.cli", "bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


@functools.cache
def bench_script(name: str) -> ModuleType:
    """bench/NAME.py (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def paper() -> ModuleType:
    """bench/paper.py, the on-paper arithmetic of docs/performance.md."""
    return bench_script("paper")


def test_bench_json_reports_every_field_with_sane_values(tiny_fp32: Path) -> None:
    counts = ("--prompt-tokens", str(PROMPT), "--gen-tokens", str(GEN), "--repetitions", str(REPS))
    result = run_bench(str(tiny_fp32), "--json", *counts)
    assert result.returncode == 0, result.stderr
    d = json.loads(result.stdout)
    config = read_manifest(tiny_fp32).config

    assert (d["prompt_tokens"], d["gen_tokens"], d["repetitions"]) == (PROMPT, GEN, REPS)
    assert d["precision"] == "fp32" and d["package"] == str(tiny_fp32)
    assert d["threads"] >= 1 and "CPUExecutionProvider" in d["providers"]
    assert d["machine"]["logical_cores"] >= 1 and d["machine"]["arch"]
    for name in ("load_seconds", "prefill_tokens_per_second", "decode_tokens_per_second", "ttft_seconds"):
        stat = d[name]
        assert set(stat) == {"median", "min", "max"}, name
        assert all(math.isfinite(v) and v > 0 for v in stat.values()), (name, stat)
        assert stat["min"] <= stat["median"] <= stat["max"], (name, stat)
    # TTFT includes the prefill: it cannot be shorter than the prompt at the best prefill rate.
    assert d["ttft_seconds"]["max"] >= PROMPT / d["prefill_tokens_per_second"]["max"]

    assert d["package_bytes"] == package_size(tiny_fp32)
    assert d["package_bytes"] == sum(p.stat().st_size for p in tiny_fp32.iterdir())
    assert 10e6 < d["peak_rss_bytes"] < 4e9
    after_load = d["anon_rss_after_load_bytes"] + d["file_rss_after_load_bytes"]
    assert d["anon_rss_after_load_bytes"] > 0
    assert d["file_rss_after_load_bytes"] > 0
    assert after_load <= d["peak_rss_bytes"]  # the high-water mark counts both kinds
    after_runs = d["anon_rss_after_runs_bytes"] + d["file_rss_after_runs_bytes"]
    # Linux counts RSS per thread and folds the counts in every 64 page faults, so two reads of
    # /proc/self/status a moment apart may disagree by that much (64 pages of 4 KB per thread).
    assert after_runs <= d["peak_rss_bytes"] + 64 * 4096 * 8

    traffic = d["traffic"]
    data = (tiny_fp32 / "model.onnx.data").stat().st_size
    assert 0 < traffic["weight_bytes"] < data  # the lookup tables count one row of theirs
    assert traffic["average_context"] == PROMPT + (GEN + 1) / 2
    assert traffic["kv_cache_bytes"] == round(kv_bytes_per_token(config) * traffic["average_context"])
    assert d["bytes_per_token"] == traffic["weight_bytes"] + traffic["kv_cache_bytes"]

    probe = d["memory_bandwidth_bytes_per_second"]
    assert 1e8 < probe < 1e13
    achieved = d["achieved_bytes_per_second"]
    assert achieved["median"] == pytest.approx(d["bytes_per_token"] * d["decode_tokens_per_second"]["median"])
    assert d["bandwidth_fraction"] == pytest.approx(achieved["median"] / probe)


def test_bench_times_the_load_that_packs_the_weights_apart(tiny_fp32: Path, tmp_path: Path) -> None:
    counts = ("--gen-tokens", "2", "--repetitions", "2")
    first = json.loads(run_bench(str(tiny_fp32), "--json", *counts, EDGE_QWEN_HOME=str(tmp_path)).stdout)
    again = json.loads(run_bench(str(tiny_fp32), "--json", *counts, EDGE_QWEN_HOME=str(tmp_path)).stdout)
    assert first["first_load_seconds"] > 0  # an empty home: the first load wrote the prepacked copy
    assert first["first_load_peak_rss_bytes"] > 0
    assert again["first_load_seconds"] is None  # then every load maps it
    assert again["first_load_peak_rss_bytes"] is None
    assert len(list((tmp_path / "prepacked").iterdir())) == 1


def test_bench_prints_a_llama_bench_style_table(tiny_fp32: Path) -> None:
    result = run_bench(str(tiny_fp32), "--prompt-tokens", "8", "--gen-tokens", "4", "--repetitions", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in (
        "| pp8 tok/s",
        "| tg4 tok/s",
        "| ttft ms",
        "| load ms",
        "peak RSS",
        "GB/s this machine reads",
    ):
        assert needle in out, (needle, out)


def test_bench_peak_rss_is_its_own_not_its_parents(tiny_fp32: Path) -> None:
    # A process started with vfork + exec inherits its parent's ru_maxrss; bench reports VmHWM.
    ballast = bytearray(1 << 30)  # 1 GiB, touched, in this (parent) process
    result = run_bench(
        str(tiny_fp32), "--json", "--prompt-tokens", "4", "--gen-tokens", "2", "--repetitions", "1"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["peak_rss_bytes"] < len(ballast) / 2
    assert vm_hwm_bytes("Name:\tpython\nVmPeak:\t  9 kB\nVmHWM:\t   13560 kB\n") == 13560 * 1024
    assert vm_hwm_bytes("Name:\tzombie\n") is None


def test_bench_refuses_a_run_longer_than_the_context(tiny_fp32: Path) -> None:
    context = read_manifest(tiny_fp32).max_context
    with pytest.raises(ContextFullError, match="--gen-tokens"):
        run_benchmark(tiny_fp32, prompt_tokens=context - 4, gen_tokens=8)
    with pytest.raises(ValueError, match="repetitions must be an integer >= 1, got 0"):
        run_benchmark(tiny_fp32, repetitions=0)
    result = run_bench(str(tiny_fp32), "--gen-tokens", str(context))
    assert result.returncode == 1 and result.stderr.startswith("Error: ") and "Traceback" not in result.stderr


def test_stat_is_median_and_spread() -> None:
    s = Stat.of([3.0, 1.0, 10.0, 2.0])
    assert (s.median, s.min, s.max) == (2.5, 1.0, 10.0)
    assert Stat.of([4.0]) == Stat(4.0, 4.0, 4.0)
    assert s.scaled(2) == Stat(5.0, 2.0, 20.0)
    with pytest.raises(ValueError, match="at least one value"):
        Stat.of([])


def test_decode_traffic_counts_kv_cache_at_the_average_context(tiny_fp32: Path) -> None:
    config = read_manifest(tiny_fp32).config
    per_position = 2 * config.num_key_value_heads * config.head_dim * 4 * config.num_hidden_layers
    traffic = decode_traffic(tiny_fp32 / "model.onnx", config, prompt_tokens=100, gen_tokens=9)
    assert traffic.average_context == 105  # steps attend over 101 ... 109 positions
    assert traffic.kv_cache_bytes == 105 * per_position
    assert traffic.total_bytes == traffic.weight_bytes + 105 * per_position


@pytest.mark.parametrize(
    "options",
    [
        {"precision": "fp32"},
        {"precision": "fp16"},
        {"precision": "int8", "algo": "rtn"},
        {"precision": "int4", "algo": "rtn", "lm_head": "int4"},  # the default int4 layout
        {"precision": "int4", "algo": "rtn", "symmetric": True, "block_size": 64, "mixed": False},
        {"precision": "int4", "algo": "rtn", "block_size": 128},  # padded blocks (hidden is 64)
    ],
    ids=["fp32", "fp16", "int8", "int4", "int4-b64-sym", "int4-b128"],
)
def test_paper_arithmetic_matches_the_bytes_counted_in_exported_graphs(
    tiny: TinyModel, tmp_path: Path, options: dict[str, object]
) -> None:
    from edge_qwen.export.options import ExportOptions

    package = export_tiny(tiny.hf_dir, tmp_path / "pkg", **options)
    config = read_manifest(package).config
    predicted = paper().weight_bytes_per_token(config, ExportOptions(**options))  # type: ignore[arg-type]
    assert weight_bytes_per_token(package / "model.onnx") == predicted


def test_paper_bytes_match_a_hand_count_of_qwen2_5_0_5b() -> None:
    # Qwen2.5-0.5B per layer: qkv (896 + 2 * 128) x 896 = 1,032,192; o 896 x 896 = 802,816;
    # gate_up 2 x 4864 x 896 = 8,716,288; down 4864 x 896 = 4,358,144: 14,909,440 weights, x 24 layers
    # = 357,826,560, + lm_head 151,936 x 896 = 136,134,656: 493,961,216 matrix weights. With the biases
    # (24 x 1152) and norms (24 x 2 x 896 + 896) that is 494,032,768, the model's published size.
    # fp32 bytes: 4 x 493,961,216 = 1,975,844,864, + norms and biases 4 x 71,552 = 286,208, + one
    # embedding row 4 x 896 = 3,584, + one cos and one sin row 2 x 32 x 4 = 256: 1,976,134,912.
    rows = {(r["size"], r["precision"]): r for r in paper().paper()["rows"]}
    assert rows[("0.5B", "fp32")]["weight_bytes_per_token"] == 1_976_134_912
    # fp16 matrices are folded to fp32 at load; only the embedding row is read at 2 bytes a value.
    assert rows[("0.5B", "fp16")]["weight_bytes_per_token"] == 1_976_134_912 - 896 * 2
    # K and V, 2 KV heads, fp32: 2 x 2 x 64 x 4 x 24 layers; 1.5B and 3B have head_dim 128.
    kv = {size: rows[(size, "fp32")]["kv_bytes_per_position"] for size in ("0.5B", "1.5B", "3B")}
    assert kv == {"0.5B": 24_576, "1.5B": 2 * 2 * 128 * 4 * 28, "3B": 2 * 2 * 128 * 4 * 36}
    assert rows[("0.5B", "fp32")]["bytes_per_token"] == 1_976_134_912 + 192 * 24_576
    # Without dotprod, every 8-bit weight is also written and read as float32: 8 bytes each.
    assert rows[("0.5B", "int8")]["no_dotprod_extra_bytes"] == 493_961_216 * 8
    # 1,980,853,504 bytes a token at the Pi 5's assumed 10 GB/s sustained.
    assert rows[("0.5B", "fp32")]["predicted_decode_tps"]["Raspberry Pi 5"]["sustained"] == pytest.approx(
        5.0483, abs=1e-4
    )


def test_paper_bytes_grow_with_size_and_precision() -> None:
    rows = {(r["size"], r["precision"]): r for r in paper().paper()["rows"]}
    assert set(rows) == {(s, p) for s in ("0.5B", "1.5B", "3B") for p in ("fp32", "fp16", "int8", "int4")}
    for precision in ("fp32", "fp16", "int8", "int4"):
        sizes = [rows[(s, precision)]["bytes_per_token"] for s in ("0.5B", "1.5B", "3B")]
        assert sizes == sorted(set(sizes)), precision
    for size in ("0.5B", "1.5B", "3B"):
        by_precision = [rows[(size, p)]["bytes_per_token"] for p in ("int4", "int8", "fp16", "fp32")]
        assert by_precision == sorted(set(by_precision)), size
        tps = rows[(size, "int4")]["predicted_decode_tps"]
        assert all(t["sustained"] < t["peak"] for t in tps.values())


def test_predicted_speed_is_bandwidth_over_bytes_plus_the_int8_detour_without_dotprod() -> None:
    doc = paper()
    # 10 GB/s sustained over 500 MB a token: 20 tok/s; a core without dotprod reads 250 MB more.
    with_dotprod = doc.Device("a", "", True, peak_gb_s=20.0, sustained_gb_s=10.0, sustained_source="")
    assert doc.predicted_tps(with_dotprod, 500_000_000, 250_000_000) == {"peak": 40.0, "sustained": 20.0}
    without = doc.Device("b", "", False, peak_gb_s=20.0, sustained_gb_s=10.0, sustained_source="")
    tps = doc.predicted_tps(without, 500_000_000, 250_000_000)
    assert tps == {"peak": pytest.approx(80 / 3), "sustained": pytest.approx(40 / 3)}


def test_int4_bits_per_weight_include_scales_and_zero_points() -> None:
    # A block of 32 4-bit codes is 16 bytes + a 4-byte scale: 5.0 bits a weight; asymmetric adds a
    # 4-bit zero point per block (0.125 bits at b32). b64: (32 + 4) x 8 / 64; b128: (64 + 4) x 8 / 128.
    doc = paper()
    bits = {variant: doc.bits_per_weight(scheme) for variant, scheme in doc.default_int4_schemes()}
    assert bits == {
        "b32 sym": 5.0,
        "b32 asym": 5.125,
        "b64 sym": 4.5,
        "b64 asym": 4.5625,
        "b128 sym": 4.25,
        "b128 asym": 4.28125,
    }


def test_cpuinfo_names_the_pi_cores_and_their_dotprod() -> None:
    pi4 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08\n"
    pi5 = "processor\t: 0\nFeatures\t: fp asimd aes asimdrdm lrcpc dcpop asimddp\nCPU part\t: 0xd0b\n"
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
    assert parse_cpuinfo(pi4) == ("Cortex-A72", ())
    assert parse_cpuinfo(pi5) == ("Cortex-A76", ("asimddp",))
    assert parse_cpuinfo(x86) == ("AMD EPYC", ("avx2", "avx512_vnni"))
    assert parse_cpuinfo("") == (None, ())


def test_floor_runs_the_packages_own_products_alone(tiny: TinyModel, tmp_path: Path) -> None:
    package = export_tiny(tiny.hf_dir, tmp_path / "int4", precision="int4", algo="rtn", lm_head="int4")
    graph = onnx.load(str(package / "model.onnx"), load_external_data=False).graph
    products = [n for n in graph.node if n.op_type == "MatMulNBits"]
    work = tmp_path / "floor"
    work.mkdir()
    session, feeds = bench_script("floor").matmul_only(package, work)
    assert [o.name for o in session.get_outputs()] == [n.output[0] for n in products]
    assert (work / "model.onnx.data").stat().st_ino == (package / "model.onnx.data").stat().st_ino  # no copy
    outputs = session.run(None, feeds)
    widths = [next(a.i for a in n.attribute if a.name == "N") for n in products]
    assert [o.shape for o in outputs] == [(1, n) for n in widths]
    assert all(np.isfinite(o).all() and np.abs(o).max() > 0 for o in outputs)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status")
@pytest.mark.parametrize("only", [None, "tokenizer", "session"])
def test_memory_script_shows_each_stage(tiny_fp32: Path, only: str | None) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "memory.py"), str(tiny_fp32), "--prompt-tokens", "4"]
    cmd += ["--gen-tokens", "2", *(["--only", only] if only else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    lines = [line for line in out.splitlines() if " resident " in line]
    stages = [line.split()[0] for line in lines]
    whole = ["start", "imports", "load", "prefill", "decode"]
    assert stages == (["start", "libraries", only] if only else whole)
    resident = [float(line.split()[2]) for line in lines]
    assert resident[-1] > resident[0] > 1  # MB, growing as parts load
    if only is None:  # the mapped prepacked weights, by kind: ONNX Runtime's packed weights are there
        packed = next(line for line in out.splitlines() if "packed weights (ONNX Runtime's)" in line)
        assert float(packed.split()[-2]) > 0


def test_the_suite_table_counts_the_domains_at_the_bar() -> None:
    """A domain meets the bar with KLD at most the peer's and top-1 no more than one point below."""
    doc = bench_script("quality_doc")

    def cell(kld: float, top1: float) -> dict[str, float]:
        return {"mean_kld": kld, "top1_agreement": top1}

    best = {"a": cell(0.05, 0.900), "b": cell(0.05, 0.900), "c": cell(0.05, 0.900), "d": cell(0.05, 0.900)}
    ours = {
        "a": cell(0.05, 0.891),  # equal KLD, 0.9 point lower top-1: meets
        "b": cell(0.04, 0.880),  # lower KLD, 2 points lower top-1: misses
        "c": cell(0.06, 0.950),  # higher KLD: misses
        "d": cell(0.01, 0.990),  # meets
    }
    assert doc.at_the_bar(ours, best) == 2
    rows = {"ort-genai-int4-kqmixed": {"domains": best, "macro": cell(0.05, 0.9), "size_bytes": 9e8}}
    rows["ours"] = {"domains": ours, "macro": cell(0.04, 0.93), "size_bytes": 4e8}
    table = doc.render_suite({"rows": rows})
    assert "| ours | 400 |" in table and table.rstrip().endswith("| 2/4 |")
