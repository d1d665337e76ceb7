#!/usr/bin/env python3
"""edge-qwen against llama.cpp and onnxruntime-genai on the real Qwen2.5-Coder-0.5B-Instruct.

    python bench/compare.py                         # 3 interleaved rounds
    python bench/compare.py --rounds 1 --curve      # plus our 0.5B / 1.5B / 3B ladder (random weights)
    python bench/compare.py --curve 0.5B 1.5B --note "quiet machine"

Each round runs every engine once, one after the other (ours, onnxruntime-genai, llama.cpp), each in a
fresh process, so that drift of a shared machine hits all of them alike. Reported: medians over the
rounds and, above all, the ratios ours / peer. Ours is `edge-qwen bench PKG --json --repetitions 1`
on the default INT4 export of the same GGUF the peers use (exported once, kept in the work folder
and re-exported when `default_options("int4")` changes). Writes bench/results/performance.json, then
docs/performance.md (bench/perf_doc.py).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import paper  # bench/ is on sys.path when this runs as a script
import perf_doc
from peers import (
    SHARED,
    Metrics,
    genai_version,
    llama_version,
    peer_script,
    run_genai,
    run_llama,
    run_measured,
)

from edge_qwen.apps.machine import machine_info
from edge_qwen.config import QwenConfig
from edge_qwen.export import is_current, mark_current
from edge_qwen.export.calibrate import cached_statistics
from edge_qwen.export.checkpoint import Checkpoint, TokenizerFiles, expected_names
from edge_qwen.export.options import ExportOptions, default_options
from edge_qwen.export.readers import read_checkpoint
from edge_qwen.export.writer import choose_calibration_text, write_package

REPO = Path(__file__).resolve().parents[1]
BENCH_HOME = Path(os.environ.get("EDGE_QWEN_BENCH", Path.home() / ".cache" / "edge-qwen-bench"))
MODEL = "qwen2.5-coder-0.5b-instruct"
OURS, GENAI, LLAMA = "edge-qwen", "onnxruntime-genai", "llama.cpp"
# (name, metric, peer, op, target, peer's metric if another): a peer of None compares our own value.
TARGETS: list[tuple[str, str, str | None, str, float | None, str | None]] = [
    ("decode tok/s vs llama.cpp", "decode_tps", LLAMA, ">=", 1.5, None),
    ("decode tok/s vs onnxruntime-genai", "decode_tps", GENAI, ">=", 1.6, None),
    ("prefill tok/s vs llama.cpp", "prefill_tps", LLAMA, ">=", 1.2, None),
    ("prefill tok/s vs onnxruntime-genai", "prefill_tps", GENAI, ">=", 2.0, None),
    ("peak RSS vs llama.cpp", "peak_rss_bytes", LLAMA, "<=", 0.85, None),
    (
        "anonymous RSS after load vs llama.cpp's peak RSS",
        "anon_after_load_bytes",
        LLAMA,
        "<=",
        0.25,
        "peak_rss_bytes",
    ),
    ("peak RSS vs onnxruntime-genai", "peak_rss_bytes", GENAI, "<=", None, None),
    ("TTFT vs llama.cpp", "ttft_s", LLAMA, "<=", None, None),
    ("TTFT vs onnxruntime-genai", "ttft_s", GENAI, "<=", None, None),
    ("size on disk vs llama.cpp", "size_bytes", LLAMA, "<=", None, None),
    ("size on disk vs onnxruntime-genai", "size_bytes", GENAI, "<=", None, None),
    ("load time, ours (s)", "load_s", None, "<=", 0.5, None),
]


@dataclass(frozen=True)
class Engine:
    name: str
    run: Callable[[], Metrics]


def main() -> None:
    args = parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    engines, errors, versions, package = setup_engines(args, work)
    rounds: dict[str, list[Metrics]] = {e.name: [] for e in engines}
    for r in range(args.rounds):
        for engine in engines:
            print(f"round {r + 1}/{args.rounds}: {engine.name}", file=sys.stderr, flush=True)
            rounds[engine.name].append(engine.run())
            print(f"  {json.dumps(rounds[engine.name][-1])}", file=sys.stderr, flush=True)
    summary = summarize(rounds, errors)
    curve = run_curve(args, work, package) if args.curve is not None else None
    data = {
        "meta": meta(args, versions),
        "engines": summary,
        "ratios": ratios(summary),
        "measured_fraction": summary.get(OURS, {}).get("median", {}).get("bandwidth_fraction"),
        "curve": curve,
        "paper": paper.paper(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1) + "\n")
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(perf_doc.render(data))
    print_summary(data)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ours and llama.cpp")
    p.add_argument("--curve", nargs="*", choices=list(paper.LADDER), default=None, help="sizes [all]")
    p.add_argument("--note", default="", help="A sentence for the doc, e.g. what else loaded the machine.")
    p.add_argument("--work", type=Path, default=BENCH_HOME / "compare")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "performance.json")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "performance.md")
    p.add_argument(
        "--also",
        nargs="*",
        default=[],
        metavar="NAME=PKG",
        help="other packages of ours, run in the same rounds (rows 'edge-qwen (NAME)'), e.g. another recipe",
    )
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    for spec in args.also:
        name, _, path = spec.partition("=")
        if not name or not (Path(path) / "edge_qwen.json").is_file():
            p.error(f"--also takes NAME=PKG with PKG an edge-qwen package folder, got {spec!r}")
    if args.curve == []:
        args.curve = list(paper.LADDER)
    return args


# -- engines --------------------------------------------------------------------------------------


def setup_engines(
    args: argparse.Namespace, work: Path
) -> tuple[list[Engine], dict[str, str], dict[str, str], Path]:
    """The engines in run order, the peers that failed to set up (name -> reason), versions, our package."""
    errors: dict[str, str] = {}
    versions = {"llamacpp": "-", "ortgenai": "-"}
    llama: tuple[Path, Path] | None = None
    try:
        bin_dir, gguf = peer_script("llamacpp_peer.sh").split()
        llama = Path(bin_dir), Path(gguf)
    except (RuntimeError, ValueError) as e:
        errors[LLAMA] = str(e)
    genai: Path | None = None
    try:
        genai = Path(peer_script("ortgenai_peer.sh"))
        versions["ortgenai"] = genai_version()
    except RuntimeError as e:
        errors[GENAI] = str(e)
    gguf_path = llama[1] if llama else fetch_gguf()
    package = ensure_package(gguf_path, work / f"{MODEL}-int4")
    home = work / "home"  # ours keeps its prepacked copy here; removed, so that round 1 writes it
    shutil.rmtree(home / "prepacked", ignore_errors=True)
    engines = [Engine(OURS, lambda: run_ours(package, args, 1, home))]
    for spec in args.also:
        name, _, path = spec.partition("=")
        other_home = work / f"home-{name}"
        shutil.rmtree(other_home / "prepacked", ignore_errors=True)
        engines.append(Engine(f"{OURS} ({name})", lambda p=Path(path), h=other_home: run_ours(p, args, 1, h)))
    if genai is not None:
        engines.append(Engine(GENAI, lambda: run_genai(genai, args)))
    if llama is not None:
        versions["llamacpp"] = llama_version(llama[0])
        engines.append(Engine(LLAMA, lambda: run_llama(*llama, args)))
    return engines, errors, versions, package


def fetch_gguf() -> Path:
    cmd = [sys.executable, str(SHARED / "models" / "fetch_gguf.py"), MODEL]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def run_ours(package: Path, args: argparse.Namespace, repetitions: int, home: Path) -> Metrics:
    cmd = [sys.executable, "-m", "edge_qwen.apps.cli", "bench", str(package), "--json"]
    cmd += ["--repetitions", str(repetitions), "--threads", str(args.threads)]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
    d = json.loads(run_measured(cmd, env={**os.environ, "EDGE_QWEN_HOME": str(home)}).stdout)
    return {
        "prefill_tps": d["prefill_tokens_per_second"]["median"],
        "decode_tps": d["decode_tokens_per_second"]["median"],
        "ttft_s": d["ttft_seconds"]["median"],
        "load_s": d["load_seconds"]["median"],
        "first_load_s": d["first_load_seconds"],  # the load that wrote the prepacked copy (round 1)
        "first_load_peak_rss_bytes": d["first_load_peak_rss_bytes"],
        "peak_rss_bytes": d["peak_rss_bytes"],  # its own VmHWM, read before its bandwidth probe
        # Its own figures after the runs: polled from outside, its bandwidth probe's array would count.
        "peak_anon_bytes": d["anon_rss_after_runs_bytes"],
        "peak_file_bytes": d["file_rss_after_runs_bytes"],
        "anon_after_load_bytes": d["anon_rss_after_load_bytes"],
        "file_after_load_bytes": d["file_rss_after_load_bytes"],
        "size_bytes": d["package_bytes"],
        "bytes_per_token": d["bytes_per_token"],
        "achieved_gb_s": d["achieved_bytes_per_second"]["median"] / 1e9,
        "probe_gb_s": d["memory_bandwidth_bytes_per_second"] / 1e9,
        "bandwidth_fraction": d["bandwidth_fraction"],
    }


# -- our packages ---------------------------------------------------------------------------------


def ensure_package(gguf: Path, out: Path) -> Path:
    """Our default INT4 package of the GGUF, exported again when the default recipe has changed."""
    opts = default_options("int4")
    ckpt = read_checkpoint(gguf)
    if is_current(out, opts, ckpt.config):
        return out
    stats = None
    if opts.needs_calibration:  # kept where bench/quality.py keeps the same statistics
        text = choose_calibration_text(ckpt, opts.calibration)
        stats = cached_statistics(ckpt, text, opts.needs_hessians, BENCH_HOME)
    write_package(ckpt, out, opts, overwrite=True, calib_stats=stats)
    return mark_current(out)


def curve_options() -> ExportOptions:
    """The default INT4 layout with a calibration-free rounding algorithm: speed is the same, and random
    weights have nothing to calibrate on."""
    return replace(default_options("int4"), algo="rtn")


def random_checkpoint(config: QwenConfig, tokenizer: TokenizerFiles, label: str) -> Checkpoint:
    """A checkpoint of seeded random weights (std 0.02, unit norms) at `config`'s shapes."""

    def load(name: str) -> np.ndarray:
        shape = tensor_shape(config, name)
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    sha = hashlib.sha256(f"random {label} {config}".encode()).hexdigest()
    return Checkpoint(config, frozenset(expected_names(config)), load, tokenizer, f"random:{label}", sha)


def tensor_shape(c: QwenConfig, name: str) -> tuple[int, ...]:
    """The Hugging Face shape of tensor `name` of a Qwen2 model of config `c`."""
    q, kv, hidden = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (c.vocab_size, hidden)
    kind = name.rsplit(".", 1)[-1]
    module = name.rsplit(".", 2)[-2]
    rows = {
        "q_proj": q,
        "k_proj": kv,
        "v_proj": kv,
        "o_proj": hidden,
        "gate_proj": c.intermediate_size,
        "up_proj": c.intermediate_size,
        "down_proj": hidden,
    }
    cols = {"o_proj": q, "down_proj": c.intermediate_size}
    if module in rows:
        return (rows[module],) if kind == "bias" else (rows[module], cols.get(module, hidden))
    return (hidden,)  # the norms


def run_curve(args: argparse.Namespace, work: Path, real_package: Path) -> list[dict[str, Any]]:
    """Export and bench our INT4 layout at each chosen size on random weights; prints the curve."""
    tokenizer = TokenizerFiles(
        (real_package / "tokenizer.json").read_text(encoding="utf-8"),
        json.loads((real_package / "tokenizer_config.json").read_text(encoding="utf-8")),
        json.loads((real_package / "generation_config.json").read_text(encoding="utf-8")),
    )
    opts, rows = curve_options(), []
    for size in args.curve:
        config = paper.LADDER[size]
        out = work / "curve" / f"random-{size}-int4"
        if not is_current(out, opts, config):
            print(f"curve: exporting {size} (random weights)", file=sys.stderr, flush=True)
            write_package(random_checkpoint(config, tokenizer, size), out, opts, overwrite=True)
            mark_current(out)
        print(f"curve: bench {size}", file=sys.stderr, flush=True)
        rows.append({"size": size, **run_ours(out, args, args.rounds, work / "home")})
    print("\nsize   on disk MB   decode tok/s   peak RSS MB   MB/token   of probe")
    for r in rows:
        print(
            f"{r['size']:<6} {r['size_bytes'] / 1e6:>10.0f} {r['decode_tps']:>14.2f} "
            f"{r['peak_rss_bytes'] / 1e6:>13.0f} {r['bytes_per_token'] / 1e6:>10.0f} "
            f"{100 * r['bandwidth_fraction']:>9.0f}%"
        )
    return rows


# -- results --------------------------------------------------------------------------------------


def summarize(rounds: dict[str, list[Metrics]], errors: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {name: {"error": reason} for name, reason in errors.items()}
    for name, runs in rounds.items():
        keys = runs[0].keys()
        median = {k: _median([r[k] for r in runs]) for k in keys}
        out[name] = {"runs": len(runs), "rounds": runs, "median": median}
    return out


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def ratios(summary: dict[str, Any]) -> list[dict[str, Any]]:
    ours = summary.get(OURS, {}).get("median", {})
    out = []
    for name, metric, peer, op, target, peer_metric in TARGETS:
        mine = ours.get(metric)
        theirs = 1.0 if peer is None else summary.get(peer, {}).get("median", {}).get(peer_metric or metric)
        value = mine / theirs if mine is not None and theirs else None
        met = (
            None if value is None or target is None else (value >= target if op == ">=" else value <= target)
        )
        out.append({"name": name, "value": value, "op": op, "target": target, "met": met})
    return out


def meta(args: argparse.Namespace, versions: dict[str, str]) -> dict[str, Any]:
    machine = machine_info()
    opts = default_options("int4")
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": machine.cpu,
        "logical_cores": machine.logical_cores,
        "onnxruntime": ort.__version__,
        "llamacpp": versions["llamacpp"],
        "ortgenai": versions["ortgenai"],
        "recipe": paper.describe(opts.recipe),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "note": args.note,
    }


def print_summary(data: dict[str, Any]) -> None:
    print("\nengine               prefill tok/s   decode tok/s   TTFT ms   peak RSS MB   anon MB   file MB")
    for name, e in data["engines"].items():
        m = e.get("median")
        if m is None:
            print(f"{name:<20} unavailable: {e['error']}")
            continue
        print(
            f"{name:<20} {m['prefill_tps']:>13.1f} {m['decode_tps']:>14.2f} {1e3 * m['ttft_s']:>9.0f} "
            f"{m['peak_rss_bytes'] / 1e6:>13.0f} {m['peak_anon_bytes'] / 1e6:>9.0f} "
            f"{m['peak_file_bytes'] / 1e6:>9.0f}"
        )
    for r in data["ratios"]:
        value = "-" if r["value"] is None else f"{r['value']:.2f}"
        print(f"{r['name']:<36} {value:>6}  target {r['op']} {r['target']}")


if __name__ == "__main__":
    main()
