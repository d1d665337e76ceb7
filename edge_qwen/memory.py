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

And one way to make decode faster: `collapse_into_huge_pages`. A decode step streams every packed
weight (~340 MB for the 0.5B at int4) through the CPU; in 4 KiB pages that is ~85,000 page walks and
a hardware prefetcher that stops at every page boundary. With transparent huge pages in "madvise"
mode (the common distribution default) nothing gets huge pages unless asked. `edge_qwen.load` asks
once the session is built: a background thread has the kernel copy every fully resident 2 MiB of
the process's anonymous memory into a huge page (MADV_COLLAPSE, Linux 6.1+), which takes 0.45-1.6 s
here while the model already runs. Asking earlier (glibc's `glibc.malloc.hugetlb=1`, which the
`edge-qwen` command did until session 6) put every allocation of the load in fresh huge pages, and on
this virtual machine fresh memory is slow to touch: the load took 1.0-1.4 s instead of ~0.85
(README, "Speed"; docs/memory.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
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


HUGE_PAGE_OPT_OUT = "EDGE_QWEN_HUGE_PAGES"  # "0": leave the weights in small pages
THP = Path("/sys/kernel/mm/transparent_hugepage")
HUGE_PAGE = 2 << 20  # a 16K- or 64K-page kernel's huge pages (32 MB, 512 MB) would bloat memory
MADV_COLLAPSE = 25  # Linux 6.1+
SMAPS = Path("/proc/self/smaps")
_LOW_BIT = bytes(b & 1 for b in range(256))


def huge_pages_wanted(environ: dict[str, str] | os._Environ[str], thp: Path = THP) -> bool:
    """Whether `collapse_into_huge_pages` should run: Linux with transparent huge pages in "madvise"
    mode ("always" gives them already; "never" is the user's choice) of 2 MiB, not opted out
    (EDGE_QWEN_HUGE_PAGES=0)."""
    if environ.get(HUGE_PAGE_OPT_OUT, "1") == "0" or _libc is None:
        return False
    try:
        mode = (thp / "enabled").read_text()
        pmd_size = int((thp / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return False
    return "[madvise]" in mode and pmd_size == HUGE_PAGE


def collapse_in_background() -> threading.Thread:
    """`collapse_into_huge_pages` in a daemon thread of the lowest priority, started: the model runs
    meanwhile, and a request made at once takes the CPU before it (join() to wait for it)."""

    def collapse() -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux sets a thread's nice value alone
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        collapse_into_huge_pages()

    thread = threading.Thread(target=collapse, name="edge-qwen-huge-pages", daemon=True)
    thread.start()
    return thread


def collapse_into_huge_pages(smaps: Path = SMAPS) -> int:
    """Copy every fully resident, aligned 2 MiB of this process's anonymous memory into a huge page.

    Only ranges whose 512 pages are all resident (mincore) are asked, so nothing becomes resident
    that was not; memory marked MADV_NOHUGEPAGE (the KV cache) is refused by the kernel. The kernel
    copies under its own locks: safe while other threads read or write the memory. Returns the bytes
    collapsed (0 where the kernel has no MADV_COLLAPSE).
    """
    if _libc is None or not smaps.is_file():
        return 0
    done = 0
    for start, end in anonymous_writable(smaps.read_text()):
        for chunk in _fully_resident_chunks(start, end):
            # Refused (EINVAL) by kernels before 6.1 and for MADV_NOHUGEPAGE memory: left as it is.
            if _libc.madvise(ctypes.c_void_p(chunk), ctypes.c_size_t(HUGE_PAGE), MADV_COLLAPSE) == 0:
                done += HUGE_PAGE
    return done


def anonymous_writable(smaps_text: str) -> list[tuple[int, int]]:
    """(start, end) of the private writable mappings without a file (the heap's included)."""
    found = []
    for line in smaps_text.splitlines():
        mapping = mapping_header(line.split())
        if mapping is not None:
            start, end, perms, name = mapping
            if perms.startswith("rw") and perms.endswith("p") and name in ("", "[heap]"):
                found.append((start, end))
    return found


def mapping_header(fields: list[str]) -> tuple[int, int, str, str] | None:
    """(start, end, permissions, path) of an smaps or maps line that opens a mapping, else None."""
    if len(fields) < 5 or fields[0].count("-") != 1 or fields[0].endswith(":"):
        return None
    start, end = (int(x, 16) for x in fields[0].split("-"))
    return start, end, fields[1], " ".join(fields[5:])


def _fully_resident_chunks(start: int, end: int) -> list[int]:
    first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return []
    per_chunk = HUGE_PAGE // mmap.PAGESIZE
    per_page = _resident_pages(first, last - first)
    if per_page is None:
        return []  # unmapped meanwhile
    return [
        first + i * HUGE_PAGE
        for i in range((last - first) // HUGE_PAGE)
        if 0 not in per_page[i * per_chunk : (i + 1) * per_chunk]
    ]


def resident_fraction(address: int, size: int) -> float:
    """The share of the pages of `size` bytes at `address` (page-aligned) that are in memory: for a
    file mapping, in the page cache, whether this process maps them or not. 0 where unknown."""
    per_page = _resident_pages(address, size) if _libc is not None and size > 0 else None
    return per_page.count(1) / len(per_page) if per_page else 0.0


def _resident_pages(address: int, size: int) -> bytes | None:
    """mincore's answer, one byte per page, 1 for resident; None if the range is not mapped."""
    resident = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    if _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), resident) != 0:
        return None
    return bytes(resident).translate(_LOW_BIT)  # mincore's bit 0: resident; the others reserved


def without_huge_page_choice(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """`environ` less EDGE_QWEN_HUGE_PAGES (and GLIBC_TUNABLES, where glibc could be asked for huge
    pages): a child `edge-qwen` started with it makes the choice itself, as on a new user's machine
    (the bench scripts and tests start it so)."""
    return {k: v for k, v in environ.items() if k not in ("GLIBC_TUNABLES", HUGE_PAGE_OPT_OUT)}


def anon_huge_page_bytes(rollup: Path = Path("/proc/self/smaps_rollup")) -> int | None:
    """Bytes of this process's anonymous memory in transparent huge pages; None where not reported."""
    try:
        for line in rollup.read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


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
        mapping = mapping_header(fields)
        if mapping is not None:
            current = mapping[:2] if mapping[3] == path else None
        elif current is not None and fields and fields[0] == "Anonymous:":
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
    madvise = libc if os.name == "posix" and hasattr(libc, "madvise") and hasattr(libc, "mincore") else None
    if madvise is not None:
        madvise.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    glibc = libc if _is_glibc() and hasattr(libc, "malloc_trim") else None  # musl, bionic: no trim
    return madvise, glibc


def _is_glibc() -> bool:
    return _glibc_version().startswith("glibc")


_libc, _glibc = _load_libc()
