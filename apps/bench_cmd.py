"""The `bench` command: a thin layer over edge_qwen.apps.benchmark, printed llama-bench style or as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # the library (numpy, onnxruntime) is imported only when the command runs
    from edge_qwen.apps.benchmark import BenchResult, Stat


@click.command()
@click.argument("model")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--gen-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--repetitions", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: physical cores]."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench(
    model: str, prompt_tokens: int, gen_tokens: int, repetitions: int, threads: int | None, as_json: bool
) -> None:
    """Measure MODEL (a package folder or a catalog name): prefill and decode tokens/s, time to first
    token, load time, peak RSS, size, and decode's memory traffic against the machine's bandwidth.

    Timings are the median (and min, max) of --repetitions runs of a --prompt-tokens random prompt
    followed by --gen-tokens greedy steps. Peak RSS is this process's high-water mark.
    """
    from edge_qwen.apps.benchmark import run_benchmark
    from edge_qwen.hub import catalog

    path = catalog.resolve(model)
    result = run_benchmark(path, prompt_tokens, gen_tokens, repetitions, threads)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    for line in report_lines(result):
        click.echo(line)


def report_lines(r: BenchResult) -> list[str]:
    """The human-readable report: a header, a table of timings, then memory and bandwidth."""
    m, t = r.machine, r.traffic
    rows = [
        (f"pp{r.prompt_tokens} tok/s", r.prefill_tokens_per_second, 1.0),
        (f"tg{r.gen_tokens} tok/s", r.decode_tokens_per_second, 1.0),
        ("ttft ms", r.ttft_seconds, 1e3),
        ("load ms", r.load_seconds, 1e3),
    ]
    lines = [
        f"package   {Path(r.package).name} ({r.precision}), {r.package_bytes / 1e6:.1f} MB on disk",
        f"runtime   onnxruntime {r.onnxruntime}, {', '.join(r.providers)}, {r.threads} threads",
        f"machine   {m.cpu} ({m.arch}, {m.logical_cores} logical cores"
        + (f"; {' '.join(m.features)})" if m.features else ")"),
        "",
        f"| {'test':<14} | {'median':>10} | {'min':>10} | {'max':>10} |",
        f"| {'-' * 14} | {'-' * 9}: | {'-' * 9}: | {'-' * 9}: |",
        *(_row(name, stat, scale) for name, stat, scale in rows),
        f"(repetitions: {r.repetitions})",
        "",
        f"peak RSS  {r.peak_rss_bytes / 1e6:.1f} MB; after load {r.anon_rss_after_load_bytes / 1e6:.1f} MB "
        f"anonymous + {r.file_rss_after_load_bytes / 1e6:.1f} MB file-backed (reclaimable)",
        *_first_load(r),
        f"decode    reads {t.total_bytes / 1e6:.1f} MB per token (weights {t.weight_bytes / 1e6:.1f} MB, "
        f"KV cache {t.kv_cache_bytes / 1e6:.1f} MB at {t.average_context:.0f} positions)",
        f"          = {r.achieved_bytes_per_second.median / 1e9:.2f} GB/s at "
        f"{r.decode_tokens_per_second.median:.1f} tok/s: {100 * r.bandwidth_fraction:.0f}% of the "
        f"{r.memory_bandwidth_bytes_per_second / 1e9:.1f} GB/s this machine reads "
        f"(numpy probe, {r.threads} threads)",
    ]
    return lines


def _first_load(r: BenchResult) -> list[str]:
    if r.first_load_seconds is None:
        return []
    peak_bytes = r.first_load_peak_rss_bytes
    peak = "" if peak_bytes is None else f", peak RSS {peak_bytes / 1e6:.1f} MB"
    return [f"first load {r.first_load_seconds:.2f} s{peak}: it packed the weights for this machine, once"]


def _row(name: str, stat: Stat, scale: float) -> str:
    s = stat.scaled(scale)
    return f"| {name:<14} | {s.median:>10.2f} | {s.min:>10.2f} | {s.max:>10.2f} |"
