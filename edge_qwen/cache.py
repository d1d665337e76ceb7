"""The KV cache: one preallocated buffer pair per layer, shared by past and present through IOBinding."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_qwen.config import QwenConfig
from edge_qwen.errors import ContextFullError, InsufficientMemoryError

log = logging.getLogger(__name__)

# The default cache may take at most this share of the memory available when it is made: the rest
# stays for the weights' pages, activations and the other programs on a small device.
CACHE_MEMORY_SHARE = 0.5


class KVCache:
    """Keys and values for one sequence, written in place by GroupQueryAttention.

    Each layer's past input and present output are bound to the same OrtValue, so the graph appends
    the new positions into the buffer and a decode step copies no cache. `tokens` are the ids whose
    positions the cache holds (`length` of them); trimming only moves the end back, and positions
    past it are overwritten by the next run.
    """

    def __init__(self, config: QwenConfig, max_len: int, dtype: type = np.float32) -> None:
        if max_len < 1:
            raise ValueError(f"a KV cache needs room for at least one token, got max_len={max_len}")
        check_memory(max_len * kv_bytes_per_token(config, dtype), f"a KV cache of {max_len} tokens")
        shape = (
            1,
            config.num_key_value_heads,
            max_len,
            config.head_dim,
        )  # (batch, kv_heads, max_len, head_dim)
        self.max_len = max_len
        self.tokens: list[int] = []
        self.layers: list[tuple[np.ndarray, np.ndarray]] = [
            (small_page_zeros(shape, dtype), small_page_zeros(shape, dtype))
            for _ in range(config.num_hidden_layers)
        ]
        self._values = [
            (ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v)) for k, v in self.layers
        ]
        self._binding: ort.IOBinding | None = None
        self._bound_to: ort.InferenceSession | None = None

    @property
    def length(self) -> int:
        """How many positions the cache holds."""
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def binding(self, session: ort.InferenceSession) -> ort.IOBinding:
        """An IOBinding of `session` with every layer bound (made once per session: the buffers stay put).

        The caller binds the per-run inputs and the logits output before each run (binding a name
        again replaces it in place).
        """
        if self._binding is None or self._bound_to is not session:
            self._binding = session.io_binding()
            self._bound_to = session
            self.bind(self._binding)
        return self._binding

    def bind(self, binding: ort.IOBinding) -> None:
        """Bind every layer's past input and present output to the same buffer."""
        for i, (k, v) in enumerate(self._values):
            binding.bind_ortvalue_input(f"past_key_values.{i}.key", k)
            binding.bind_ortvalue_input(f"past_key_values.{i}.value", v)
            binding.bind_ortvalue_output(f"present.{i}.key", k)
            binding.bind_ortvalue_output(f"present.{i}.value", v)

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise ContextFullError(
                f"context is full: {self.length} cached + {n_new} new tokens > {self.max_len} "
                "(use a shorter prompt, fewer max_tokens, or a larger max_context)"
            )

    def append(self, ids: Sequence[int] | np.ndarray) -> None:
        """Record that the graph has just written the positions of `ids` after the cached ones."""
        self.tokens.extend(int(i) for i in ids)

    def trim(self, length: int) -> None:
        """Rewind to `length` cached positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot trim a cache of length {self.length} to {length}")
        del self.tokens[length:]

    def reset(self) -> None:
        self.tokens.clear()

    def rewind_to(self, ids: Sequence[int]) -> int:
        """Trim to the longest prefix the cache shares with `ids`, keeping at least one id to run.

        Returns how many positions are kept (reused): only `ids[kept:]` need to run next. The last id
        always runs, since its logits pick the next token.
        """
        kept = min(common_prefix_len(self.tokens, ids), len(ids) - 1)
        self.trim(max(kept, 0))
        return max(kept, 0)


def small_page_zeros(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A zeroed array in its own anonymous mapping, kept out of transparent huge pages where asked.

    A KV cache is sized for the longest context but written one position at a time. In 4 KiB pages
    it costs what it holds; in 2 MiB huge pages, which numpy asks for on arrays of 4 MB or more, the
    first position of each layer's buffer would make 2 MiB resident: ~100 MB for the 0.5B's 48
    buffers before a token is cached.
    """
    count = int(np.prod(shape))
    # Anonymous: zero-filled, its pages made on first write.
    buffer = mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1))
    if hasattr(buffer, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux; elsewhere no THP
        with contextlib.suppress(OSError):  # a kernel built without transparent huge pages
            buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype, count=count).reshape(shape)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def kv_bytes_per_token(config: QwenConfig, dtype: type = np.float32) -> int:
    """Bytes of keys and values one position takes over all layers."""
    per_layer = 2 * config.num_key_value_heads * config.head_dim * np.dtype(dtype).itemsize
    return per_layer * config.num_hidden_layers


def available_memory() -> int | None:
    """Bytes of memory available to new allocations, or None when the system does not say.

    In a container with a memory limit (cgroup v2), the room left under the limit, if smaller.
    """
    system = _system_available()
    limited = _cgroup_available()
    if system is None or limited is None:
        return system if limited is None else limited
    return min(system, limited)


def _system_available() -> int | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every platform names these
        return None


def _cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """memory.max - memory.current of this process's cgroup as a container sees it; None without a limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text())
    except (OSError, ValueError):  # no cgroup v2 here, or not readable: no limit known
        return None
    return max(int(limit) - used, 0) if limit.isdigit() else None


def check_memory(nbytes: int, what: str) -> None:
    """Refuse, naming the numbers, an allocation of `nbytes` that exceeds the memory available now.

    Better than letting the kernel's OOM killer end the process halfway through a generation (the
    cache's pages are only made as positions are written). Where the system does not say how much
    is available, nothing is checked.
    """
    available = available_memory()
    if available is not None and nbytes > available:
        raise InsufficientMemoryError(
            f"{what} needs {nbytes / 1e6:.1f} MB, but only {available / 1e6:.1f} MB of memory is "
            "available: use a smaller max_context or fewer max_tokens, or free memory"
        )


def default_cache_len(config: QwenConfig, max_context: int) -> int:
    """The package's max context, capped (with a warning) so the cache fits in available memory."""
    available = available_memory()
    if available is None:
        return max_context
    per_token = kv_bytes_per_token(config)
    fits = int(available * CACHE_MEMORY_SHARE) // per_token
    if fits >= max_context:
        return max_context
    if fits < 1:
        raise ContextFullError(f"only {available / 1e6:.0f} MB of memory available: no room for a KV cache")
    log.warning(
        "a KV cache of %d tokens needs %.0f MB, more than half of the %.0f MB available: "
        "capping the context at %d tokens (pass max_context to choose)",
        max_context,
        max_context * per_token / 1e6,
        available / 1e6,
        fits,
    )
    return fits
