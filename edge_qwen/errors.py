"""The project's exceptions: each names the bad value and the fix."""

from __future__ import annotations


class EdgeQwenError(Exception):
    """Base class for errors a user can act on; the CLI prints them as one line."""


class PackageError(EdgeQwenError):
    """A model package is missing, incomplete, corrupted or of an unknown format."""


class ContextFullError(EdgeQwenError, ValueError):
    """The KV cache cannot hold the tokens asked for."""


class InsufficientMemoryError(EdgeQwenError, MemoryError):
    """An allocation (a KV cache) would need more memory than the system has available."""
