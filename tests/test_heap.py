"""Returning the C heap's freed pages: glibc's malloc_trim where there is one, nothing elsewhere."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import pytest

from edge_qwen import heap


def rss_anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon line")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_on_glibc_freed_heap_goes_back_to_the_system() -> None:
    # Many small blocks (below glibc's mmap threshold, so on the heap), freed but the last: the heap's
    # top cannot shrink past the survivor, so only malloc_trim can return the pages below it.
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = []
    for _ in range(2000):
        p = libc.malloc(64 * 1024)
        ctypes.memset(p, 1, 64 * 1024)  # touched: resident
        blocks.append(p)
    for p in blocks[:-1]:
        libc.free(p)
    before = rss_anon_kb()
    assert heap.release_free_heap() is True
    released = before - rss_anon_kb()
    libc.free(blocks[-1])
    assert released > 50_000  # of the ~125 MB freed, most is returned (kB)


def test_without_glibc_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert heap._load_glibc("musl libc 1.2.4") is None
    assert heap._load_glibc("") is None
    monkeypatch.setattr(heap, "_glibc", None)
    assert heap.release_free_heap() is False
