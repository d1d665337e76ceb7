"""Handing back pages the model no longer needs: only read-only-in-effect file pages, never data."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from edge_qwen.memory import release_weight_pages, unmodified_mappings
from tests.conftest import mapped_kb

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
