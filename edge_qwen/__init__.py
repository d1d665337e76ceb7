"""edge-qwen: an on-device runtime for the small Qwen2.5 models."""

__version__ = "0.1.0"

from edge_qwen.errors import ContextFullError, EdgeQwenError, PackageError  # noqa: E402
from edge_qwen.generation import GenerationConfig, StreamPiece  # noqa: E402
from edge_qwen.model import Model, load  # noqa: E402
from edge_qwen.providers import available_providers  # noqa: E402
from edge_qwen.sampling import SamplerConfig  # noqa: E402
from edge_qwen.session import ChatSession, TurnStats  # noqa: E402

__all__ = [
    "ChatSession",
    "ContextFullError",
    "EdgeQwenError",
    "GenerationConfig",
    "Model",
    "PackageError",
    "SamplerConfig",
    "StreamPiece",
    "TurnStats",
    "__version__",
    "available_providers",
    "load",
]
