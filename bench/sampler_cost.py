"""Per-token cost of the sampler at Qwen2.5's vocabulary (151,936 logits): a script, not a test.

    python bench/sampler_cost.py [--calls 200] [--json]

Each configuration samples from the same realistic row of logits (a few likely tokens over a long
tail) with a 1,000-token history; the table shows the median and 90th percentile of many calls, next
to a full argsort of the row, which the sampler never does.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np

from edge_qwen.sampling import make_sampler

VOCAB = 151_936
HISTORY = 1_000

CONFIGS: dict[str, dict[str, float | int]] = {
    "greedy": {},
    "temperature 0.7": {"temperature": 0.7},
    "top-k 40": {"temperature": 0.7, "top_k": 40},
    "top-p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "top-p 0.9 (flat, T=5)": {"temperature": 5.0, "top_p": 0.9},
    "min-p 0.05": {"temperature": 0.7, "min_p": 0.05},
    "penalties (rep/pres/freq)": {
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
    },
    "all of the above": {
        "temperature": 0.7,
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
    },
}


def realistic_logits(rng: np.random.Generator) -> np.ndarray:
    """A next-token row like a chat model's: a long Gaussian tail and a handful of strong candidates."""
    logits = rng.normal(0.0, 2.0, VOCAB).astype(np.float32)
    logits[rng.choice(VOCAB, 8, replace=False)] += np.linspace(14, 6, 8, dtype=np.float32)
    return logits


def time_calls(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """Median and 90th percentile of `calls` calls, in microseconds (after a few warm-up calls)."""
    for _ in range(5):
        fn()
    times = np.empty(calls)
    for i in range(calls):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    return float(np.median(times) * 1e6), float(np.percentile(times, 90) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    logits = realistic_logits(rng)
    history = rng.integers(0, VOCAB, HISTORY)
    results = {"full argsort (reference)": time_calls(lambda: np.argsort(logits), args.calls)}
    for name, options in CONFIGS.items():
        sampler = make_sampler(seed=0, **options)  # type: ignore[arg-type]
        results[name] = time_calls(lambda s=sampler: s(logits, history, prompt_len=HISTORY // 2), args.calls)
    if args.json:
        print(json.dumps({"vocab": VOCAB, "history": HISTORY, "us_per_token": results}, indent=2))
        return
    print(f"sampler cost per token, vocab {VOCAB:,}, history {HISTORY:,}, {args.calls} calls each")
    print(f"{'configuration':<28} {'median us':>10} {'p90 us':>10}")
    for name, (median, p90) in results.items():
        print(f"{name:<28} {median:>10.0f} {p90:>10.0f}")


if __name__ == "__main__":
    main()
