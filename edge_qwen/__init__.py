"""edge-qwen: an on-device runtime for the small Qwen2.5 models.

The names below are imported on first use, so that `import edge_qwen` (and `edge-qwen --help`) does
not load ONNX Runtime and numpy until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "ContextFullError": "edge_qwen.errors",
    "EdgeQwenError": "edge_qwen.errors",
    "PackageError": "edge_qwen.errors",
    "GenerationConfig": "edge_qwen.generation",
    "StreamPiece": "edge_qwen.generation",
    "Model": "edge_qwen.model",
    "load": "edge_qwen.loader",
    "available_providers": "edge_qwen.providers",
    "SamplerConfig": "edge_qwen.sampling",
    "ChatSession": "edge_qwen.session",
    "TurnStats": "edge_qwen.session",
    "ToolCall": "edge_qwen.tool_calls",
}

__all__ = [
    "ChatSession",
    "ContextFullError",
    "EdgeQwenError",
    "GenerationConfig",
    "Model",
    "PackageError",
    "SamplerConfig",
    "StreamPiece",
    "ToolCall",
    "TurnStats",
    "__version__",
    "available_providers",
    "load",
]

if TYPE_CHECKING:
    from edge_qwen.errors import ContextFullError, EdgeQwenError, PackageError
    from edge_qwen.generation import GenerationConfig, StreamPiece
    from edge_qwen.loader import load
    from edge_qwen.model import Model
    from edge_qwen.providers import available_providers
    from edge_qwen.sampling import SamplerConfig
    from edge_qwen.session import ChatSession, TurnStats
    from edge_qwen.tool_calls import ToolCall


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'edge_qwen' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
