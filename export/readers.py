"""Pick the reader for what the user named: a Hugging Face folder or a GGUF file."""

from __future__ import annotations

from pathlib import Path

from edge_qwen.export.checkpoint import Checkpoint
from edge_qwen.export.hf_reader import read_hf_folder


def read_checkpoint(source: str | Path) -> Checkpoint:
    """Open a checkpoint: a folder with config.json, or a .gguf file."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        from edge_qwen.export.gguf_reader import read_gguf

        return read_gguf(path)
    if path.is_dir():
        return read_hf_folder(path)
    if path.exists():
        raise ValueError(f"{path} is neither a Hugging Face model folder nor a .gguf file")
    raise FileNotFoundError(f"checkpoint not found: {path}")
