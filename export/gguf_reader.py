"""Read a llama.cpp GGUF file of a Qwen2 model: config, dequantized float32 tensors, tokenizer.

    reader = GGUFReader(path)           metadata + a memmap of the tensor blocks
      qwen2.* keys      -> QwenConfig (through QwenConfig.from_hf, like any other checkpoint)
      tokenizer.* keys  -> tokenizer.json / tokenizer_config.json (gguf_tokenizer.py)
      blk.N.attn_q ...  -> model.layers.N.self_attn.q_proj ..., dequantized one at a time on load

llama.cpp's converter stores Qwen2's Q and K rows as Hugging Face has them: unlike for llama, it does
not permute them for its rotary layout, so there is nothing to undo (tests/test_gguf.py checks this
against transformers' GGUF loader and by the real model answering a question).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, ReaderField, ReaderTensor
from gguf.quants import dequantize

from edge_qwen.config import SUPPORTED_ARCHITECTURE, QwenConfig

from .checkpoint import Checkpoint, check_shapes, expected_names
from .gguf_header import check_gguf_header
from .gguf_tokenizer import tokenizer_from_gguf

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGUF_ARCHITECTURE = "qwen2"

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TENSOR_NAME = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<base>\w+)\.(?P<kind>weight|bias)")


def read_gguf(path: str | Path) -> Checkpoint:
    """Open a qwen2 GGUF file; tensors come out float32 in Hugging Face names and layout, lazily."""
    path = Path(path)
    reader = _open(path)
    metadata = read_metadata(reader)
    arch = metadata.get("general.architecture")
    if arch != GGUF_ARCHITECTURE:
        raise ValueError(f"unsupported GGUF architecture {arch!r}: edge-qwen reads qwen2 GGUF files only")

    tensors: dict[str, ReaderTensor] = {}
    for tensor in reader.tensors:
        tensors[hf_tensor_name(tensor.name)] = tensor
    # The reader's parsed fields (~0.5 GB of small objects for a 151k-token vocabulary) are not needed
    # past here: freed before the tokenizer is built, the two do not add up in the memory peak.
    del reader
    if "model.embed_tokens.weight" not in tensors:
        raise ValueError(f"{path} has no token_embd.weight tensor")
    embed_shape = _hf_shape(tensors["model.embed_tokens.weight"])
    config = config_from_gguf(metadata, embed_shape, tied="lm_head.weight" not in tensors)
    missing = [name for name in expected_names(config) if name not in tensors]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors of a Qwen2 model, first {missing[0]}")
    check_shapes(config, {name: _hf_shape(tensor) for name, tensor in tensors.items()}, path)

    tokenizer = tokenizer_from_gguf(metadata, model_max_length=config.max_position_embeddings)

    def load(name: str) -> np.ndarray:
        return dequantize_tensor(tensors[name])

    logger.info("read %s: %d tensors, %s", path, len(tensors), metadata.get("general.name", "unnamed"))
    return Checkpoint(
        config=config,
        names=frozenset(tensors),
        load=load,
        tokenizer=tokenizer,
        source=str(path),
        source_sha256=file_sha256(path),
        extra={
            "gguf_name": metadata.get("general.name"),
            "gguf_file_type": metadata.get("general.file_type"),
            "tensor_types": {name: t.tensor_type.name for name, t in tensors.items()},
            "gguf_tensors": tensors,  # raw blocks for --algo gguf (export/gguf_exact.py)
        },
    )


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}")
    check_gguf_header(path)  # every count, length and offset against the file, before gguf trusts them
    try:
        return GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError) as e:
        # gguf reports truncated or corrupt headers with these, without naming the file.
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every scalar, string and flat array in the GGUF header, as Python values."""
    values = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and _is_decodable(field):
            values[key] = _field_value(field)
    return values


def _is_decodable(field: ReaderField) -> bool:
    # Arrays of arrays (not in qwen2 files) are left out rather than misread.
    return field.types[0] != GGUFValueType.ARRAY or (
        len(field.types) == 2 and field.types[1] != GGUFValueType.ARRAY
    )


def _field_value(field: ReaderField) -> Any:
    # `parts` holds every piece of the field's encoding; `data` indexes the pieces holding values.
    if field.types[0] == GGUFValueType.ARRAY:
        if field.types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item()


def config_from_gguf(metadata: dict[str, Any], embed_shape: tuple[int, ...], tied: bool) -> QwenConfig:
    """The Hugging Face config.json a qwen2 GGUF describes, validated by QwenConfig.from_hf."""

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{GGUF_ARCHITECTURE}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {GGUF_ARCHITECTURE}.{name}")
        return value

    vocab_size, hidden = embed_shape
    if hidden != key("embedding_length"):
        raise ValueError(f"token_embd has {hidden} columns but embedding_length is {key('embedding_length')}")
    tokens = metadata.get("tokenizer.ggml.tokens", ())
    if len(tokens) > vocab_size:
        raise ValueError(f"GGUF lists {len(tokens)} tokens but token_embd has only {vocab_size} rows")
    heads = key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    rotary_dim = key("rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(
            f"partial rotary (rope.dimension_count {rotary_dim} of head_dim {head_dim}) is unsupported"
        )
    hf: dict[str, Any] = {
        "architectures": [SUPPORTED_ARCHITECTURE],
        "model_type": GGUF_ARCHITECTURE,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float32_decimal(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _float32_decimal(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": key("context_length", 32768),
        "tie_word_embeddings": tied,
    }
    scaling = metadata.get(f"{GGUF_ARCHITECTURE}.rope.scaling.type", "none")
    if scaling != "none":
        hf["rope_scaling"] = {
            "rope_type": scaling,
            "factor": metadata.get(f"{GGUF_ARCHITECTURE}.rope.scaling.factor"),
        }
    return QwenConfig.from_hf(hf)


def _float32_decimal(value: float) -> float:
    # GGUF stores these as float32: 1e-6 reads back as 9.99999997e-07; give the decimal it was written from.
    return float(str(np.float32(value)))


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`, and so on."""
    match = _TENSOR_NAME.fullmatch(gguf_name)
    table = _LAYER_TENSORS if match and match["layer"] is not None else _GLOBAL_TENSORS
    if not match or match["base"] not in table:
        raise ValueError(f"unexpected tensor {gguf_name!r} in a qwen2 GGUF file")
    prefix = f"model.layers.{match['layer']}." if match["layer"] is not None else ""
    return f"{prefix}{table[match['base']]}.{match['kind']}"


def _hf_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    # GGUF lists dimensions innermost first: (in_features, out_features) is (out, in) in numpy order.
    return tuple(int(d) for d in reversed(tensor.shape))


def dequantize_tensor(tensor: ReaderTensor) -> np.ndarray:
    """One GGUF tensor as a float32 array in Hugging Face layout (out_features, in_features)."""
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(
            f"cannot dequantize {tensor.name}: {tensor.tensor_type.name} is not supported"
        ) from e
    values = values.astype(np.float32, copy=False).reshape(_hf_shape(tensor))
    # F32 tensors come back as views of the read-only memmap; hand out an array the caller owns.
    return values if values.flags.writeable else values.copy()


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
