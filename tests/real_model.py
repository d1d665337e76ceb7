"""The real Qwen2.5-Coder-0.5B-Instruct for `slow` tests: found, converted and exported once, cached.

The GGUF comes from ../shared/models/fetch_gguf.py (path in EDGE_QWEN_GGUF, or its default cache).
Conversions and exports live in EDGE_QWEN_TEST_CACHE (default ~/.cache/edge-qwen-test), outside the
clone, keyed by a hash of the exporter's source so that a change to the exporter re-exports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GGUF = Path.home() / ".cache" / "edge-qwen-models" / "qwen2.5-coder-0.5b-instruct.gguf"


def gguf_path() -> Path:
    path = Path(os.environ.get("EDGE_QWEN_GGUF", DEFAULT_GGUF))
    if not path.is_file():
        pytest.skip(
            f"real model absent: {path} (run ../shared/models/fetch_gguf.py qwen2.5-coder-0.5b-instruct)"
        )
    return path


def cache_dir() -> Path:
    path = Path(os.environ.get("EDGE_QWEN_TEST_CACHE", Path.home() / ".cache" / "edge-qwen-test"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def exporter_hash() -> str:
    from edge_qwen.export import source_fingerprint

    return source_fingerprint()


def hf_folder() -> Path:
    """The GGUF as a Hugging Face folder, converted by transformers' own GGUF loader."""
    out = cache_dir() / "hf-qwen2.5-coder-0.5b-instruct"
    if not (out / "config.json").is_file():
        gguf = gguf_path()
        script = (
            "import sys, torch\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "src, name, out = sys.argv[1], sys.argv[2], sys.argv[3]\n"
            "tok = AutoTokenizer.from_pretrained(src, gguf_file=name)\n"
            "m = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)\n"
            "cfg = m.config\n"
            "for a in ('quantization_config', '_pre_quantization_dtype'):\n"
            "    cfg.__dict__.pop(a, None)\n"
            "plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)\n"
            "plain.load_state_dict(m.state_dict())\n"
            "plain.save_pretrained(out + '.partial', safe_serialization=True)\n"
            "tok.save_pretrained(out + '.partial')\n"
        )
        subprocess.run([sys.executable, "-c", script, str(gguf.parent), gguf.name, str(out)], check=True)
        os.replace(f"{out}.partial", out)
    return out


def exported(name: str, *args: str, source: Path | None = None) -> Path:
    """`edge-qwen export` of the real model (its Hugging Face folder, or `source`) with extra CLI args,
    cached by exporter source hash."""
    out = cache_dir() / f"{name}-{exporter_hash()}"
    if not (out / "edge_qwen.json").is_file():
        for stale in cache_dir().glob(f"{name}-*"):  # exports by an older exporter: ~2 GB each
            shutil.rmtree(stale, ignore_errors=True)
        checkpoint = source or hf_folder()
        cmd = [sys.executable, "-m", "edge_qwen.apps.cli", "export", str(checkpoint), str(out), *args]
        subprocess.run(cmd, check=True)
    return out
