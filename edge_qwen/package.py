"""The model package on disk: the manifest `edge_qwen.json` and its checks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_qwen.config import QwenConfig
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
        if d.get("format") != FORMAT:
            raise PackageError(f"{MANIFEST} is not an edge-qwen manifest (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise PackageError(
                f"package format version {d.get('format_version')} is not supported by this edge-qwen "
                f"(reads version {FORMAT_VERSION}): re-export the model or upgrade edge-qwen"
            )
        return cls(
            config=QwenConfig.from_dict(d["config"]),
            precision=d["precision"],
            max_context=int(d["max_context"]),
            logits=d["logits"],
            inputs=tuple(d["io"]["inputs"]),
            outputs=tuple(d["io"]["outputs"]),
            stop_token_ids=tuple(int(i) for i in d["stop_token_ids"]),
            files=d["files"],
            raw=d,
        )


def read_manifest(path: str | Path, verify_hashes: bool = False) -> Manifest:
    """Read a package's manifest and check every file it lists: present, full size (and hash)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"model package not found: {root}")
    if not root.is_dir():
        raise PackageError(f"{root} is not a model package folder (export one with `edge-qwen export`)")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise PackageError(
            f"{root} has no {MANIFEST}: not an edge-qwen package, or its export did not finish"
        )
    try:
        manifest = Manifest.from_dict(json.loads(manifest_path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PackageError(f"{manifest_path} is corrupted ({e}): re-export the model") from e
    for name, meta in manifest.files.items():
        file = root / name
        if not file.is_file():
            raise PackageError(f"{root}: {name} is missing: the package is incomplete, re-export it")
        size = file.stat().st_size
        if size != meta["size"]:
            raise PackageError(
                f"{root}: {name} has {size} bytes, the manifest says {meta['size']}: truncated or replaced, "
                "re-export it"
            )
        if verify_hashes and sha256_file(file) != meta["sha256"]:
            raise PackageError(f"{root}: {name} does not match its sha256 in the manifest: re-export it")
    return manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
