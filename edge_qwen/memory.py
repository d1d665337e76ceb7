"""Handing memory the model no longer needs back to the system, so resident size is what it uses.

Two leftovers of loading a package count in the process's resident size without being used:

- the C heap's freed pages, which glibc keeps for reuse (the tokenizer's JSON parse, the graph's
  protobuf): `release_free_heap` trims them;
- pages of the weights file that ONNX Runtime read while loading and keeps mapped. It maps each
  external initializer privately and, once a MatMulNBits kernel has packed its weight into its own
  buffer, unmaps it; but on x86 its int8-compute path reports scales and zero points as not packed, so
  they stay mapped, and resident, unused (~67 MB at block 32, ~33 MB at block 64 for the 0.5B).
  `release_weight_pages` drops them: the kernel forgets those pages, and should anything read them
  again they come back from the file, unchanged. Only mappings with no page of their own (nothing
  written over the file's contents, "Anonymous: 0" in /proc/self/smaps) are touched, so no data can
  be lost.

On other systems (no /proc/self/smaps, no glibc) both do nothing.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

MADV_DONTNEED = 4  # Linux, every architecture


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim); elsewhere, nothing.

    glibc keeps freed memory for reuse, where it still counts in the process's resident size; on a
    small board that memory is better left to the page cache and the other programs.
    """
    if _glibc is not None:
        _glibc.malloc_trim(0)


def release_weight_pages(data_file: Path, smaps: Path = Path("/proc/self/smaps")) -> int:
    """Drop this process's resident pages of `data_file` that were only ever read; returns bytes mapped.

    The pages stay in the page cache (other processes and the next load still find them there).
    """
    if _libc is None or not smaps.is_file():
        return 0
    released = 0
    for start, end in unmodified_mappings(smaps.read_text(), str(Path(data_file).resolve())):
        if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            released += end - start
    return released


def unmodified_mappings(smaps_text: str, path: str) -> list[tuple[int, int]]:
    """(start, end) of the mappings of `path` in an smaps text that hold no anonymous (written) page."""
    found: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in smaps_text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0].count("-") == 1 and not fields[0].endswith(":"):  # a mapping's header line
            current = None
            if len(fields) >= 6 and " ".join(fields[5:]) == path:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = (start, end)
        elif current is not None and fields[0] == "Anonymous:":
            if fields[1] == "0":
                found.append(current)
            current = None
    return found


def _load_libc() -> tuple[Any, Any]:
    """(libc with madvise, glibc with malloc_trim), each None where unavailable."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):
        return None, None
    madvise = libc if os.name == "posix" and hasattr(libc, "madvise") else None
    if madvise is not None:
        madvise.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    glibc = libc if _is_glibc() and hasattr(libc, "malloc_trim") else None  # musl, bionic: no trim
    return madvise, glibc


def _is_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, OSError, ValueError):
        return False


_libc, _glibc = _load_libc()
