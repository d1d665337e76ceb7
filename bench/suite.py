#!/usr/bin/env python3
"""Quality per domain of the held-out suite (edge_qwen.quant.suite) -> bench/results/suite.json.

Every package is measured against our fp32 export of the real Qwen2.5-Coder-0.5B-Instruct on the
same chunks, with the project's protocol (chunks of --ctx tokens from an empty cache, the second half
scored, --chunks per domain spread over its text). The reference's log-probabilities are computed
once per domain and kept in --work. Packages are ours (edge_qwen packages) or onnxruntime-genai's
folders, named on the command line as NAME=PATH:

    python bench/suite.py --reference FP32 default=PKG ort-genai-int4=DIR ort-genai-int4-kqmixed=DIR

then `python bench/quality_doc.py bench/results/quality.json docs/quality.md` renders them there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

import edge_qwen
from edge_qwen.apps.evaluate import chunk_ids
from edge_qwen.quant import suite

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quality", REPO / "bench" / "quality.py")
assert _spec is not None and _spec.loader is not None
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("packages", nargs="+", metavar="NAME=PATH")
    p.add_argument("--reference", type=Path, required=True, help="our fp32 export of the same checkpoint")
    p.add_argument("--domains", nargs="*", default=list(suite.DOMAINS))
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edge-qwen-bench" / "suite")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "suite.json")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ref = edge_qwen.load(args.reference)
    results: dict[str, Any] = json.loads(args.json.read_text())["rows"] if args.json.is_file() else {}
    chunks = {
        d: chunk_ids(ref, suite.domain_text(d), args.ctx, args.chunks, spread=True) for d in args.domains
    }
    ref_lp = {
        d: quality.reference_logprobs(ref, c, args.work / f"ref-{d}-{args.ctx}x{len(c)}.npy")
        for d, c in chunks.items()
    }
    for spec in args.packages:
        name, _, path = spec.partition("=")
        pkg = Path(path)
        ours = (pkg / "edge_qwen.json").is_file()
        decoder = edge_qwen.load(pkg) if ours else quality.peer_decoder(pkg, ref.config)
        domains = {d: quality.score(decoder, chunks[d], ref_lp[d]) for d in args.domains}
        keys = ("mean_kld", "top1_agreement", "ppl_ratio")
        results[name] = {
            "package": str(pkg),
            "size_bytes": quality.folder_size(pkg),
            "domains": domains,
            "macro": {k: float(np.mean([r[k] for r in domains.values()])) for k in keys},
        }
        print(name, json.dumps(results[name]["macro"]), flush=True)
        meta = {
            "reference": str(args.reference),
            "ctx": args.ctx,
            "chunks": args.chunks,
            "texts": {d: suite.domain_text(d).describe() for d in args.domains},
            "command": " ".join(sys.argv),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
