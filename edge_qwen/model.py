"""Load a model package and run it: prefill, decode steps, streaming text."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edge_qwen.cache import KVCache
from edge_qwen.chat_template import ChatTemplate
from edge_qwen.detokenize import StreamDecoder
from edge_qwen.errors import PackageError
from edge_qwen.package import Manifest, read_manifest
from edge_qwen.sampling import Sampler, make_sampler

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # tokens per prefill run: bounds activation memory for long prompts


@dataclass(frozen=True)
class StreamPiece:
    """One step of `Model.stream`: new text (possibly empty) and where generation stands."""

    text: str
    token_id: int | None
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    finish_reason: str | None = None  # None while generating, then "stop" or "length"

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Model:
    """A loaded package: ONNX Runtime session, tokenizer, chat template and stop ids."""

    def __init__(self, path: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
        self.path = path
        self.manifest = manifest
        self.config = manifest.config
        self.session = session
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer_config: dict[str, Any] = _read_json(path / "tokenizer_config.json")
        template = self.tokenizer_config.get("chat_template")
        self.chat_template = (
            ChatTemplate(
                template,
                _token(self.tokenizer_config, "bos_token"),
                _token(self.tokenizer_config, "eos_token"),
            )
            if template
            else None
        )
        self.stop_token_ids = frozenset(manifest.stop_token_ids)
        self._lock = threading.Lock()  # one generation at a time per Model: see README "Threads"

    # -- tokens -----------------------------------------------------------------------------------

    def new_cache(self, max_context: int | None = None) -> KVCache:
        """A fresh KV cache for one sequence, up to `max_context` (default: the package's)."""
        n = max_context or self.manifest.max_context
        if not 1 <= n <= self.manifest.max_context:
            raise ValueError(f"max_context must be in [1, {self.manifest.max_context}], got {n}")
        return KVCache(self.config, n)

    def forward(self, ids: Sequence[int] | np.ndarray, cache: KVCache) -> np.ndarray:
        """Run `ids` after what `cache` holds, in chunks; returns the last position's logits (vocab,)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("forward needs at least one token")
        cache.check_room(ids.size)
        logits = np.empty(0, np.float32)
        for start in range(0, ids.size, PREFILL_CHUNK):
            logits = self._run(ids[start : start + PREFILL_CHUNK], cache)
        return logits

    def _run(self, chunk: np.ndarray, cache: KVCache) -> np.ndarray:
        binding = self.session.io_binding()
        total = cache.length + chunk.size
        binding.bind_cpu_input("input_ids", chunk.reshape(1, -1))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        binding.bind_output("logits")  # first, so that it is get_outputs()[0]
        cache.bind(binding)
        self.session.run_with_iobinding(binding)
        cache.advance(chunk.size)
        logits = binding.get_outputs()[0].numpy()  # (1, 1 | chunk, vocab)
        return logits[0, -1]

    def generate_tokens(
        self, prompt_ids: Sequence[int], sampler: Sampler, max_tokens: int, cache: KVCache | None = None
    ) -> Iterator[int]:
        """The step generator: yields each sampled token id, stopping after a stop id or max_tokens."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        cache = cache if cache is not None else self.new_cache()
        history = list(prompt_ids)
        logits = self.forward(prompt_ids, cache)
        for step in range(max_tokens):
            token = sampler(logits, history)
            history.append(token)
            yield token
            if token in self.stop_token_ids or step == max_tokens - 1:
                return
            logits = self.forward([token], cache)

    # -- text -------------------------------------------------------------------------------------

    def encode_prompt(
        self, prompt: str | Sequence[Mapping[str, Any]], chat: bool = True, system: str | None = None
    ) -> list[int]:
        """Token ids for a prompt: a chat (rendered with the model's template) or raw text."""
        if isinstance(prompt, str) and not chat:
            text = prompt
        else:
            if self.chat_template is None:
                raise PackageError(f"{self.path} has no chat template: use raw prompts (--raw)")
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if system is not None:
                messages = [{"role": "system", "content": system}, *messages]
            text = self.chat_template.render(messages, add_generation_prompt=True)
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def stream(
        self,
        prompt: str | Sequence[Mapping[str, Any]],
        *,
        max_tokens: int = 256,
        chat: bool = True,
        system: str | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[StreamPiece]:
        """Generate from a prompt, yielding text pieces as they become complete UTF-8."""
        sampler = make_sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        prompt_ids = self.encode_prompt(prompt, chat=chat, system=system)
        with self._lock:
            yield from self._stream_ids(prompt_ids, sampler, max_tokens)

    def _stream_ids(self, prompt_ids: list[int], sampler: Sampler, max_tokens: int) -> Iterator[StreamPiece]:
        decoder = StreamDecoder(self.tokenizer)
        start = time.perf_counter()
        first_token_at = start
        for n, token in enumerate(self.generate_tokens(prompt_ids, sampler, max_tokens), start=1):
            now = time.perf_counter()
            if n == 1:
                first_token_at = now
            stopped = token in self.stop_token_ids
            finish = "stop" if stopped else "length" if n == max_tokens else None
            text = "" if stopped else decoder.push(token)
            if finish is not None:
                text += decoder.flush()
            yield StreamPiece(
                text, token, len(prompt_ids), n, first_token_at - start, now - first_token_at, finish
            )

    def generate(self, prompt: str | Sequence[Mapping[str, Any]], **options: Any) -> str:
        """Generate and return the whole completion (the stop token is not included)."""
        return "".join(piece.text for piece in self.stream(prompt, **options))


def load(path: str | Path, provider: str = "cpu", threads: int | None = None) -> Model:
    """Load a model package folder, checking its manifest and files first."""
    root = Path(path)
    manifest = read_manifest(root)
    if provider != "cpu":
        raise ValueError(f"unknown provider {provider!r}: this version runs on 'cpu'")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(root / "model.onnx"), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime raises its own exception types for bad graphs
        raise PackageError(
            f"{root}: ONNX Runtime could not load model.onnx ({e}); re-export the model"
        ) from e
    return Model(root, manifest, session)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def _token(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value
