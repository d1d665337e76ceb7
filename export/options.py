"""Export options, validated once where they are made."""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge_qwen.config import QwenConfig

PRECISIONS = ("fp32", "fp16")
LOGITS = ("last", "all")
DEFAULT_MAX_CONTEXT = 4096


@dataclass(frozen=True)
class ExportOptions:
    """What to export: precision, context size of the rotary caches, which logits to keep."""

    precision: str = "fp32"
    max_context: int | None = None  # None: min(DEFAULT_MAX_CONTEXT, the model's own maximum)
    logits: str = "last"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.logits not in LOGITS:
            raise ValueError(f"logits must be 'last' or 'all', got {self.logits!r}")
        if self.max_context is not None and self.max_context < 16:
            raise ValueError(f"max_context must be >= 16, got {self.max_context}")

    def for_model(self, config: QwenConfig) -> ExportOptions:
        """Resolve the default context and check it against the model's maximum."""
        limit = config.max_position_embeddings
        if self.max_context is None:
            return replace(self, max_context=min(DEFAULT_MAX_CONTEXT, limit))
        if self.max_context > limit:
            raise ValueError(
                f"max_context {self.max_context} exceeds the model's max_position_embeddings {limit}"
            )
        return self
