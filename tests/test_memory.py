"""Handing back memory the model no longer needs, and huge pages for the memory it streams."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edge_qwen
from edge_qwen.memory import (
    anon_huge_page_bytes,
    anonymous_writable,
    collapse_in_background,
    collapse_into_huge_pages,
    drop_pages,
    huge_pages_wanted,
    mapping_header,
    release_weight_pages,
    unmodified_mappings,
)
from tests.conftest import mapped_kb

DATA = bytes(range(256)) * 4096  # 1 MiB


def _mapped_file(tmp_path: Path, data: bytes, prot: int) -> tuple[Path, mmap.mmap]:
    """`data` written to tmp_path/model.onnx.data and mapped privately with `prot`."""
    path = tmp_path / "model.onnx.data"
    path.write_bytes(data)
    with open(path, "rb") as f:
        return path, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=prot)


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc/self/smaps")
def test_dropped_pages_of_a_read_only_mapping_come_back_unchanged(tmp_path: Path) -> None:
    data = DATA
    path, mapped = _mapped_file(tmp_path, data, mmap.PROT_READ)
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
    data = DATA
    path, mapped = _mapped_file(tmp_path, data, mmap.PROT_READ | mmap.PROT_WRITE)
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
    path, mapped = _mapped_file(tmp_path, b"\0" * 65536, mmap.PROT_READ | mmap.PROT_WRITE)
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
    ("environ", "mode", "pmd", "expected"),
    [
        ({}, "always [madvise] never", 2 << 20, True),
        ({"EDGE_QWEN_HUGE_PAGES": "1"}, "always [madvise] never", 2 << 20, True),
        ({"EDGE_QWEN_HUGE_PAGES": "0"}, "always [madvise] never", 2 << 20, False),
        ({}, "[always] madvise never", 2 << 20, False),  # the kernel does it already
        ({}, "always madvise [never]", 2 << 20, False),  # the user's choice
        ({}, "always [madvise] never", 32 << 20, False),  # a 16K-page kernel (Pi 5)
    ],
)
def test_huge_pages_are_wanted_only_where_they_change_something(
    tmp_path: Path, environ: dict[str, str], mode: str, pmd: int, expected: bool
) -> None:
    if expected and not sys.platform.startswith("linux"):
        pytest.skip("madvise and mincore: Linux")
    assert huge_pages_wanted(environ, _thp(tmp_path, mode, pmd)) is expected


def test_no_transparent_huge_pages_in_the_kernel_means_none_wanted(tmp_path: Path) -> None:
    assert not huge_pages_wanted({}, tmp_path / "missing")


def test_anonymous_writable_mappings_are_read_from_smaps() -> None:
    smaps = (
        "7f0000000000-7f0000400000 rw-p 00000000 00:00 0\nAnonymous: 4096 kB\n"
        "7f0000400000-7f0000800000 r--p 00000000 08:01 42    /pkg/model.onnx.data\nRss: 0 kB\n"
        "7f0000800000-7f0000a00000 rw-s 00000000 00:01 7    /dev/zero (deleted)\nRss: 0 kB\n"
        "560000000000-560000200000 rw-p 00000000 00:00 0    [heap]\nAnonymous: 2048 kB\n"
        "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0    [stack]\nAnonymous: 8 kB\n"
    )
    assert anonymous_writable(smaps) == [(0x7F0000000000, 0x7F0000400000), (0x560000000000, 0x560000200000)]


def _anonymous(size: int) -> tuple[mmap.mmap, np.ndarray]:
    """`size` bytes of anonymous memory in a mapping of their own: a page on either side is made
    inaccessible, so the kernel cannot merge it with a neighbour whose huge pages smaps would count."""
    region = mmap.mmap(-1, size + 2 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(region, np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for guard in (whole.ctypes.data, whole.ctypes.data + 4096 + size):
        assert libc.mprotect(guard, 4096, 0) == 0, ctypes.get_errno()  # PROT_NONE
    return region, whole[4096 : 4096 + size]


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").is_file(), reason="no THP")
def test_fully_resident_memory_is_collapsed_into_huge_pages_and_keeps_its_data() -> None:
    region, data = _anonymous(8 << 20)  # holds at least three aligned 2 MiB ranges
    address = data.ctypes.data
    data[:] = np.arange(data.size, dtype=np.uint64).astype(np.uint8)  # every page resident, written
    expected = data.copy()
    if _kernel() < (6, 1):
        pytest.skip("MADV_COLLAPSE arrived in Linux 6.1")
    assert collapse_into_huge_pages() >= 2 << 20
    assert _kb(address, "AnonHugePages:") >= 2048
    np.testing.assert_array_equal(data, expected)
    del data
    region.close()


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").is_file(), reason="no THP")
def test_memory_not_wholly_resident_is_left_as_it_is() -> None:
    region, data = _anonymous(8 << 20)
    address = data.ctypes.data
    data[::8192] = 1  # every other page: no 2 MiB range is whole
    rss = _kb(address, "Rss:")
    collapse_into_huge_pages()
    assert _kb(address, "AnonHugePages:") == 0
    assert _kb(address, "Rss:") == rss  # nothing made resident that was not
    del data
    region.close()


def _kernel() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _kb(address: int, field: str) -> int:
    values = _smaps_field(address, field)
    if values is None:
        raise AssertionError(f"no {field} for a mapping at {address:#x}")
    return int(values[0])


def _smaps_field(address: int, field: str) -> list[str] | None:
    """The values of `field` ("Rss:", "VmFlags:") for this process's mapping holding `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        mapping = mapping_header(fields)
        if mapping is not None:
            inside = mapping[0] <= address < mapping[1]
        elif inside and fields and fields[0] == field:
            return fields[1:]
    return None


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
    flags = _smaps_field(keys.ctypes.data, "VmFlags:")
    if flags is None or not Path("/sys/kernel/mm/transparent_hugepage/enabled").is_file():
        pytest.skip("this kernel reports no VmFlags or has no transparent huge pages")
    assert "nh" in flags  # VM_NOHUGEPAGE: madvise(MADV_NOHUGEPAGE) took
    model.forward([1, 2, 3], cache)
    assert keys[0, :, :3].any() and not keys[0, :, 3:].any()  # written in place by the graph


def test_the_background_move_runs_in_a_thread_that_can_be_waited_for() -> None:
    thread = collapse_in_background()
    assert thread.daemon and thread.name == "edge-qwen-huge-pages"
    thread.join(timeout=120)
    assert not thread.is_alive()


def test_load_starts_the_move_only_where_huge_pages_are_wanted(
    tiny_fp32: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (edge_qwen.load(tiny_fp32).huge_pages is not None) == huge_pages_wanted(os.environ)
    monkeypatch.setenv("EDGE_QWEN_HUGE_PAGES", "0")
    assert edge_qwen.load(tiny_fp32).huge_pages is None


def test_running_token_ids_imports_neither_jinja2_nor_libcrypto(tiny_fp32: Path) -> None:
    """~10 MB of libraries that only a chat prompt (jinja2) or a hash check (hashlib) needs."""
    script = (
        "import sys, edge_qwen\n"
        "m = edge_qwen.load(sys.argv[1])\n"
        "m.forward([1, 2, 3], m.new_cache(8))\n"
        "print(sorted({'jinja2', '_hashlib'} & set(sys.modules)))\n"
        "m.encode_prompt('hello')\n"
        "print(sorted({'jinja2', '_hashlib'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tiny_fp32)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "['_hashlib', 'jinja2']"]  # jinja2 imports hashlib
