"""Read a Hugging Face Qwen2 folder (config.json + safetensors shards) into numpy, without torch."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from edge_qwen.config import QwenConfig
from edge_qwen.export.checkpoint import Checkpoint, TokenizerFiles, expected_names

# safetensors dtype tag -> (numpy dtype of the stored bits, itemsize). bf16 has no numpy dtype: its
# bits are read as uint16 and widened to float32 by a shift (bf16 is the top half of a float32).
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_hf_folder(folder: str | Path) -> Checkpoint:
    """Open a Hugging Face checkpoint folder; tensors load lazily, one at a time."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {root}")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{root} has no config.json: is it a Hugging Face model folder?")
    config = QwenConfig.from_hf(json.loads(config_path.read_text()))
    shards = _weight_files(root)
    index = _SafetensorsIndex(shards)
    missing = [n for n in expected_names(config) if n not in index.entries]
    if missing:
        raise ValueError(
            f"{root} is missing {len(missing)} tensors, e.g. {missing[0]}: incomplete checkpoint"
        )
    return Checkpoint(
        config=config,
        names=frozenset(index.entries),
        load=index.load,
        tokenizer=_tokenizer_files(root),
        source=str(root),
        source_sha256=_sha256_files(shards),
    )


def _weight_files(root: Path) -> list[Path]:
    index_file = root / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = [root / name for name in sorted(set(weight_map.values()))]
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise FileNotFoundError(
                f"{root}: shard {absent[0]} named in model.safetensors.index.json is missing"
            )
        return shards
    shards = sorted(root.glob("*.safetensors"))
    if shards:
        return shards
    pickles = [p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(
            f"{root} holds pickle weights ({pickles[0]}), which can run code when loaded: "
            "convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
        )
    raise FileNotFoundError(f"{root} has no *.safetensors weights")


class _SafetensorsIndex:
    """Tensor name -> (file, dtype, shape, byte range), read from each shard's JSON header."""

    def __init__(self, shards: list[Path]) -> None:
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for shard in shards:
            with open(shard, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            base = 8 + header_len
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in _DTYPES:
                    raise ValueError(
                        f"{shard.name}: tensor {name} has dtype {meta['dtype']}; expected F32, F16 or BF16"
                    )
                start, end = meta["data_offsets"]
                self.entries[name] = (shard, meta["dtype"], tuple(meta["shape"]), base + start, base + end)

    def load(self, name: str) -> np.ndarray:
        path, dtype, shape, start, end = self.entries[name]
        stored = np.fromfile(
            path, dtype=_DTYPES[dtype], count=(end - start) // np.dtype(_DTYPES[dtype]).itemsize, offset=start
        ).reshape(shape)
        if dtype == "BF16":
            return (stored.astype(np.uint32) << 16).view(np.float32)
        return stored.astype(np.float32)


def _tokenizer_files(root: Path) -> TokenizerFiles:
    tokenizer_json = root / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise FileNotFoundError(f"{root} has no tokenizer.json (the fast tokenizer file is required)")
    config_path = root / "tokenizer_config.json"
    tokenizer_config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template_file = root / "chat_template.jinja"
    if "chat_template" not in tokenizer_config and template_file.is_file():
        tokenizer_config["chat_template"] = template_file.read_text()
    gen_path = root / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    return TokenizerFiles(tokenizer_json.read_text(encoding="utf-8"), tokenizer_config, generation)


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
