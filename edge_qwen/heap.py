"""Giving the C heap's freed pages back to the system once a load is over; elsewhere than glibc, nothing.

glibc keeps memory freed by `free()` for reuse, where it still counts in the process's resident size
and cannot be reclaimed. Loading leaves ~20 MB of it (the tokenizer's JSON parse, the graph's
protobuf): a quarter of the loaded model's anonymous memory (docs/memory.md). `malloc_trim(0)` is
glibc's own call to return it; it changes no allocator setting. musl (Alpine), bionic (Android),
macOS and Windows have no such call, and this module does nothing there.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any


def release_free_heap() -> bool:
    """Return the C heap's free pages to the system where the C library is glibc; whether it did."""
    if _glibc is None:
        return False
    _glibc.malloc_trim(0)
    return True


def _load_glibc(version: str) -> Any:
    """The C library, if `version` (os.confstr's CS_GNU_LIBC_VERSION) is glibc's and has malloc_trim."""
    if not version.startswith("glibc"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def _libc_version() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, OSError, ValueError):  # not a POSIX system, or no such name
        return ""


_glibc = _load_glibc(_libc_version())
