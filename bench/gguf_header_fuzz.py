#!/usr/bin/env python3
"""What the GGUF header walk buys: random header mutations of a tiny GGUF through `read_gguf`, with
the walk (export/gguf_header.py) and without it, counting how each read ends and the slowest read.

    python bench/gguf_header_fuzz.py [--examples 1500] [--seed 1]
    python bench/gguf_header_fuzz.py --time MODEL.gguf    # the walk's cost next to gguf-py's parse

A read ends "ok" (and every tensor loads), as a plain ValueError (the reader's clear error), or as
anything else: an error type a user should never see. Run from the repository root (it writes the
tiny GGUF with the tests' tests/gguf_writer.py).
"""

from __future__ import annotations

import argparse
import collections
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
from tests.gguf_writer import EXTREMES, write_tiny_gguf  # noqa: E402


def mutate(data: bytes, header_end: int, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(header_end)
        kind = rng.choice(["u64", "u32", "bytes", "cut"])
        if kind == "u64":
            out[at : at + 8] = struct.pack("<Q", rng.choice(EXTREMES))
        elif kind == "u32":
            out[at : at + 4] = struct.pack("<I", rng.choice(EXTREMES) & 0xFFFFFFFF)
        elif kind == "bytes":
            out[at : at + 2] = bytes([rng.randrange(256), rng.randrange(256)])
        else:
            del out[rng.randrange(len(out)) :]
    return bytes(out)


def run(walk: bool, data: bytes, header_end: int, examples: int, seed: int, path: Path) -> None:
    import edge_qwen.export.gguf_reader as gguf_reader

    original = gguf_reader.check_gguf_header
    if not walk:
        gguf_reader.check_gguf_header = lambda p: None  # type: ignore[assignment]
    rng = random.Random(seed)  # the same mutations both ways
    outcomes: collections.Counter[str] = collections.Counter()
    slowest = 0.0
    try:
        for _ in range(examples):
            path.write_bytes(mutate(data, header_end, rng))
            started = time.perf_counter()
            try:
                ckpt = gguf_reader.read_gguf(path)
                for name in ckpt.names:
                    ckpt.tensor(name)
                outcomes["ok"] += 1
            except Exception as e:  # counting every kind of ending is the point
                outcomes["ValueError" if type(e) is ValueError else type(e).__name__] += 1
            slowest = max(slowest, time.perf_counter() - started)
    finally:
        gguf_reader.check_gguf_header = original
    how = "with" if walk else "without"
    print(f"{how} the header walk: {dict(outcomes.most_common())}, slowest {slowest:.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=1500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--time", type=Path, help="time the walk and gguf-py's parse on this GGUF (twice)")
    args = p.parse_args()
    from gguf import GGUFReader

    if args.time:
        from edge_qwen.export.gguf_header import check_gguf_header

        for _ in range(2):
            started = time.perf_counter()
            check_gguf_header(args.time)
            walked = time.perf_counter()
            GGUFReader(args.time)
            print(f"header walk {walked - started:.2f} s, gguf-py parse {time.perf_counter() - walked:.2f} s")
        return

    with tempfile.TemporaryDirectory() as tmp:
        tiny = Path(tmp) / "tiny.gguf"
        write_tiny_gguf(tiny)
        data, header_end = tiny.read_bytes(), int(GGUFReader(tiny).data_offset)
        for walk in (False, True):
            run(walk, data, header_end, args.examples, args.seed, Path(tmp) / "mutated.gguf")


if __name__ == "__main__":
    main()
