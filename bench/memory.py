#!/usr/bin/env python3
"""Where a package's memory goes: resident and peak size after each stage of a bench-like run.

    python bench/memory.py PACKAGE [--prompt-tokens 128] [--gen-tokens 128]
    python bench/memory.py PACKAGE --only tokenizer     # one part alone, after the libraries
    python bench/memory.py PACKAGE --only session

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
    p.add_argument("--only", choices=["tokenizer", "session"], help="load only this part, as load() does")
    args = p.parse_args()
    show("start")
    if args.only:
        load_part(args.package, args.only)
        return
    import edge_qwen  # numpy, onnxruntime, tokenizers, jinja2

    show("imports")
    model = edge_qwen.load(args.package)
    if model.huge_pages is not None:
        model.huge_pages.join()  # its move of the weights into huge pages, as edge-qwen bench waits
    show("load")
    cache = model.new_cache()
    prompt = [(1000 + i) % model.config.vocab_size for i in range(args.prompt_tokens)]
    logits = model.forward(prompt, cache)
    show("prefill")
    for _ in range(args.gen_tokens - 1):
        logits = model.forward([int(logits.argmax())], cache)
    show("decode")


def load_part(package: Path, part: str) -> None:
    import numpy  # noqa: F401 - the libraries load() needs, so that the part's own cost shows
    import onnxruntime  # noqa: F401
    from tokenizers import Tokenizer

    from edge_qwen.memory import release_free_heap
    from edge_qwen.providers import session_options
    from edge_qwen.weights import MappedWeights, WeightsSession, external_tensors

    show("libraries")
    loaded: object
    if part == "tokenizer":
        loaded = Tokenizer.from_file(str(package / "tokenizer.json"))
    else:
        weights = MappedWeights(package / "model.onnx.data", external_tensors(package / "model.onnx"))
        with weights.dropping():
            cpu = ["CPUExecutionProvider"]
            loaded = WeightsSession(package / "model.onnx", session_options(None), cpu, weights)
    release_free_heap()
    show(part)
    del loaded


if __name__ == "__main__":
    main()
