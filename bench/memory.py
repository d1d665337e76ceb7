#!/usr/bin/env python3
"""Where a package's memory goes: resident and peak size after each stage of a bench-like run.

    python bench/memory.py PACKAGE [--prompt-tokens 128] [--gen-tokens 128]

Prints, after imports, load (tokenizer and session), prefill and decode, the process's resident size
(VmRSS), its high-water mark (VmHWM, what `edge-qwen bench` reports as peak RSS) and the file-backed
share (RssFile: mapped weights and libraries). Linux only (reads /proc/self/status). One process per
run: the high-water mark never goes down.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def status() -> dict[str, float]:
    """VmRSS, VmHWM and RssFile of this process, in MB (10^6 bytes, as `edge-qwen bench` reports)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) * 1024 / 1e6 for key in ("VmRSS", "VmHWM", "RssFile")}


def show(stage: str) -> None:
    s = status()
    print(f"{stage:10s} resident {s['VmRSS']:7.1f} MB   peak {s['VmHWM']:7.1f} MB", end="   ")
    print(f"file-backed {s['RssFile']:6.1f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package", type=Path)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    args = p.parse_args()
    show("start")
    import edge_qwen  # numpy, onnxruntime, tokenizers, jinja2

    show("imports")
    model = edge_qwen.load(args.package)
    show("load")
    cache = model.new_cache()
    logits = model.forward(list(range(1000, 1000 + args.prompt_tokens)), cache)
    show("prefill")
    for _ in range(args.gen_tokens - 1):
        logits = model.forward([int(logits.argmax())], cache)
    show("decode")


if __name__ == "__main__":
    main()
