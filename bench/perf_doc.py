#!/usr/bin/env python3
"""Render bench/results/performance.json (written by bench/compare.py) as docs/performance.md.

Also the arithmetic of the doc's "on paper" section: the bytes one decode step reads for each model
size and precision, from the configurations and the export recipes alone (no package needed), and
what they predict on a Raspberry Pi. tests/test_bench.py checks this arithmetic against the bytes
`edge-qwen bench` counts in real exported graphs.

    python bench/perf_doc.py bench/results/performance.json docs/performance.md
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edge_qwen.cache import kv_bytes_per_token
from edge_qwen.config import QwenConfig
from edge_qwen.export.options import ExportOptions, default_options
from edge_qwen.export.recipe import Recipe, Scheme


def qwen(hidden: int, layers: int, heads: int, ffn: int, head_dim: int) -> QwenConfig:
    """A released Qwen2.5 shape (../shared/models/README.md): 2 KV heads, vocab 151,936, tied."""
    return QwenConfig(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=head_dim,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )


LADDER = {
    "0.5B": qwen(896, 24, 14, 4864, 64),
    "1.5B": qwen(1536, 28, 12, 8960, 128),
    "3B": qwen(2048, 36, 16, 11008, 128),
}
PRECISIONS = ("fp32", "fp16", "int8", "int4")
PAPER_CONTEXT = 192  # the bench protocol's average decode context: 128 prompt + (128 + 1) / 2


@dataclass(frozen=True)
class Device:
    """A board to predict for: peak bandwidth from its memory's spec, a sustained read rate assumed."""

    name: str
    cores: str
    dotprod: bool
    peak_gb_s: float  # MT/s x 4 bytes (a 32-bit bus)
    sustained_gb_s: float
    sustained_source: str


DEVICES = (
    Device("Raspberry Pi 5", "4x Cortex-A76 2.4 GHz", True, 4267e6 * 4 / 1e9, 10.0, "assumed (~60% of peak)"),
    Device(
        "Raspberry Pi 4",
        "4x Cortex-A72 1.5-1.8 GHz",
        False,
        3200e6 * 4 / 1e9,
        5.5,
        "STREAM copy, sci-pi.org.uk/bench/stream.html",
    ),
)


# -- bytes per token ------------------------------------------------------------------------------


def layer_matrices(cfg: QwenConfig) -> list[tuple[str, int, int]]:
    """(packed weight name, out_features, in_features) of one layer, as the exporter packs them."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return [
        ("qkv_proj", q + 2 * kv, cfg.hidden_size),
        ("o_proj", cfg.hidden_size, q),
        ("gate_up_proj", 2 * cfg.intermediate_size, cfg.hidden_size),
        ("down_proj", cfg.hidden_size, cfg.intermediate_size),
    ]


def matrix_bytes(rows: int, cols: int, s: Scheme) -> int:
    """Bytes of a (rows, cols) weight as MatMulNBits / MatMul reads it (fp16 is folded to fp32 at load)."""
    if not s.quantized:
        return rows * cols * 4
    n_blocks = math.ceil(cols / s.block_size)
    zero_points = 0 if s.symmetric else rows * math.ceil(n_blocks * s.bits / 8)
    return rows * n_blocks * (s.block_size * s.bits // 8 + 4) + zero_points  # codes + fp32 scales


def row_bytes(cols: int, s: Scheme) -> int:
    """Bytes one embedding row takes (Gather / GatherBlockQuantized read one per token)."""
    if not s.quantized:
        return cols * (2 if s.dtype == "fp16" else 4)
    n_blocks = math.ceil(cols / s.block_size)
    zero_points = 0 if s.symmetric else math.ceil(n_blocks * s.bits / 8)
    return math.ceil(cols * s.bits / 8) + n_blocks * 4 + zero_points


def weight_bytes_per_token(cfg: QwenConfig, opts: ExportOptions) -> int:
    """Weight bytes one decode step reads: every matrix, norms, biases, one embedding and rotary row."""
    recipe = opts.recipe_for(cfg)
    q, kv, hidden = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
        cfg.hidden_size,
    )
    per_layer_floats = 2 * hidden + q + 2 * kv  # two norm weights, the qkv bias
    total = (cfg.num_hidden_layers * per_layer_floats + hidden) * 4  # + the final norm
    total += sum(
        matrix_bytes(rows, cols, recipe.scheme_for(name, i, cfg.num_hidden_layers))
        for i in range(cfg.num_hidden_layers)
        for name, rows, cols in layer_matrices(cfg)
    )
    total += row_bytes(hidden, recipe.embeddings) + matrix_bytes(cfg.vocab_size, hidden, recipe.lm_head)
    return total + 2 * (cfg.head_dim // 2) * 4  # one row each of the cos and sin caches


def int8_unpacked_bytes_per_token(cfg: QwenConfig, opts: ExportOptions) -> int:
    """Extra traffic of 8-bit MatMulNBits on a CPU without dotprod: ONNX Runtime dequantizes the whole
    matrix to a float32 temporary on every call (written, then read by the SGEMM): 8 bytes a weight."""
    recipe = opts.recipe_for(cfg)
    weights = sum(
        rows * cols
        for i in range(cfg.num_hidden_layers)
        for name, rows, cols in layer_matrices(cfg)
        if recipe.scheme_for(name, i, cfg.num_hidden_layers).bits == 8
    )
    weights += cfg.vocab_size * cfg.hidden_size if recipe.lm_head.bits == 8 else 0
    return weights * 8


def bits_per_weight(s: Scheme) -> float:
    """Stored bits per weight, scales and zero points included (two blocks: zero points pack in pairs)."""
    return 8 * matrix_bytes(1, 2 * s.block_size, s) / (2 * s.block_size) if s.quantized else 32.0


def paper_rows() -> list[dict[str, Any]]:
    """The arithmetic of the doc's paper section, one row per model size and precision."""
    rows = []
    for size, cfg in LADDER.items():
        for precision in PRECISIONS:
            opts = default_options(precision)
            weights = weight_bytes_per_token(cfg, opts)
            kv = kv_bytes_per_token(cfg) * PAPER_CONTEXT
            extra = int8_unpacked_bytes_per_token(cfg, opts)
            rows.append(
                {
                    "size": size,
                    "precision": precision,
                    "recipe": describe(opts.recipe_for(cfg)),
                    "weight_bytes_per_token": weights,
                    "kv_bytes_per_position": kv_bytes_per_token(cfg),
                    "bytes_per_token": weights + kv,
                    "no_dotprod_extra_bytes": extra,
                    "predicted_decode_tps": {d.name: predicted_tps(d, weights + kv, extra) for d in DEVICES},
                }
            )
    return rows


def predicted_tps(d: Device, bytes_per_token: int, no_dotprod_extra: int) -> dict[str, float]:
    """Decode tok/s if reading is all that limits it; a CPU without dotprod also reads its int8 detour."""
    read = bytes_per_token + (0 if d.dotprod else no_dotprod_extra)
    return {"peak": d.peak_gb_s * 1e9 / read, "sustained": d.sustained_gb_s * 1e9 / read}


def describe(recipe: Recipe) -> str:
    """A recipe in one line: body, lm_head and the int8 sensitive tensors."""
    d = recipe.to_dict()
    sensitive = next((v for k, v in d.items() if k.startswith("sensitive")), None)
    text = f"body {d['body']}"
    text += "".join(f", {weight} {d[weight]}" for weight, _ in recipe.body_blocks)
    text += f", lm_head {d['lm_head']}"
    return text + (f", sensitive {sensitive}" if sensitive else "")


def default_int4_schemes() -> list[tuple[str, Scheme]]:
    """The int4 variants the kernel table covers: the default's block size first, sym and asym."""
    body = default_options("int4").recipe.body
    blocks = [body.block_size, *(b for b in (32, 64, 128) if b != body.block_size)]
    return [
        (f"b{b} {'sym' if sym else 'asym'}", replace(body, block_size=b, symmetric=sym))
        for b in blocks
        for sym in (True, False)
    ]


# -- rendering ------------------------------------------------------------------------------------


def render(data: dict[str, Any]) -> str:
    out = [
        "# Performance",
        "",
        "Generated by `python bench/compare.py` (bench/perf_doc.py renders it); do not edit.",
        "",
    ]
    out += render_measured(data)
    out += render_curve(data.get("curve"))
    out += render_paper(data["paper"], data.get("measured_fraction"))
    return "\n".join(out) + "\n"


def render_measured(data: dict[str, Any]) -> list[str]:
    meta, engines = data["meta"], data["engines"]
    out = [
        "## Measured: edge-qwen, llama.cpp and onnxruntime-genai on the real 0.5B",
        "",
        measured_intro(meta),
        "",
    ]
    cols = [
        ("prefill tok/s", "prefill_tps", "{:.1f}"),
        ("decode tok/s", "decode_tps", "{:.2f}"),
        ("TTFT ms", "ttft_s", "{:.0f}", 1e3),
        ("load s", "load_s", "{:.2f}"),
        ("peak RSS MB", "peak_rss_bytes", "{:.0f}", 1e-6),
        ("on disk MB", "size_bytes", "{:.0f}", 1e-6),
    ]
    out.append("| engine | " + " | ".join(c[0] for c in cols) + " |")
    out.append("|---|" + "---:|" * len(cols))
    for name, e in engines.items():
        if "median" not in e:
            out.append(f"| {name} (unavailable: {e['error']}) | " + " | ".join("-" for _ in cols) + " |")
            continue
        cells = [_cell(e["median"].get(c[1]), c[2], c[3] if len(c) > 3 else 1.0) for c in cols]
        out.append(f"| {name} (runs: {e['runs']}) | " + " | ".join(cells) + " |")
    out += [
        "",
        "Ratios, ours / peer (the medians above); targets from issue 6 (the lead tunes toward them):",
        "",
    ]
    out.append("| ratio | better | measured | target | met |")
    out.append("|---|---|---:|---:|:---:|")
    for r in data["ratios"]:
        value = "-" if r["value"] is None else f"{r['value']:.2f}"
        target = "-" if r["target"] is None else f"{r['op']} {r['target']}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        better = "higher" if r["op"] == ">=" else "lower"
        out.append(f"| {r['name']} | {better} | {value} | {target} | {met} |")
    return out + [""]


def _cell(value: float | None, fmt: str, scale: float) -> str:
    return "-" if value is None else fmt.format(value * scale)


def render_curve(curve: list[dict[str, Any]] | None) -> list[str]:
    out = ["## Our size ladder: decode speed and memory against model size", ""]
    if not curve:
        return out + ["Not measured in this run (`python bench/compare.py --curve`).", ""]
    out += [
        "Random weights at the released configurations (speed does not depend on the values; tied",
        "embeddings as released, so the files are smaller than the untied GGUF's export above), exported",
        "with the default INT4 recipe's layout (rounding: rtn, nothing to calibrate on); one",
        "`edge-qwen bench` subprocess per size, after the rounds above.",
        "",
        "| size | on disk MB | decode tok/s | prefill tok/s | peak RSS MB | MB / token | GB/s | of probe |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in curve:
        out.append(
            f"| {c['size']} | {c['size_bytes'] / 1e6:.0f} | {c['decode_tps']:.2f} | {c['prefill_tps']:.1f} "
            f"| {c['peak_rss_bytes'] / 1e6:.0f} | {c['bytes_per_token'] / 1e6:.0f} "
            f"| {c['achieved_gb_s']:.1f} | {100 * c['bandwidth_fraction']:.0f}% |"
        )
    return out + [""]


def render_paper(paper: dict[str, Any], measured_fraction: float | None) -> list[str]:
    head_share = 100 * paper["lm_head_share_0_5b_int4"]
    out = [PAPER_TEXT.format(context=PAPER_CONTEXT, head_share=head_share).rstrip(), ""]
    pi5, pi4 = DEVICES
    out.append(
        "| size | precision | weights MB / token | KV KB / position | MB / token | "
        f"{pi5.name} tok/s (peak / sustained) | {pi4.name} tok/s (peak / sustained; int8 detour) |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|")
    for r in paper["rows"]:
        p = r["predicted_decode_tps"]
        out.append(
            f"| {r['size']} | {r['precision']} | {r['weight_bytes_per_token'] / 1e6:.0f} | "
            f"{r['kv_bytes_per_position'] / 1e3:.0f} | {r['bytes_per_token'] / 1e6:.0f} | "
            f"{p[pi5.name]['peak']:.1f} / {p[pi5.name]['sustained']:.1f} | "
            f"{p[pi4.name]['peak']:.1f} / {p[pi4.name]['sustained']:.1f} |"
        )
    out += [
        "",
        "Recipes (`default_options` of each precision): "
        + "; ".join(
            sorted({f"{r['precision']}: {r['recipe']}" for r in paper["rows"] if r["size"] == "0.5B"})
        )
        + ".",
        "",
    ]
    for d in DEVICES:
        out.append(
            f"- {d.name} ({d.cores}): peak {d.peak_gb_s:.1f} GB/s (32-bit bus); sustained read "
            f"{d.sustained_gb_s:.1f} GB/s, {d.sustained_source}."
        )
    if measured_fraction:
        out.append(
            f"- Decode on this run's machine reached {100 * measured_fraction:.0f}% of its probed read "
            "bandwidth: expect about that fraction of the sustained column on a board whose kernels keep up."
        )
    out += ["", KERNELS_TEXT.rstrip(), ""]
    out += _kernel_table(paper["kernels"])
    detours = [r for r in paper["rows"] if r["precision"] == "int4" and r["no_dotprod_extra_bytes"]]
    extra = ", ".join(
        f"{r['size']} {r['no_dotprod_extra_bytes'] / 1e6:.0f} MB over {r['bytes_per_token'] / 1e6:.0f} MB"
        for r in detours
    )
    out += [
        "",
        PI4_TEXT.format(
            extra=extra or "none (the default recipe has no 8-bit matrices)",
            pull=(
                "Not done: `pull` picking an all-int4 recipe by itself on such a CPU."
                if extra
                else "The default INT4 recipe holds no 8-bit matrix, so what `pull` exports runs on a "
                "Pi 4 without this detour."
            ),
        ).rstrip(),
        "",
    ]
    return out


def _kernel_table(kernels: list[dict[str, str]]) -> list[str]:
    out = [
        "| int4 weights | Cortex-A76 decode (M=1) | Cortex-A76 prefill | Cortex-A72 decode "
        "| Cortex-A72 prefill | bits / weight |",
        "|---|---|---|---|---|---:|",
    ]
    for k in kernels:
        out.append(
            f"| {k['variant']} | {k['a76_decode']} | {k['a76_prefill']} | {k['a72_decode']} "
            f"| {k['a72_prefill']} | {k['bits_per_weight']} |"
        )
    return out


def kernel_rows() -> list[dict[str, str]]:
    """Which ONNX Runtime kernel each int4 variant takes on each core (see KERNELS_TEXT for sources)."""
    default = default_options("int4").recipe.body
    rows = []
    for variant, s in default_int4_schemes():
        gemv, gemm = (
            ("qai8dxp1x4_qsi4c32p4x4_1x4", "qai8dxp4x4_qsi4c32p4x4_16x4")
            if s.symmetric
            else ("qsi8d32p1x4_qai4c32p4x4_1x4", "qsi8d32p4x4_qai4c32p4x4_8x4")
        )
        rows.append(
            {
                "variant": variant + (" (default)" if s == default else ""),
                "a76_decode": f"KleidiAI `{gemv}_neon_dotprod`",
                "a76_prefill": f"KleidiAI `{gemm}_neon_dotprod`",
                "a72_decode": "MLAS `SQ4BitGemmM1Kernel_CompFp32`",
                "a72_prefill": "MLAS `SQ4BitBlkDequantBForSgemm_CompFp32` + SGEMM",
                "bits_per_weight": f"{bits_per_weight(s):.2f}",
            }
        )
    return rows


def paper() -> dict[str, Any]:
    """Everything the paper section shows, for the JSON file and the doc."""
    cfg, opts = LADDER["0.5B"], default_options("int4")
    head = matrix_bytes(cfg.vocab_size, cfg.hidden_size, opts.recipe_for(cfg).lm_head)
    return {
        "rows": paper_rows(),
        "kernels": kernel_rows(),
        "devices": [d.__dict__ for d in DEVICES],
        "lm_head_share_0_5b_int4": head / weight_bytes_per_token(cfg, opts),
    }


def measured_intro(meta: dict[str, Any]) -> str:
    return MEASURED_TEXT.format(**meta).rstrip()


MEASURED_TEXT = """\
Run {date} on {cpu} ({logical_cores} logical cores), onnxruntime {onnxruntime}, llama.cpp \
{llamacpp}, onnxruntime-genai {ortgenai}. {note}

Model: the real Qwen2.5-Coder-0.5B-Instruct (`../shared/models/fetch_gguf.py`). Ours: the default \
INT4 package (`default_options("int4")`: {recipe}), exported from that GGUF. llama.cpp: the GGUF as \
is (Q4_K_M), `llama-bench -p {prompt_tokens} -n {gen_tokens} -r 1 -t {threads}`. onnxruntime-genai: \
its model builder's INT4 CPU default (`../shared/peers/ortgenai_peer.sh`), timed by \
`ortgenai_bench.py`. Protocol (llama-bench's): a {prompt_tokens}-token prompt (prefill tok/s), then \
{gen_tokens} greedy tokens (decode tok/s). {rounds} round(s); within each the engines run one after \
the other (ours, ours in 4 KiB pages, onnxruntime-genai, llama.cpp), so drift of this shared \
machine hits all of them alike; the table shows medians over rounds. Every run is a fresh process. \
Ours and llama.cpp use {threads} threads; onnxruntime-genai its own default.

What differs between engines, and is not hidden: llama-bench times decoding from an empty context, \
ours and onnxruntime-genai after the prompt (context {prompt_tokens} to \
{prompt_tokens}+{gen_tokens}). TTFT is prefill plus picking the first token for ours, \
onnxruntime-genai's `append_tokens` (prefill, first logits) for it, and prompt / prefill rate for \
llama.cpp. Load time: `edge_qwen.load` (session, tokenizer, template) for ours, `og.Model` + \
`og.Tokenizer` for onnxruntime-genai; llama-bench does not report one. Peak RSS is each process's \
high-water mark, VmHWM (ours read by itself before its memory-bandwidth probe, the peers' polled \
from /proc every 20 ms; not ru_maxrss, which a child inherits from a large parent through vfork), \
so it includes each runtime's Python or C++ process around the model.

Huge pages: `edge-qwen` restarts itself asking glibc for transparent huge pages \
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, apps/launch.py), so ONNX Runtime's packed weights, which \
every decode step streams, sit in 2 MiB pages; a library user gets them by setting the variable \
(README, Speed). The row "4 KiB pages" is the same package and command with \
`EDGE_QWEN_HUGE_PAGES=0`, in the same rounds; the ratios use the default. Its load is faster here \
because the kernel zeroes each new huge page on this virtual machine's never-touched memory (free \
page reporting hands freed 2 MiB blocks back to the host), ~1 s per GB on first touch. \
How much of decode's gain comes from nested paging (a TLB miss in a guest walks two page tables) \
is not measured: no bare-metal machine was at hand.
"""

PAPER_TEXT = """\
## On paper: bytes per decoded token, and what they predict on a Raspberry Pi

At batch 1 a decode step reads every weight once (each matrix whole, the embedding table one row) \
and the KV cache of the context so far, and reuses none of it for the next token: decode speed is \
bounded by memory read bandwidth / bytes per token. The table computes those bytes from the \
released configurations and each precision's export recipe (`weight_bytes_per_token` in \
bench/perf_doc.py, which tests/test_bench.py checks against the bytes `edge-qwen bench` counts in \
real exported graphs), with the fp32 KV cache at {context} positions (the bench protocol's average \
decode context). fp16 packages are half the size on disk, but ONNX Runtime folds their Casts at \
load, so they are read, and held in memory, as fp32. The tied vocabulary matrix is stored once, \
but lm_head reads all of it every token: {head_share:.0f}% of the 0.5B int4 bytes.

Predicted decode tok/s = bandwidth / MB per token, at the memory's peak (a bound no kernel \
reaches) and at a sustained read rate. These are predictions, not measurements: no Pi was at hand; \
`edge-qwen bench` on a board measures both sides (its probe line is the board's read rate).
"""

KERNELS_TEXT = """\
### Which ONNX Runtime kernels a Pi takes for the default recipe

Our quantized matrices are `MatMulNBits` with `accuracy_level=4` (int8 compute). From ONNX \
Runtime's sources (microsoft/onnxruntime, main branch as stored by our search index):

- `onnxruntime/contrib_ops/cpu/quantization/matmul_nbits.cc`, `GetComputeType`: level 4 picks \
`SQNBIT_CompInt8` only if `MlasIsQNBitGemmAvailable(bits, block, SQNBIT_CompInt8)`, and otherwise \
silently `SQNBIT_CompFp32`: level 4 is a request, not a requirement.
- `onnxruntime/core/mlas/lib/platform.cpp`: on ARM64, `QNBitGemmDispatch = \
&GetMlasQNBitGemmDispatchNeon(HasDotProductInstructions, HasI8MMInstructions)`; dotprod is \
`asimddp` in /proc/cpuinfo.
- `onnxruntime/core/mlas/lib/qnbitgemm_kernel_neon.cpp`, `GetMlasQNBitGemmDispatchNeon`: every \
int8-compute kernel (4-bit `SQ4BitGemmKernel_CompInt8` and the KleidiAI hooks, 8-bit \
`SQ8BitGemmKernel_BlkSum_CompInt8`, the activation quantizers) is installed only `if \
(InitializeWithDotSupport)`; the fp32-compute 4-bit kernels always.
- `onnxruntime/core/mlas/lib/kleidiai/qnbitgemm_kleidiai.cpp`, `SelectKleidiAIQ4Backend`: Arm's \
KleidiAI micro-kernels take a 4-bit matrix when `BlkLen % 32 == 0`, `K % BlkLen == 0` and the CPU \
has SME2, i8mm or dotprod: with zero points (asymmetric) the asymmetric backend `Qsi8d32pQai4c32p`, \
without (symmetric) `Qai8dxpQsi4c32p`, whose packing truncates the fp32 block scales to bf16 (a \
numeric difference on ARM only: quality measured on x86 does not see it). Every Qwen2.5 K (896, \
1536, 2048, 4864, 8960, 11008) is a multiple of 128, so blocks of 32, 64 and 128 all qualify.
- `onnxruntime/core/mlas/lib/kleidiai/kai_ukernel_interface.cpp`: the micro-kernel per CPU: SME2, \
else i8mm, else dotprod. The Cortex-A76 has dotprod and no i8mm; the Cortex-A72 has neither.
- 8-bit matrices (the recipe's sensitive tensors) on the A76: `SQ8BitGemmKernel_BlkSum_CompInt8` \
(MLAS NEON, unsigned dot products, `qnbitgemm_kernel_neon.cpp`).

Version caveat: asymmetric int4 reached KleidiAI's dedicated asymmetric kernels in PR #29654 (July \
2026); from PR #27751 (March 2026) it ran KleidiAI's symmetric kernel plus a float zero-point \
correction, and before that MLAS's own NEON dotprod kernel (`sqnbitgemm_kernel_neon_int8.cpp`). We \
could not tie the installed ONNX Runtime to a commit of those files (its wheel reports commit \
fab30a4); on an A76 every variant runs int8 dot products either way. KleidiAI is compiled in only \
with `onnxruntime_USE_KLEIDIAI` (`tools/ci_build/build.py` sets it for Android arm64, Windows on Arm \
and hosts whose `platform.machine()` says arm64); whether a given Linux aarch64 wheel has it we \
could not check here. Without it the A76 takes MLAS's own dotprod kernels, still int8 compute.
"""

PI4_TEXT = """\
### A Pi 4 (Cortex-A72, no dotprod): what the fallback costs, and what the runtime does

The A72 lacks `asimddp`, so `MlasIsQNBitGemmAvailable(..., SQNBIT_CompInt8)` is false and every \
`MatMulNBits` runs with fp32 compute:

- 4-bit matrices, the bulk of the default recipe, stay packed. Decode uses \
`SQ4BitGemmM1Kernel_CompFp32` (NEON: unpack the 4-bit codes, scale, fp32 multiply-add): the same \
bytes are read, so decode can stay near the bandwidth bound as long as four A72 cores unpack as \
fast as memory delivers. Prefill dequantizes B in 32-column strips to fp32 and runs MLAS's SGEMM \
(`SQ4BitGemm_CompFp32` in `qnbitgemm.cpp`): it loses int8's throughput, so prefill, not decode, \
takes most of the loss.
- 8-bit matrices have no fp32-compute variant (`GetQNBitGemmVariant` in `qnbitgemm.cpp` knows only \
`SQ8BitGemmVariant_CompInt8` for 8 bits): nothing is prepacked and `MatMulNBits::Compute` falls to \
`ComputeBUnpacked`, which on every call dequantizes the whole matrix into a float32 temporary \
(`MlasDequantizeBlockwise<float, 8>`) and runs SGEMM over it; ONNX Runtime logs this only at INFO, \
which our sessions do not show. That is 8 more bytes of traffic per int8 weight and token (the fp32 \
copy written, then read). For the default int4 recipe's int8 tensors, per token: {extra}.

What the runtime does about it: ONNX Runtime falls back correctly (fp32 compute is, if anything, \
more accurate), and `edge_qwen.load` logs one warning when the machine is ARM, /proc/cpuinfo lacks \
`asimddp` and the package's recipe holds int8 matrices, naming the fix: export without int8 matrices \
(`edge-qwen export ... --no-mixed --lm-head int4`) so that only the 4-bit fp32-compute kernels run \
(`int8_fallback_warning` in edge_qwen/providers.py; tests/test_providers.py). `edge-qwen bench` \
prints the CPU's kernel-relevant features (no `asimddp` on a Pi 4), so the fallback shows in its \
report too. {pull}
"""


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(render(json.loads(src.read_text())))


if __name__ == "__main__":
    main()
