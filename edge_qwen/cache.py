"""The KV cache: one preallocated buffer pair per layer, shared by past and present through IOBinding."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edge_qwen.config import QwenConfig
from edge_qwen.errors import ContextFullError


class KVCache:
    """Keys and values for one sequence, written in place by GroupQueryAttention.

    Each layer's past input and present output are bound to the same OrtValue, so the graph appends
    the new positions into the buffer and a decode step copies no cache. `length` counts the valid
    positions; trimming only moves it back (positions past it are overwritten by the next step).
    """

    def __init__(self, config: QwenConfig, max_len: int, dtype: type = np.float32) -> None:
        shape = (
            1,
            config.num_key_value_heads,
            max_len,
            config.head_dim,
        )  # (batch, kv_heads, max_len, head_dim)
        self.max_len = max_len
        self.length = 0
        self.layers: list[tuple[np.ndarray, np.ndarray]] = [
            (np.zeros(shape, dtype), np.zeros(shape, dtype)) for _ in range(config.num_hidden_layers)
        ]
        self._values = [
            (ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v)) for k, v in self.layers
        ]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

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

    def advance(self, n: int) -> None:
        self.length += n

    def trim(self, length: int) -> None:
        """Rewind to `length` cached positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot trim a cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0
