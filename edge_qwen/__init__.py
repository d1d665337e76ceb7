"""edge-qwen: an on-device runtime for the small Qwen2.5 models."""

__version__ = "0.1.0"

from edge_qwen.model import Model, StreamPiece, load  # noqa: E402

__all__ = ["Model", "StreamPiece", "load", "__version__"]
