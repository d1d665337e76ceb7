"""Handing back memory the model no longer needs, and huge pages for the memory it streams."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

import edge_qwen
from edge_qwen.memory import (
    anon_huge_page_bytes,
    drop_pages,
    huge_page_tunables,
    huge_pages_requested,
    release_weight_pages,
    unmodified_mappings,
)
from tests.conftest import mapped_kb


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc/self/smaps")
def test_dropped_pages_of_a_read_only_mapping_come_back_unchanged(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    path = tmp_path / "model.onnx.data"
    path.write_bytes(data)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    try:
        view = np.frombuffer(mapped, np.uint8)
        assert view.tobytes() == data  # every page read: resident
        assert mapped_kb(path, "Rss:") >= 1024
        drop_pages(view.ctypes.data, view.size)
        assert mapped_kb(path, "Rss:") == 0
        assert view.tobytes() == data  # faulted back in from the file
        del view
    finally:
        mapped.close()


SMAPS = """\
7f0000000000-7f0000004000 rw-p 00000000 08:01 42    /pkg/model.onnx.data
Rss:                  16 kB
Anonymous:             0 kB
7f0000004000-7f0000008000 rw-p 00004000 08:01 42    /pkg/model.onnx.data
Rss:                  16 kB
Anonymous:             4 kB
7f0000008000-7f000000c000 r--p 00000000 08:01 43    /pkg/other file.bin
Rss:                   8 kB
Anonymous:             0 kB
7f000000c000-7f000000d000 rw-p 00000000 00:00 0
Anonymous:             4 kB
"""


def test_only_unwritten_mappings_of_the_file_are_picked() -> None:
    assert unmodified_mappings(SMAPS, "/pkg/model.onnx.data") == [(0x7F0000000000, 0x7F0000004000)]
    assert unmodified_mappings(SMAPS, "/pkg/other file.bin") == [(0x7F0000008000, 0x7F000000C000)]
    assert unmodified_mappings(SMAPS, "/pkg/missing") == []


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc/self/smaps")
def test_read_pages_are_dropped_and_come_back_unchanged(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    path = tmp_path / "model.onnx.data"
    path.write_bytes(data)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        assert mapped[:] == data  # every page read: resident
        assert mapped_kb(path, "Rss:") >= 1024
        assert release_weight_pages(path) == len(data)
        assert mapped_kb(path, "Rss:") == 0
        assert mapped[:] == data  # faulted back in from the file
    finally:
        mapped.close()


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc/self/smaps")
def test_a_written_mapping_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx.data"
    path.write_bytes(b"\0" * 65536)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        mapped[0:4] = b"kept"  # a private copy of that page: dropping it would lose the write
        assert release_weight_pages(path) == 0
        assert mapped[0:4] == b"kept"
    finally:
        mapped.close()


def test_no_smaps_means_nothing_to_do(tmp_path: Path) -> None:
    assert release_weight_pages(tmp_path / "model.onnx.data", smaps=tmp_path / "absent") == 0


def _thp(tmp_path: Path, mode: str = "always [madvise] never", pmd: int = 2 << 20) -> Path:
    (tmp_path / "enabled").write_text(mode + "\n")
    (tmp_path / "hpage_pmd_size").write_text(f"{pmd}\n")
    return tmp_path


@pytest.mark.parametrize(
    ("environ", "mode", "pmd", "libc", "expected"),
    [
        ({}, "always [madvise] never", 2 << 20, "glibc 2.36", "glibc.malloc.hugetlb=1"),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
            "always [madvise] never",
            2 << 20,
            "glibc 2.41",
            "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        ),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "always [madvise] never", 2 << 20, "glibc 2.36", None),
        ({"EDGE_QWEN_HUGE_PAGES": "0"}, "always [madvise] never", 2 << 20, "glibc 2.36", None),
        ({}, "[always] madvise never", 2 << 20, "glibc 2.36", None),  # the kernel does it already
        ({}, "always madvise [never]", 2 << 20, "glibc 2.36", None),
        ({}, "always [madvise] never", 32 << 20, "glibc 2.36", None),  # a 16K-page kernel (Pi 5)
        ({}, "always [madvise] never", 2 << 20, "glibc 2.34", None),  # no such tunable yet
        ({}, "always [madvise] never", 2 << 20, "", None),  # musl, bionic
    ],
)
def test_huge_pages_are_asked_only_where_they_change_something(
    tmp_path: Path, environ: dict[str, str], mode: str, pmd: int, libc: str, expected: str | None
) -> None:
    assert huge_page_tunables(environ, _thp(tmp_path, mode, pmd), libc) == expected
    if expected is not None:
        assert huge_pages_requested({"GLIBC_TUNABLES": expected})
        assert huge_page_tunables({"GLIBC_TUNABLES": expected}, _thp(tmp_path, mode, pmd), libc) is None


def test_no_transparent_huge_pages_in_the_kernel_means_no_request(tmp_path: Path) -> None:
    assert huge_page_tunables({}, tmp_path / "missing", "glibc 2.36") is None
    assert not huge_pages_requested({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})


def test_anonymous_huge_page_bytes_are_read_from_smaps_rollup(tmp_path: Path) -> None:
    rollup = tmp_path / "smaps_rollup"
    rollup.write_text("Rss:  500 kB\nAnonHugePages:  4096 kB\nShmemHugePages:  0 kB\n")
    assert anon_huge_page_bytes(rollup) == 4096 * 1024
    assert anon_huge_page_bytes(tmp_path / "missing") is None


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads /proc/self/smaps")
def test_kv_cache_buffers_stay_in_small_pages(tiny_fp32: Path) -> None:
    """Huge pages would make 2 MiB of each layer's buffer resident at its first cached position."""
    model = edge_qwen.load(tiny_fp32)
    cache = model.new_cache(64)
    keys, values = cache.layers[0]
    assert keys.flags.writeable and not keys.any() and not values.any()
    flags = _vm_flags(keys.ctypes.data)
    if flags is None or not Path("/sys/kernel/mm/transparent_hugepage/enabled").is_file():
        pytest.skip("this kernel reports no VmFlags or has no transparent huge pages")
    assert "nh" in flags  # VM_NOHUGEPAGE: madvise(MADV_NOHUGEPAGE) took
    model.forward([1, 2, 3], cache)
    assert keys[0, :, :3].any() and not keys[0, :, 3:].any()  # written in place by the graph


def _vm_flags(address: int) -> list[str] | None:
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and fields[0].count("-") == 1 and not fields[0].endswith(":"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields and fields[0] == "VmFlags:":
            return fields[1:]
    return None
