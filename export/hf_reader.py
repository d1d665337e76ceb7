"""Read a Hugging Face Qwen2 folder (config.json + safetensors shards) into numpy, without torch."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from edge_qwen.config import QwenConfig
from edge_qwen.export.checkpoint import Checkpoint, TokenizerFiles, check_shapes, expected_names

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
    check_shapes(config, {name: entry[2] for name, entry in index.entries.items()}, root)
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


# The safetensors format's own bound on the JSON header (safetensors' MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000


class _SafetensorsIndex:
    """Tensor name -> (file, dtype, shape, byte range), read from each shard's JSON header."""

    def __init__(self, shards: list[Path]) -> None:
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for shard in shards:
            for name, entry in read_safetensors_header(shard).items():
                self.entries[name] = (shard, *entry)

    def load(self, name: str) -> np.ndarray:
        path, dtype, shape, start, end = self.entries[name]
        stored = np.fromfile(
            path, dtype=_DTYPES[dtype], count=(end - start) // np.dtype(_DTYPES[dtype]).itemsize, offset=start
        ).reshape(shape)
        if dtype == "BF16":
            return (stored.astype(np.uint32) << 16).view(np.float32)
        return stored.astype(np.float32)


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Tensor name -> (dtype, shape, start, end) in the file, every claim checked against the file.

    A header that is not the format (a length past the file, broken JSON, offsets outside the data,
    a byte count that does not match the shape) is a ValueError naming the file, found before any
    tensor is read and in time and memory bounded by the file's size.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 2 <= header_len <= min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(
                f"{path} is not a safetensors file: its header length {header_len} does not fit its "
                f"{size} bytes (truncated or corrupted: download it again)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        base = 8 + header_len
        return {
            name: _safetensors_entry(name, meta, size - base, base)
            for name, meta in header.items()
            if name != "__metadata__"
        }
    except (ValueError, TypeError, KeyError, RecursionError) as e:  # JSON and entry errors
        raise ValueError(f"{path} has a corrupted safetensors header: {e}") from None


def _safetensors_entry(
    name: str, meta: Any, data_bytes: int, base: int
) -> tuple[str, tuple[int, ...], int, int]:
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if dtype not in _DTYPES:
        raise ValueError(f"tensor {name} has dtype {dtype}; expected F32, F16 or BF16")
    if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tensor {name} has shape {shape!r:.80}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise ValueError(f"tensor {name} has data_offsets {offsets!r:.80}, not [start, end]")
    start, end = offsets
    count = math.prod(shape)
    if not 0 <= start <= end <= data_bytes or end - start != count * np.dtype(_DTYPES[dtype]).itemsize:
        raise ValueError(
            f"tensor {name} claims bytes {start}..{end} for {count} {dtype} values, in {data_bytes} "
            "bytes of data"
        )
    return dtype, tuple(shape), base + start, base + end


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
