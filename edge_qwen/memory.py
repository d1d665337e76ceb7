"""Handing memory the model no longer needs back to the system, so resident size is what it uses.

Two leftovers of loading a package count in the process's resident size without being used:

- the C heap's freed pages, which glibc keeps for reuse (the tokenizer's JSON parse, the graph's
  protobuf): `release_free_heap` trims them;
- pages of the weights file read while ONNX Runtime packed them: `drop_pages` makes the kernel forget
  pages of a read-only file mapping, which come back from the file, unchanged, should anything read
  them again (weights.py maps the file and calls it). With a provider other than the CPU alone, ONNX
  Runtime maps the file itself and keeps the scales it did not pack mapped; `release_weight_pages`
  drops those mappings' pages after the load, touching only mappings with no page of their own
  ("Anonymous: 0" in /proc/self/smaps), so no data can be lost.

On other systems (no glibc, no madvise) both do nothing.

The opposite case, memory the model will only partly touch, is the KV cache (cache.py,
`small_page_zeros`).

And one way to make decode faster: `huge_page_tunables`. A decode step streams every packed weight
(~340 MB for the 0.5B at int4) through the CPU; in 4 KiB pages that is ~85,000 page walks and a
hardware prefetcher that stops at every page boundary. With transparent huge pages in "madvise" mode
(the common distribution default) ONNX Runtime's packed weights get huge pages only if the heap asks
for them, which glibc does when started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1. The `edge-qwen`
command restarts itself with it (apps/launch.py). Measured here, decode 4-15% faster depending on the
run, and a slower first load on this virtual machine (README, "Speed"; docs/performance.md).
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


def drop_pages(address: int, size: int) -> None:
    """madvise(MADV_DONTNEED) `size` bytes at `address`: only for mappings nothing ever wrote to."""
    if _libc is not None:
        _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), MADV_DONTNEED)


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


HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGE_OPT_OUT = "EDGE_QWEN_HUGE_PAGES"  # "0" keeps glibc's default
THP = Path("/sys/kernel/mm/transparent_hugepage")
LARGEST_HUGE_PAGE = 2 << 20  # a 16K- or 64K-page kernel's huge pages (32 MB, 512 MB) would bloat memory


def huge_page_tunables(
    environ: dict[str, str] | os._Environ[str], thp: Path = THP, libc_version: str | None = None
) -> str | None:
    """The GLIBC_TUNABLES value that gives the weights huge pages, or None when it would change nothing.

    None when: opted out (EDGE_QWEN_HUGE_PAGES=0); already asked for; not glibc 2.35 or newer (the
    first with the tunable); transparent huge pages are off or "always" (the kernel already uses
    them) or unknown; or the huge page is bigger than 2 MiB.
    """
    if environ.get(HUGE_PAGE_OPT_OUT, "1") == "0":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in current:
        return None  # the user's own choice, or this process is the restarted one
    version = _glibc_version() if libc_version is None else libc_version
    if not version.startswith("glibc ") or _version_tuple(version[6:]) < (2, 35):
        return None
    try:
        mode = (thp / "enabled").read_text()
        pmd_size = int((thp / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return None
    if "[madvise]" not in mode or pmd_size > LARGEST_HUGE_PAGE:
        return None
    return f"{current}:{HUGE_PAGE_TUNABLE}" if current else HUGE_PAGE_TUNABLE


def without_huge_page_choice(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """`environ` less GLIBC_TUNABLES and EDGE_QWEN_HUGE_PAGES: a child `edge-qwen` started with it makes
    the choice itself, as on a new user's machine (the bench scripts and tests start it so)."""
    return {k: v for k, v in environ.items() if k not in ("GLIBC_TUNABLES", HUGE_PAGE_OPT_OUT)}


def huge_pages_requested(environ: dict[str, str] | os._Environ[str]) -> bool:
    """Whether this process was started asking glibc for huge pages."""
    return HUGE_PAGE_TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def anon_huge_page_bytes(rollup: Path = Path("/proc/self/smaps_rollup")) -> int | None:
    """Bytes of this process's anonymous memory in transparent huge pages; None where not reported."""
    try:
        for line in rollup.read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(".")[:2])
    except ValueError:
        return (0,)


def _glibc_version() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, OSError, ValueError):
        return ""


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
    return _glibc_version().startswith("glibc")


_libc, _glibc = _load_libc()
