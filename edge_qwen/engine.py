"""The engine: a package's ONNX Runtime session run on token ids (prefill in chunks, decode steps),
its tokenizer and chat template, and the lock that serializes generations."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Collection, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edge_qwen.cache import KVCache, default_cache_len
from edge_qwen.chat_template import ChatTemplate
from edge_qwen.errors import ContextFullError, PackageError
from edge_qwen.package import Manifest
from edge_qwen.sampling import Sampler

# Tokens per prefill run: it bounds the activations ONNX Runtime's arena grows to (and keeps). On the
# default 0.5B package, 64 rather than 256 left 13 MB less resident after a 128-token prompt at the
# same prefill speed (290-322 tok/s either way at 128, 512 and 1024 prompt tokens, 2-core x86).
PREFILL_CHUNK = 64
LAST_POSITION = np.array([-1], np.int64)  # logits_start: the lm_head runs on the last position alone

__all__ = ["PREFILL_CHUNK", "Engine", "Prompt", "TokenPicker", "check_context"]

Prompt = str | Sequence[Mapping[str, Any]]
# A Sampler, or any (logits, history) -> token id callable (tests script tokens with one).
TokenPicker = Sampler | Callable[[np.ndarray, list[int]], int]
T = TypeVar("T")


class Engine:
    """A loaded package as token ids in, token ids out: ONNX Runtime session, tokenizer, chat template
    and stop ids. `Model` adds text generation and chat on top.

    Thread safety: generations are serialized through `serialized`, which holds the engine's lock from
    a generation's first piece to its last (or until the stream is closed).
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        session: ort.InferenceSession,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.config = manifest.config
        self.session = session
        self.providers: list[str] = list(session.get_providers())
        self.tokenizer = tokenizer if tokenizer is not None else parse_tokenizer(path)
        self.tokenizer_config: dict[str, Any] = _read_json(path / "tokenizer_config.json")
        self.stop_token_ids = frozenset(manifest.stop_token_ids)
        self._lock = _GenerationLock()
        # Our graphs compute every position's logits unless fed logits_start = [-1] (export/builder.py);
        # a graph without that input (onnxruntime-genai's builder) always computes every position.
        overridable = {i.name for i in session.get_overridable_initializers()}
        self._last_only = "logits_start" in overridable or manifest.logits == "last"
        self._takes_positions = "position_ids" in {i.name for i in session.get_inputs()}

    @functools.cached_property
    def chat_template(self) -> ChatTemplate | None:
        """The package's chat template, compiled at first use (with jinja2, imported then); None if
        it has none. ChatTemplateError if it does not compile."""
        template = self.tokenizer_config.get("chat_template") or _read_text(self.path / "chat_template.jinja")
        if not template:
            return None
        config = self.tokenizer_config
        return ChatTemplate(template, _token(config, "bos_token"), _token(config, "eos_token"))

    # -- tokens -----------------------------------------------------------------------------------

    def new_cache(self, max_context: int | None = None) -> KVCache:
        """A fresh KV cache for one sequence, up to `max_context` tokens.

        The default is the package's max context, capped (with a logged warning) so that the cache
        takes at most half the memory available.
        """
        limit = self.manifest.max_context
        n = default_cache_len(self.config, limit) if max_context is None else max_context
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
            raise ValueError(f"max_context must be an integer in [1, {limit}], got {n!r}")
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
        binding = cache.binding(self.session)  # the layers' buffers, bound once
        total = cache.length + chunk.size
        binding.bind_cpu_input("input_ids", chunk.reshape(1, -1))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        if self._takes_positions:
            binding.bind_cpu_input("position_ids", np.arange(cache.length, total, dtype=np.int64)[None])
        if self._last_only:
            # bind_cpu_input looks the name up among the required inputs only
            binding.bind_ortvalue_input("logits_start", ort.OrtValue.ortvalue_from_numpy(LAST_POSITION))
        # A new array each run, so that a returned one is never written again. Bound, not read back with
        # get_outputs(), which wraps all 49 outputs (the KV cache's too): ~125 us of a ~14 ms step.
        rows = 1 if self._last_only else chunk.size
        logits = np.empty((1, rows, self.config.vocab_size), np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        cache.append(chunk)
        return logits[0, -1]

    def generate_tokens(
        self,
        prompt_ids: Sequence[int],
        sampler: TokenPicker,
        max_tokens: int,
        cache: KVCache | None = None,
        stop_ids: Collection[int] | None = None,
    ) -> Generator[int, None, None]:
        """The step generator: yields each sampled token id, stopping after a stop id or max_tokens.

        `prompt_ids` is the whole sequence so far. A given cache is first rewound to the longest
        prefix it shares with them, so only the rest is prefilled. The last sampled token is not run
        (nothing needs its logits), so afterwards the cache holds the prompt and all but that token.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        stop_ids = self.stop_token_ids if stop_ids is None else stop_ids
        cache = cache if cache is not None else self.new_cache()
        history = list(prompt_ids)
        kept = cache.rewind_to(history)
        logits = self.forward(history[kept:], cache)
        for step in range(max_tokens):
            if isinstance(sampler, Sampler):
                token = sampler(logits, history, prompt_len=len(prompt_ids))
            else:
                token = sampler(logits, history)
            history.append(token)
            yield token
            if token in stop_ids or step == max_tokens - 1:
                return
            logits = self.forward([token], cache)

    # -- text -------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: Prompt,
        chat: bool = True,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
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
            text = self.chat_template.render(messages, add_generation_prompt=True, tools=tools)
        check_utf8(text)
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def serialized(self, pieces: Iterator[T]) -> Iterator[T]:
        """Run a generator under the model's lock, from its first item to its end or its close()."""
        with self._lock.held():
            for piece in pieces:
                yield piece
                self._lock.claim()  # the consumer may resume us from another thread


def check_context(prompt_tokens: int, max_tokens: int, context: int, fix: str = "") -> None:
    """Raise ContextFullError naming the numbers when prompt + max_tokens exceed the context."""
    fix = fix or "shorten the prompt or lower max_tokens"
    if prompt_tokens >= context:
        raise ContextFullError(
            f"the prompt is {prompt_tokens} tokens, longer than the context of {context} tokens: {fix}"
        )
    if prompt_tokens + max_tokens > context:
        raise ContextFullError(
            f"the prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
            f"{prompt_tokens + max_tokens} > the context of {context} tokens: {fix}"
        )


def check_utf8(text: str) -> None:
    """ValueError naming the spot if `text` holds lone surrogates: bytes that were not UTF-8.

    Python keeps undecodable bytes of command-line arguments and file names as surrogates
    (U+DC80-U+DCFF); the tokenizer cannot take them.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"lone surrogate U+{char:04X}"
        before = text[max(0, e.start - 20) : e.start]
        raise ValueError(
            f"the prompt is not valid UTF-8: {what} after {before!r} is not text; "
            "pass UTF-8 text (convert it with e.g. iconv -t UTF-8)"
        ) from None


class _GenerationLock:
    """A lock held through a whole generation; re-entering it from the holding thread is an error."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        if self._owner == threading.get_ident():
            # Waiting would never end: this thread is the one that must finish the other stream.
            raise RuntimeError(
                "this thread is already consuming a generation of this Model: finish or close() that "
                "stream before starting another (or use a second thread, which waits its turn)"
            )
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    def claim(self) -> None:
        self._owner = threading.get_ident()


def parse_tokenizer(path: Path) -> Tokenizer:
    """The package's tokenizer.json, parsed; PackageError naming the file if it does not parse."""
    try:
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable or malformed files
        raise PackageError(f"{path}: tokenizer.json does not parse ({e}): re-export the package") from e


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_text(path: Path) -> str | None:
    """A file's text, or None if there is none (transformers 5 keeps the chat template apart)."""
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _token(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value
