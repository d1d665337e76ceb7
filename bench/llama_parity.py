"""Greedy answers of a package against llama.cpp's on the same GGUF, prompt by prompt.

    python bench/llama_parity.py PACKAGE MODEL.gguf [--tokens 64] [--json out.json]

Both runtimes start from the same token ids (the package's chat template and tokenizer) and decode
greedily; llama.cpp runs through bench/llama_greedy.c, compiled here against the peers' build
(shared/peers/llamacpp_peer.sh, or LLAMA_CPP_DIR=<source dir with build/bin>). Where the two first
choose different tokens, both runtimes' top-two logits at that step are printed: a difference is a
near tie when both margins are within the runtimes' rounding, measured as the 99th percentile of the
gap between their logits of the token both chose, over every step where they agree.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import edge_qwen

PEERS = Path(os.environ.get("EDGE_QWEN_PEERS", Path.home() / ".cache/edge-qwen-peers"))
LLAMA_VERSION = "0.3.36"

PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is the capital of France?",
    "Explain what a hash table is in two sentences.",
    "Write a SQL query that counts the rows of a table named users.",
    "How do I read a file line by line in Python?",
    "Give me three tips for writing clean code.",
    "What does the `git rebase` command do?",
    "Write a bash one-liner that counts the lines of all .py files in a folder.",
    "Translate 'good morning' into Spanish and German.",
    "What is the difference between a list and a tuple in Python?",
    "Write a JavaScript function that returns the maximum of an array.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "What is a closure in programming?",
    "Write a C function that computes the factorial of n.",
    "Why is the sky blue?",
    "List the first ten prime numbers.",
    "Write a Rust function that checks whether a number is even.",
    "What is the time complexity of binary search, and why?",
    "Write a haiku about autumn.",
    "How do I create a virtual environment in Python?",
    "Explain recursion to a ten-year-old.",
    "Write a regular expression that matches an email address.",
    "用一句话介绍一下Python。",
    "What are the main differences between TCP and UDP?",
]


def llama_greedy_binary() -> Path:
    """bench/llama_greedy.c compiled against the peers' llama.cpp build (kept beside it)."""
    src = Path(
        os.environ.get("LLAMA_CPP_DIR", PEERS / f"src/llama_cpp_python-{LLAMA_VERSION}/vendor/llama.cpp")
    )
    lib = PEERS / f"llama.cpp-{LLAMA_VERSION}/bin"
    if not (src / "include/llama.h").is_file() or not (lib / "libllama.so").exists():
        sys.exit(f"no llama.cpp build at {src} / {lib}: run shared/peers/llamacpp_peer.sh first")
    source = Path(__file__).with_name("llama_greedy.c")
    out = lib.parent / "llama_greedy"
    if out.exists() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    cmd = ["gcc", "-O2", "-o", f"{out}.tmp", str(source), f"-I{src}/include", f"-I{src}/ggml/include"]
    subprocess.run([*cmd, f"-L{lib}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}"], check=True)
    os.replace(f"{out}.tmp", out)
    return out


def ours(model: edge_qwen.Model, ids: list[int], n: int) -> list[tuple[int, float, int, float]]:
    """(token, its logit, runner-up, its logit) per greedy step, as llama_greedy prints them."""
    cache, fed, steps = model.new_cache(len(ids) + n + 8), ids, []
    stops = set(model.manifest.stop_token_ids)
    for _ in range(n):
        logits = model.forward(fed, cache)
        second, best = (int(i) for i in np.argpartition(logits, -2)[-2:])  # runner-up, top
        if logits[second] > logits[best] or (logits[second] == logits[best] and second < best):
            second, best = best, second
        steps.append((best, float(logits[best]), second, float(logits[second])))
        if best in stops:
            break
        fed = [best]
    return steps


def theirs(binary: Path, gguf: Path, ids: list[int], n: int) -> list[tuple[int, float, int, float]]:
    out = subprocess.run(
        [str(binary), str(gguf), str(n), ",".join(map(str, ids))], check=True, capture_output=True, text=True
    ).stdout
    return [
        (int(a), float(b), int(c), float(d)) for a, b, c, d in (line.split() for line in out.splitlines())
    ]


def compare(package: Path, gguf: Path, tokens: int) -> dict:
    model = edge_qwen.load(package)
    binary = llama_greedy_binary()
    rows = []
    for prompt in PROMPTS:
        ids = model.encode_prompt(prompt, chat=True)
        a, b = ours(model, ids, tokens), theirs(binary, gguf, ids, tokens)
        same = [x[0] for x in a] == [y[0] for y in b]
        agreed = list(itertools.takewhile(lambda xy: xy[0][0] == xy[1][0], zip(a, b, strict=False)))
        row: dict = {"prompt": prompt, "tokens": len(a), "same": same}
        # How far the two runtimes' logits of the same chosen token lie apart, on the steps they agree.
        row["top_logit_gaps"] = [abs(x[1] - y[1]) for x, y in agreed]
        if not same:
            i = len(agreed)
            row |= {
                "first_difference": i,
                "ours": {"top": a[i][0], "margin": a[i][1] - a[i][3], "runner_up": a[i][2]},
                "llama.cpp": {"top": b[i][0], "margin": b[i][1] - b[i][3], "runner_up": b[i][2]},
                "text_before": model.tokenizer.decode([x[0] for x in a[:i]])[-60:],
            }
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    return {"package": str(package), "gguf": str(gguf), "max_tokens": tokens, "prompts": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", type=Path)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = compare(args.package, args.gguf, args.tokens)
    rows = result["prompts"]
    # The runtimes' rounding: the 99th percentile of their logit gaps where both chose the same token.
    # A difference is a near tie when both runtimes' top-two margins are within it.
    rounding = float(np.percentile([g for r in rows for g in r.pop("top_logit_gaps")], 99))
    for r in rows:
        if not r["same"]:
            r["near_tie"] = r["ours"]["margin"] <= rounding and r["llama.cpp"]["margin"] <= rounding
    result["rounding"] = rounding
    same, ties = sum(r["same"] for r in rows), sum(r.get("near_tie", False) for r in rows)
    print(
        f"identical greedy answers: {same} of {len(rows)}; near ties: {ties}; other differences: "
        f"{len(rows) - same - ties} (rounding: {rounding:.3f}, the runtimes' p99 logit gap)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
