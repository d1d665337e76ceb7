"""Golden outputs of the tiny checkpoints (tests/tiny.py) from transformers' Qwen2ForCausalLM, kept in
tests/data/golden.npz so that machines without torch (the arm64 check) compare against them too.

    python -m tests.golden                 # rewrite tests/data/golden.npz (needs torch, transformers)
    python -m tests.golden --export DIR    # export the packages the arm64 check loads, into DIR
    python -m tests.golden --measure DIR   # their max |logit error| and KLD against the golden file

tests/test_golden.py checks, where transformers is installed, that the file still is what transformers
computes, so it cannot go stale.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from tests.tiny import make_tiny_checkpoint

GOLDEN = Path(__file__).parent / "data" / "golden.npz"
MODELS = {"tied": (True, 1), "untied": (False, 3)}  # name -> (tie_word_embeddings, seed)
PROMPT = np.random.default_rng(0).integers(3, 500, 10).tolist()
CONTINUATION = np.random.default_rng(1).integers(3, 500, 8).tolist()
GREEDY_TOKENS = 24
# The packages the arm64 check loads: name -> ExportOptions fields.
PACKAGES: dict[str, dict[str, object]] = {
    "fp32": {},
    "int8": {"precision": "int8"},
    "int4": {"precision": "int4"},
    "int4-sym": {"precision": "int4", "symmetric": True},
}


def stop_ids(hf_dir: Path) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    return sorted(i for t in ("<|im_end|>", "<|endoftext|>") if (i := tok.token_to_id(t)) is not None)


def transformers_outputs(hf_dir: Path) -> dict[str, np.ndarray]:
    """Logits after the prompt and after each continuation token, and the greedy continuation."""
    import torch
    from transformers import Qwen2ForCausalLM

    ref = Qwen2ForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        logits = ref(torch.tensor([PROMPT + CONTINUATION])).logits[0].numpy()
        greedy = ref.generate(
            torch.tensor([PROMPT]),
            do_sample=False,
            max_new_tokens=GREEDY_TOKENS,
            eos_token_id=stop_ids(hf_dir),
            pad_token_id=0,
        )[0, len(PROMPT) :].numpy()
    return {"logits": logits[len(PROMPT) - 1 :].astype(np.float32), "greedy": greedy.astype(np.int64)}


def checkpoint(name: str, root: Path) -> Path:
    tied, seed = MODELS[name]
    return make_tiny_checkpoint(root / name / "hf", tied, seed)


def load_golden() -> dict[str, dict[str, np.ndarray]]:
    with np.load(GOLDEN, allow_pickle=False) as data:
        return {name: {k: data[f"{name}/{k}"] for k in ("logits", "greedy")} for name in MODELS}


def write_golden() -> None:
    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            for key, value in transformers_outputs(checkpoint(name, Path(tmp))).items():
                arrays[f"{name}/{key}"] = value
    np.savez_compressed(GOLDEN, **arrays)  # type: ignore[arg-type]
    print(f"wrote {GOLDEN}")


def export_packages(out: Path) -> None:
    from tests.conftest import export_tiny

    for name in MODELS:
        hf = checkpoint(name, out)
        for package, options in PACKAGES.items():
            export_tiny(hf, out / name / package, **options)
    print(f"exported {len(MODELS) * len(PACKAGES)} packages into {out}")


def initializers(package: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(package / "model.onnx"))  # its data file beside it
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def differences(a: Path, b: Path) -> dict[str, float]:
    """Per initializer that differs, the share of its elements that do: quantized codes (each 4-bit
    code on its own), or floats by more than 1e-5 relative (ulps apart is the same number here)."""
    x, y = initializers(a), initializers(b)
    assert x.keys() == y.keys() and all(x[k].shape == y[k].shape and x[k].dtype == y[k].dtype for k in x)
    out = {}
    for name in x:
        u, v = x[name], y[name]
        if np.array_equal(u, v):
            continue
        if u.dtype == np.uint8:
            if "q4" in name or ("zero_points" in name and f"{name.rsplit('_', 1)[0]}_q8" not in x):
                u, v = np.stack([u & 15, u >> 4]), np.stack([v & 15, v >> 4])
            out[name] = float((u != v).mean())
        else:
            rel = np.abs(u - v) / np.maximum(np.abs(u), np.finfo(np.float32).tiny)
            out[name] = float((rel > 1e-5).mean())
    return out


def measure(packages: Path) -> None:
    """Print each package's distance from transformers' logits on this CPU (docs/arm64.md's table)."""
    from tests.test_golden import kld, run

    golden = load_golden()
    for name in MODELS:
        for package in PACKAGES:
            logits, _ = run(packages / name / package)
            ref = golden[name]["logits"]
            worst = float(np.abs(logits - ref).max())
            print(f"{name:7s} {package:9s} max |error| {worst:.2e}  KLD {kld(ref, logits):.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--export", type=Path, metavar="DIR", help="export the arm64 check's packages")
    parser.add_argument("--measure", type=Path, metavar="DIR", help="measure packages against the file")
    args = parser.parse_args()
    if args.export:
        export_packages(args.export)
    elif args.measure:
        measure(args.measure)
    else:
        write_golden()
