"""The manifest a package declares itself by (edge_qwen.json), as the exporter writes it.

Kept apart from package.py, which reads and checks package folders, so that other readers of a folder
(genai_folder.py, for onnxruntime-genai's) build a Manifest without importing package.py back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_qwen.config import SUPPORTED_ARCHITECTURE, QwenConfig
from edge_qwen.errors import PackageError

MANIFEST = "edge_qwen.json"
FORMAT = "edge-qwen-package"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """What a package declares about itself; written last by the exporter."""

    config: QwenConfig
    precision: str
    max_context: int
    logits: str  # "last" or "all"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    files: dict[str, dict[str, Any]]  # name -> {"size": int, "sha256": str}
    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict):
            raise PackageError(f"{MANIFEST} is not an edge-qwen manifest (a JSON {type(d).__name__})")
        if d.get("format") != FORMAT:
            raise PackageError(f"{MANIFEST} is not an edge-qwen manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise PackageError(
                f"package format version {d.get('format_version')} is not supported by this edge-qwen "
                f"(reads version {FORMAT_VERSION}): re-export the model or upgrade edge-qwen"
            )
        architecture = d.get("architecture", SUPPORTED_ARCHITECTURE)
        if architecture != SUPPORTED_ARCHITECTURE:
            raise PackageError(
                f"this package holds a {architecture} model; edge-qwen runs {SUPPORTED_ARCHITECTURE} only"
            )
        return cls(
            config=QwenConfig.from_dict(d["config"]),
            precision=d["precision"],
            max_context=int(d["max_context"]),
            logits=d["logits"],
            inputs=tuple(d["io"]["inputs"]),
            outputs=tuple(d["io"]["outputs"]),
            stop_token_ids=tuple(int(i) for i in d["stop_token_ids"]),
            files=_checked_files(d["files"]),
            raw=d,
        )


def _checked_files(files: Any) -> dict[str, dict[str, Any]]:
    """The manifest's file list: plain names in the package folder, each with an integer size."""
    if not isinstance(files, dict):
        raise TypeError(f"files must map names to sizes and hashes, got a {type(files).__name__}")
    for name, meta in files.items():
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"file name {name!r} is not a plain name inside the package folder")
        size = meta.get("size") if isinstance(meta, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"file {name!r} has no valid size ({meta!r:.80})")
        if not isinstance(meta.get("sha256"), str):
            raise ValueError(f"file {name!r} has no sha256 ({meta!r:.80})")
    return files
