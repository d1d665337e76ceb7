#!/usr/bin/env python3
"""A long chat against a real package: does resident memory stay flat while the session overflows?

    nice -n 10 python bench/soak.py [PACKAGE] [--turns 200] [--max-context 256] [--max-tokens 32]
                                    [--warmup 20] [--limit-mb 50] [--json bench/results/soak.json]

One chat session with a small context and overflow="truncate-oldest", so that after a few turns
every turn drops the oldest ones and the cache is rewound and refilled. Each turn prints the
process's resident size (VmRSS) and its anonymous part (RssAnon: the heap, which only freeing
returns). After `--warmup` turns, VmRSS may not rise more than `--limit-mb` above its value at the
end of the warm-up, and at least one turn must have dropped messages: otherwise the script exits 1.
Greedy decoding, prompts cycled from a fixed list, so a rerun repeats the same conversation.
Linux only (reads /proc/self/status).

A turn's cost is a prefill of what the cache lacks plus `--max-tokens` decode steps. Once the
session truncates, the dropped turns were the start of the cached prompt, so the cache keeps only
the system message and every turn prefills the rest of the context again: the context size, not the
turn count, sets the time. The JSON record is rewritten after every turn (a temporary file renamed
over it), so an interrupted run leaves its turns so far with `"status": "interrupted"`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_PACKAGE = Path.home() / ".cache/edge-qwen-bench/compare/qwen2.5-coder-0.5b-instruct-int4"

PROMPTS = (
    "Write a Python function that reverses a linked list.",
    "Explain what a context manager is in two sentences.",
    "How do I read a CSV file with the csv module?",
    "What does `git rebase -i` do?",
    "Give a regular expression that matches an IPv4 address.",
    "Why is my recursive function slow? It computes Fibonacci numbers.",
    "Translate this to JavaScript: print(sum(x * x for x in range(10)))",
    "What is the difference between a list and a tuple?",
    "用一句话解释什么是闭包。",
    "Write a SQL query for the ten most recent orders.",
    "How do I make a shell script stop at the first error?",
    "Summarise our conversation so far in one line.",
)


def memory_mb() -> tuple[float, float]:
    """(VmRSS, RssAnon) of this process in MB (10^6 bytes)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[key].split()[0]) * 1024 / 1e6 for key in ("VmRSS", "RssAnon"))  # type: ignore[return-value]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.machine()


def write_record(path: Path | None, verdict: dict[str, Any], steps: list[dict[str, Any]]) -> None:
    """Replace the JSON record at `path` whole: a reader never sees a half-written file."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"verdict": verdict, "steps": steps}, indent=1) + "\n")
    os.replace(tmp, path)


def summary(
    args: argparse.Namespace, steps: list[dict[str, Any]], status: str, seconds: float
) -> dict[str, Any]:
    """The verdict over the turns so far; `passed` is None until the run is complete."""
    after = steps[args.warmup :]
    baseline = steps[args.warmup - 1]["rss_mb"] if len(steps) >= args.warmup else None
    peak = max(step["rss_mb"] for step in after) if after else None
    growth = None if baseline is None or peak is None else round(peak - baseline, 1)
    truncating = sum(1 for step in steps if step["dropped_messages"])
    passed = None
    if status == "complete":
        passed = growth is not None and growth <= args.limit_mb and truncating > 0
    return {
        "status": status,  # "running", "interrupted" or "complete"
        "package": str(args.package),
        "cpu": cpu_name(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "turns": args.turns,
        "turns_done": len(steps),
        "max_context": args.max_context,
        "max_tokens": args.max_tokens,
        "warmup": args.warmup,
        "turns_that_dropped_messages": truncating,
        "messages_dropped": sum(step["dropped_messages"] for step in steps),
        "rss_after_warmup_mb": baseline,
        "rss_peak_after_warmup_mb": peak,
        "rss_end_mb": steps[-1]["rss_mb"] if steps else None,
        "rss_growth_mb": growth,
        "anon_after_warmup_mb": steps[args.warmup - 1]["anon_mb"] if baseline is not None else None,
        "anon_end_mb": steps[-1]["anon_mb"] if steps else None,
        "limit_mb": args.limit_mb,
        "passed": passed,
        "seconds": round(seconds, 1),
    }


def run_turn(session: Any, turn: int, turn_started: float) -> dict[str, Any]:
    """Send the turn's prompt; the step's memory, tokens and times."""
    reply = session.send(PROMPTS[(turn - 1) % len(PROMPTS)])
    stats = session.last_stats
    assert stats is not None  # a finished turn always records its stats
    rss, anon = memory_mb()
    return {
        "turn": turn,
        "rss_mb": round(rss, 1),
        "anon_mb": round(anon, 1),
        "prompt_tokens": stats.prompt_tokens,
        "reused_tokens": stats.reused_tokens,
        "generated_tokens": stats.generated_tokens,
        "dropped_messages": stats.dropped_messages,
        "reply_chars": len(reply),
        "prefill_seconds": round(stats.prefill_seconds, 3),
        "decode_seconds": round(stats.decode_seconds, 3),
        "seconds": round(time.perf_counter() - turn_started, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package", type=Path, nargs="?", default=DEFAULT_PACKAGE)
    p.add_argument("--turns", type=int, default=200)
    p.add_argument("--max-context", type=int, default=256, help="tokens: small, so the chat overflows often")
    p.add_argument("--max-tokens", type=int, default=32, help="the most tokens one answer may take")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--limit-mb", type=float, default=50.0)
    p.add_argument("--json", type=Path, default=None, help="keep every step and the verdict here")
    args = p.parse_args()
    if not 0 < args.warmup < args.turns:
        p.error("--warmup must be between 1 and --turns - 1")

    import edge_qwen

    model = edge_qwen.load(args.package)
    session = model.chat(
        system="You are a concise coding assistant.",
        max_context=args.max_context,
        overflow="truncate-oldest",
        max_tokens=args.max_tokens,
        temperature=0.0,
    )
    steps: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for turn in range(1, args.turns + 1):
            step = run_turn(session, turn, time.perf_counter())
            steps.append(step)
            print(
                f"turn {turn:4d}  rss {step['rss_mb']:7.1f} MB  anon {step['anon_mb']:7.1f} MB  "
                f"prompt {step['prompt_tokens']:4d} (reused {step['reused_tokens']:4d})  "
                f"generated {step['generated_tokens']:3d}  dropped {step['dropped_messages']}  "
                f"{step['seconds']:6.2f} s",
                flush=True,
            )
            write_record(args.json, summary(args, steps, "running", time.perf_counter() - started), steps)
    except KeyboardInterrupt:
        write_record(args.json, summary(args, steps, "interrupted", time.perf_counter() - started), steps)
        print(f"interrupted after {len(steps)} turns", file=sys.stderr)
        return 130
    verdict = summary(args, steps, "complete", time.perf_counter() - started)
    write_record(args.json, verdict, steps)
    print(json.dumps(verdict, indent=2))
    if verdict["turns_that_dropped_messages"] == 0:
        print("FAIL: no turn overflowed the context: lower --max-context or raise --turns", file=sys.stderr)
    elif not verdict["passed"]:
        print(
            f"FAIL: RSS grew {verdict['rss_growth_mb']} MB after warm-up (limit {args.limit_mb:.0f} MB)",
            file=sys.stderr,
        )
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
