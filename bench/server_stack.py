#!/usr/bin/env python3
"""What an HTTP stack costs beside the model: import time and resident memory it adds to a process
that has already imported the runtime (numpy, onnxruntime, tokenizers).

    python bench/server_stack.py [--rounds 5]

Each stack is imported in a fresh interpreter, rounds interleaved; a stack that is not installed is
reported as such. Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

STACKS = {
    "http.server (standard library)": "import http.server, socketserver",
    "aiohttp": "import aiohttp.web",
    "starlette + uvicorn": "import starlette.applications, starlette.responses, uvicorn",
}

PROBE = """
import time, json
from pathlib import Path
def rss():
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1000
import numpy, onnxruntime, tokenizers
before, start = rss(), time.perf_counter()
exec(%r)
print(json.dumps({"seconds": time.perf_counter() - start, "mb": rss() - before}))
"""


def measure(statement: str) -> dict[str, float] | None:
    run = subprocess.run([sys.executable, "-c", PROBE % statement], capture_output=True, text=True)
    return json.loads(run.stdout) if run.returncode == 0 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in STACKS}
    for _ in range(args.rounds):
        for name, statement in STACKS.items():
            got = measure(statement)
            if got is not None:
                results[name].append(got)
    print(f"{'stack':34s} {'import ms':>10s} {'RSS added MB':>13s}")
    for name, runs in results.items():
        if not runs:
            print(f"{name:34s} {'not installed':>24s}")
            continue
        ms = statistics.median(r["seconds"] for r in runs) * 1000
        mb = statistics.median(r["mb"] for r in runs)
        print(f"{name:34s} {ms:10.1f} {mb:13.1f}")


if __name__ == "__main__":
    main()
