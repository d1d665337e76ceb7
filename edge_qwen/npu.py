"""Run NPU packages: static graphs over a fixed context window (export/npu_graph.py).

Each run takes exactly S tokens, S the package's prefill length (AR-N) or 1 (AR-1): a prompt runs in
steps of the prefill length, the last one padded, and each generated token runs through the decode
graph. A run returns only the new keys and values of its tokens; `NpuCache.write` puts them into
their slots. The additive mask hides the slots not yet written and the positions after each token.
Embedding lookup (a small CPU graph) and sampling run on the CPU whatever the provider.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_qwen.cache import KVCache
from edge_qwen.config import QwenConfig
from edge_qwen.engine import parse_tokenizer
from edge_qwen.errors import PackageError
from edge_qwen.generation import GenerationConfig, StreamPiece, stream_pieces
from edge_qwen.model import Model
from edge_qwen.package import Manifest

# Added to the attention scores of hidden positions. Not -inf: the mask goes through the same uint16
# quantization as the scores it is added to, whose range it sets, so it is as small as still hides
# (e^-100 is 4e-44, nothing beside the largest score of a row).
MASK_VALUE = -100.0
PAD_ID = 0  # fills the unused rows of a padded prefill step; their outputs are dropped

# Called with (part name, feeds) before each run of a part: how export calibrates activations.
Recorder = Callable[[str, dict[str, np.ndarray]], None]


@dataclass(frozen=True)
class NpuPart:
    """One graph of the pipeline in its two static lengths (the files share their weights)."""

    name: str
    layers: tuple[int, ...]  # empty for the head
    prefill: str  # file names in the package
    decode: str


@dataclass(frozen=True)
class NpuLayout:
    """An NPU package's graphs and window, as its manifest's `npu` section records them."""

    prefill_len: int
    context: int
    embeddings: str
    parts: tuple[NpuPart, ...]  # the layer parts, in order
    head: NpuPart

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NpuLayout:
        def part(p: dict[str, Any]) -> NpuPart:
            return NpuPart(p["name"], tuple(p["layers"]), p["prefill"], p["decode"])

        return cls(
            int(d["prefill_len"]),
            int(d["context"]),
            d["embeddings"],
            tuple(part(p) for p in d["parts"]),
            part(d["head"]),
        )


class NpuCache(KVCache):
    """The fixed window of keys and values: per layer, keys (1, kv, hd, C) and values (1, kv, C, hd).

    Same interface as KVCache (length, tokens, trim, rewind_to); slots past `length` are hidden by
    the mask, so trimming only moves the end back. `max_len` may be below the window C.
    """

    def __init__(self, config: QwenConfig, context: int, max_len: int) -> None:
        if not 1 <= max_len <= context:
            raise ValueError(f"max_context must be an integer in [1, {context}], got {max_len!r}")
        kv, hd = config.num_key_value_heads, config.head_dim
        self.max_len = max_len
        self.context = context
        self.tokens: list[int] = []
        self.layers = [
            (np.zeros((1, kv, hd, context), np.float32), np.zeros((1, kv, context, hd), np.float32))
            for _ in range(config.num_hidden_layers)
        ]

    def write(self, layer: int, new_key: np.ndarray, new_value: np.ndarray, n: int) -> None:
        """Put the first n new rows of a run, (1, kv, hd, S) and (1, kv, S, hd), after the cached ones."""
        start = self.length
        keys, values = self.layers[layer]
        keys[:, :, :, start : start + n] = new_key[:, :, :, :n]
        values[:, :, start : start + n] = new_value[:, :, :n]

    def binding(self, session: ort.InferenceSession) -> ort.IOBinding:
        raise TypeError("an NPU cache is fed by value, not bound to a session")


class NpuRunner:
    """The package's sessions, run as one decoder over token ids."""

    def __init__(
        self,
        config: QwenConfig,
        root: Path,
        layout: NpuLayout,
        options: ort.SessionOptions,
        providers: Sequence[Any],
    ) -> None:
        self.config, self.layout = config, layout
        cpu = ["CPUExecutionProvider"]
        self.embeddings = ort.InferenceSession(str(root / layout.embeddings), options, providers=cpu)
        self.sessions = {
            f"{part.name}/{kind}": ort.InferenceSession(
                str(root / getattr(part, kind)), options, providers=providers
            )
            for part in (*layout.parts, layout.head)
            for kind in ("prefill", "decode")
        }
        head_dim = config.head_dim
        self.inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.int64) / head_dim))
        self.record: Recorder | None = None

    def step(self, ids: Sequence[int], cache: NpuCache, all_logits: bool = False) -> np.ndarray:
        """Run up to prefill_len ids after the cache: logits of the last id (vocab,), or all (n, vocab)."""
        n = len(ids)
        seq = 1 if n == 1 else self.layout.prefill_len
        kind = "decode" if seq == 1 else "prefill"
        padded = np.full((1, seq), PAD_ID, np.int64)
        padded[0, :n] = ids
        hidden = self.embeddings.run(None, {"input_ids": padded})[0]
        cos, sin = self.rotary(cache.length, seq)
        shared = {
            "attention_mask": attention_mask(cache.length, seq, self.layout.context),
            "cos": cos,
            "sin": sin,
        }
        for part in self.layout.parts:
            feeds = {"hidden_states": hidden, **shared}
            for i in part.layers:
                feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = cache.layers[i]
            outputs = self._run(f"{part.name}/{kind}", feeds)
            hidden = outputs["hidden_states_out"]
            for i in part.layers:
                cache.write(i, outputs[f"new_key.{i}"], outputs[f"new_value.{i}"], n)
        cache.append(ids)
        head = self.layout.head.name
        if all_logits:
            return self._run(f"{head}/{kind}", {"hidden_states": hidden})["logits"][0, :n]
        return self._run(f"{head}/decode", {"hidden_states": hidden[:, n - 1 : n]})["logits"][0, 0]

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.record is not None:
            self.record(name, feeds)
        session = self.sessions[name]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds), strict=True))

    def rotary(self, start: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin (1, seq, 1, head_dim) of positions start .. start + seq - 1."""
        freqs = np.outer(np.arange(start, start + seq, dtype=np.float64), self.inv_freq)
        angles = np.concatenate([freqs, freqs], axis=-1)[None, :, None, :]
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def forward(
        self, ids: Sequence[int] | np.ndarray, cache: NpuCache, all_logits: bool = False
    ) -> np.ndarray:
        """Run ids after the cache in steps of at most prefill_len."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if not ids:
            raise ValueError("forward needs at least one token")
        cache.check_room(len(ids))
        step = self.layout.prefill_len
        logits = [self.step(ids[s : s + step], cache, all_logits) for s in range(0, len(ids), step)]
        return np.concatenate(logits) if all_logits else logits[-1]


def attention_mask(cached: int, seq: int, context: int) -> np.ndarray:
    """(1, 1, seq, context + seq): row r sees the cached slots and the new positions up to r."""
    mask = np.full((1, 1, seq, context + seq), MASK_VALUE, np.float32)
    mask[..., :cached] = 0.0
    mask[0, 0, :, context:] = np.where(np.tril(np.ones((seq, seq), bool)), 0.0, MASK_VALUE)
    return mask


class NpuModel(Model):
    """A Model over an NPU package: the same generate / stream / chat API, run by NpuRunner."""

    def __init__(self, root: Path, manifest: Manifest, runner: NpuRunner, tokenizer: Any) -> None:
        super().__init__(root, manifest, runner.sessions[f"{runner.layout.head.name}/decode"], tokenizer)
        self.runner = runner
        self.providers = list(runner.sessions[f"{runner.layout.parts[0].name}/decode"].get_providers())

    def new_cache(self, max_context: int | None = None) -> NpuCache:
        """A fresh window for one sequence, of the package's context or `max_context` tokens."""
        context = self.runner.layout.context
        n = context if max_context is None else max_context
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"max_context must be an integer in [1, {context}], got {n!r}")
        return NpuCache(self.config, context, n)

    def forward(self, ids: Sequence[int] | np.ndarray, cache: KVCache) -> np.ndarray:
        if not isinstance(cache, NpuCache):
            raise TypeError("an NPU model runs with its own cache: make one with new_cache()")
        return self.runner.forward(ids, cache)

    def logits(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits (n, vocab) of every position of ids, from an empty cache (for evaluation)."""
        return self.runner.forward(ids, self.new_cache(), all_logits=True)

    def _one_shot(self, prompt_ids: list[int], config: GenerationConfig, *rest: Any) -> Iterator[StreamPiece]:
        # Model's, with the window for a cache; `rest` passes on what Model's passes (a constraint).
        yield from stream_pieces(self, prompt_ids, self.new_cache(), config, *rest)


def load_npu(
    root: Path, manifest: Manifest, options: ort.SessionOptions, providers: Sequence[Any]
) -> NpuModel:
    """An NpuModel over the package at root (its manifest already read and its files checked)."""
    layout = NpuLayout.from_dict(manifest.raw["npu"])
    try:
        runner = NpuRunner(manifest.config, root, layout, options, providers)
    except Exception as e:  # ONNX Runtime raises its own exception types for graphs it cannot load
        raise PackageError(
            f"{root}: ONNX Runtime could not load an NPU part ({e}): re-export the model"
        ) from e
    return NpuModel(root, manifest, runner, parse_tokenizer(root))
