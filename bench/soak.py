#!/usr/bin/env python3
"""A long chat against a real package: does resident memory stay flat while the session overflows?

    nice -n 10 python bench/soak.py [PACKAGE] [--turns 200] [--max-context 512] [--max-tokens 48]
                                    [--warmup 20] [--limit-mb 50] [--json bench/results/soak.json]

One chat session with a small context and overflow="truncate-oldest", so that after a few turns
every turn drops the oldest ones and the cache is rewound and refilled. Each turn prints the
process's resident size (VmRSS) and its anonymous part (RssAnon: the heap, which only freeing
returns). After `--warmup` turns, VmRSS may not rise more than `--limit-mb` above its value at the
end of the warm-up: otherwise the script exits 1. Greedy decoding, prompts cycled from a fixed list,
so a rerun repeats the same conversation. Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package", type=Path, nargs="?", default=DEFAULT_PACKAGE)
    p.add_argument("--turns", type=int, default=200)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--limit-mb", type=float, default=50.0)
    p.add_argument("--json", type=Path, default=None, help="write every step and the verdict here")
    args = p.parse_args()
    if args.warmup >= args.turns:
        p.error("--warmup must be smaller than --turns")

    import edge_qwen

    model = edge_qwen.load(args.package)
    session = model.chat(
        system="You are a concise coding assistant.",
        max_context=args.max_context,
        overflow="truncate-oldest",
        max_tokens=args.max_tokens,
    )
    steps = []
    started = time.perf_counter()
    for turn in range(1, args.turns + 1):
        reply = session.send(PROMPTS[(turn - 1) % len(PROMPTS)])
        stats = session.last_stats
        assert stats is not None  # a finished turn always records its stats
        rss, anon = memory_mb()
        steps.append(
            {
                "turn": turn,
                "rss_mb": round(rss, 1),
                "anon_mb": round(anon, 1),
                "prompt_tokens": stats.prompt_tokens,
                "reused_tokens": stats.reused_tokens,
                "generated_tokens": stats.generated_tokens,
                "dropped_messages": stats.dropped_messages,
                "reply_chars": len(reply),
            }
        )
        print(
            f"turn {turn:4d}  rss {rss:7.1f} MB  anon {anon:7.1f} MB  prompt {stats.prompt_tokens:4d} "
            f"(reused {stats.reused_tokens:4d})  generated {stats.generated_tokens:3d}  "
            f"dropped {stats.dropped_messages}",
            flush=True,
        )
    baseline = steps[args.warmup - 1]["rss_mb"]
    peak = max(step["rss_mb"] for step in steps[args.warmup :])
    growth = peak - baseline
    passed = growth <= args.limit_mb
    truncating = sum(1 for step in steps if step["dropped_messages"])
    verdict = {
        "package": str(args.package),
        "machine": platform.machine(),
        "turns": args.turns,
        "max_context": args.max_context,
        "max_tokens": args.max_tokens,
        "warmup": args.warmup,
        "turns_that_dropped_messages": truncating,
        "rss_after_warmup_mb": baseline,
        "rss_peak_after_warmup_mb": peak,
        "rss_growth_mb": round(growth, 1),
        "limit_mb": args.limit_mb,
        "passed": passed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(verdict, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"verdict": verdict, "steps": steps}, indent=1) + "\n")
    if not passed:
        print(f"FAIL: RSS grew {growth:.1f} MB after warm-up (limit {args.limit_mb:.0f} MB)", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
