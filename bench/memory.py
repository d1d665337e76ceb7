#!/usr/bin/env python3
"""Where a package's memory goes: resident memory after each stage of a bench-like run, by kind.

    python bench/memory.py PACKAGE [--prompt-tokens 128] [--gen-tokens 128]
    python bench/memory.py PACKAGE --only tokenizer     # one part alone, after the libraries
    python bench/memory.py PACKAGE --only session

Prints, after imports, load, prefill (a seeded random prompt, as `edge-qwen bench`) and decode, the
process's resident size (VmRSS), its high-water mark (VmHWM, what `edge-qwen bench` reports as peak
RSS), and its two kinds: anonymous (RssAnon: the heap, returned only by freeing) and file-backed
(RssFile: the mapped weights and libraries, which the kernel can reclaim and share). Then the pages
of the prepacked weights file this process maps, by the kind of tensor they hold (from
/proc/self/pagemap). Linux only. One process per run: the high-water mark never goes down.
"""

from __future__ import annotations

import argparse
import random
import struct
from collections import Counter
from pathlib import Path

PAGE = 4096


def status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in MB (10^6 bytes, as `edge-qwen bench`)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    return {key: int(fields[key].split()[0]) * 1024 / 1e6 for key in keys}


def show(stage: str) -> None:
    s = status()
    print(
        f"{stage:10s} resident {s['VmRSS']:7.1f} MB   peak {s['VmHWM']:7.1f} MB   "
        f"anonymous {s['RssAnon']:6.1f} MB   file-backed {s['RssFile']:6.1f} MB"
    )


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
    import edge_qwen
    from edge_qwen.prepacked import prepacked_model

    copy = prepacked_model(args.package)  # written now if this machine has none, so that load() maps it
    show("imports")
    model = edge_qwen.load(args.package)
    show("load")
    cache = model.new_cache(args.prompt_tokens + args.gen_tokens)
    ids = random.Random(0)
    prompt = [ids.randrange(model.config.vocab_size) for _ in range(args.prompt_tokens)]
    logits = model.forward(prompt, cache)
    show("prefill")
    for _ in range(args.gen_tokens - 1):
        logits = model.forward([int(logits.argmax())], cache)
    show("decode")
    if copy is not None:
        print(f"\nof {copy.name}.data, mapped and resident:")
        for kind, size in mapped_by_kind(copy).items():
            print(f"  {kind:34s} {size / 1e6:7.1f} MB")


def load_part(package: Path, part: str) -> None:
    import numpy  # noqa: F401 - the libraries load() needs, so that the part's own cost shows
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from edge_qwen.heap import release_free_heap
    from edge_qwen.prepacked import prepacked_model
    from edge_qwen.providers import session_options

    graph = prepacked_model(package) or package / "model.onnx"
    show("libraries")
    loaded: object
    if part == "tokenizer":
        loaded = Tokenizer.from_file(str(package / "tokenizer.json"))
    else:
        loaded = ort.InferenceSession(str(graph), session_options(None), providers=["CPUExecutionProvider"])
    release_free_heap()
    show(part)
    del loaded


def mapped_by_kind(copy: Path) -> dict[str, int]:
    """Resident bytes of this process's mappings of the copy's data file, by what the bytes hold."""
    import onnx

    regions = []  # (offset, length, kind)
    for t in onnx.load(str(copy), load_external_data=False).graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if not info:
            continue
        packed = [v for k, v in info.items() if k.startswith("prepacked")]
        kind = (
            "embedding table (rows read)"
            if "embed_tokens" in t.name
            else "quantized weights, as exported"
            if packed
            else "scales"
            if "scales" in t.name
            else "zero points"
            if "zero_points" in t.name
            else "norms, biases, rotary caches"
        )
        regions.append((int(info["offset"]), int(info["length"]), kind))
        for value in packed:  # "<op>+<hash>|<offset>;<length>;<alignment>"
            offset, length, _ = value.split("|")[1].split(";")
            regions.append((int(offset), int(length), "packed weights (ONNX Runtime's)"))
    data = str((copy.parent / f"{copy.name}.data").resolve())
    found: Counter[str] = Counter()
    with open("/proc/self/pagemap", "rb") as pagemap:
        for start, end, file_offset in _mappings(data):
            pagemap.seek(start // PAGE * 8)
            entries = pagemap.read((end - start) // PAGE * 8)
            pages = (end - start) // PAGE
            present = [struct.unpack_from("<Q", entries, 8 * i)[0] >> 63 for i in range(pages)]
            for offset, length, kind in regions:
                lo, hi = max(offset, file_offset), min(offset + length, file_offset + end - start)
                if lo < hi:
                    first, last = (lo - file_offset) // PAGE, -(-(hi - file_offset) // PAGE)
                    found[kind] += PAGE * sum(present[first:last])
    return dict(found.most_common())


def _mappings(path: str) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of this process's mappings of `path`."""
    found = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and " ".join(fields[5:]) == path:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append((start, end, int(fields[2], 16)))
    return found


if __name__ == "__main__":
    main()
