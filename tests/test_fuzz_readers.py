"""Bounded fuzzing of the file readers: GGUF, safetensors and the package manifest.

Each test mutates a real, valid file (a tiny GGUF, a tiny checkpoint's safetensors, a tiny
package's manifest) the way corruption and hostile files do: bytes flipped, counts, lengths and
offsets replaced by extreme values, the file cut short, JSON fields given other types and values.
Whatever the input, a reader either reads it (and then every tensor loads) or raises its one clear
error type: ValueError naming the file for checkpoints, PackageError for packages. The examples are
derandomized and a fixed number, so the run is the same each time; the inputs that crashed a reader
once are kept below as regression cases.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_qwen.errors import PackageError
from edge_qwen.export.gguf_reader import read_gguf
from edge_qwen.export.hf_reader import read_hf_folder
from edge_qwen.package import MANIFEST, read_manifest
from tests.conftest import export_tiny
from tests.gguf_writer import EXTREMES, write_tiny_gguf
from tests.tiny import make_tiny_checkpoint

FUZZ = settings(
    max_examples=120,
    deadline=None,  # no timed assertions; the bound is the example count
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Files(dict):  # type: ignore[type-arg]
    """The valid files the fuzzers mutate (a short repr: hypothesis prints its arguments)."""

    def __repr__(self) -> str:
        return "Files(...)"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzz")
    gguf = root / "tiny.gguf"
    write_tiny_gguf(gguf)
    hf = make_tiny_checkpoint(root / "hf", tied=True, seed=8)
    package = export_tiny(hf, root / "pkg")
    return Files(
        gguf=gguf.read_bytes(),
        gguf_header_end=_gguf_data_offset(gguf),
        hf=hf,
        safetensors=(hf / "model.safetensors").read_bytes(),
        package=package,
        manifest=json.loads((package / MANIFEST).read_text()),
    )


def _gguf_data_offset(path: Path) -> int:
    from gguf import GGUFReader

    return int(GGUFReader(path).data_offset)


@st.composite
def mutated(draw: st.DrawFn, data: bytes, header_end: int) -> bytes:
    """`data` with a few corruptions, mostly inside its first `header_end` bytes."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["u64", "u32", "bytes", "cut", "insert"]))
        at = draw(st.integers(0, max(min(header_end, len(out)) - 1, 0)))
        if kind == "u64":
            out[at : at + 8] = struct.pack("<Q", draw(st.sampled_from(EXTREMES)))
        elif kind == "u32":
            out[at : at + 4] = struct.pack("<I", draw(st.sampled_from(EXTREMES)) & 0xFFFFFFFF)
        elif kind == "bytes":
            out[at : at + 4] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "cut":
            del out[draw(st.integers(0, len(out))) :]
        else:
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


def _read_every_tensor(ckpt: Any) -> None:
    for name in ckpt.names:
        ckpt.tensor(name)


# -- GGUF ------------------------------------------------------------------------------------------


def check_gguf(data: bytes, path: Path) -> None:
    path.write_bytes(data)
    try:
        ckpt = read_gguf(path)
    except ValueError as e:
        assert type(e) is ValueError, f"{type(e).__name__}: {e}"
        return
    _read_every_tensor(ckpt)


@FUZZ
@given(data=st.data())
def test_fuzz_gguf_reader(files: dict[str, Any], tmp_path: Path, data: st.DataObject) -> None:
    check_gguf(data.draw(mutated(files["gguf"], files["gguf_header_end"])), tmp_path / "fuzz.gguf")


# (offset or metadata key, bytes written there) on the tiny GGUF. Counts and lengths past the end
# had gguf-py read on until an IndexError; a key that is not UTF-8 escaped as a UnicodeDecodeError.
# The header walk names each.
GGUF_REGRESSIONS: dict[str, tuple[int | bytes, bytes]] = {
    "key not UTF-8": (32, b"\xff\xfe"),
    "tensor count 2^63": (8, struct.pack("<Q", 2**63)),
    "metadata count 2^64-1": (16, struct.pack("<Q", 2**64 - 1)),
    "first key length 2^63": (24, struct.pack("<Q", 2**63)),
    "first key length past the end": (24, struct.pack("<Q", 10**6)),
    "version 1": (4, struct.pack("<I", 1)),
    # Found by fuzzing: a head count of 0 was a ZeroDivisionError while the config was made.
    "head count 0": (b"qwen2.attention.head_count", struct.pack("<I", 0)),
}


@pytest.mark.parametrize("case", sorted(GGUF_REGRESSIONS))
def test_gguf_regressions(files: dict[str, Any], tmp_path: Path, case: str) -> None:
    where, patch = GGUF_REGRESSIONS[case]
    data = bytearray(files["gguf"])
    # An offset, or a metadata key: then its value, after the key and the value's type.
    at = where if isinstance(where, int) else data.index(where) + len(where) + 4
    data[at : at + len(patch)] = patch
    with pytest.raises(ValueError, match="fuzz.gguf is not a valid GGUF file"):
        check_gguf_strict(bytes(data), tmp_path / "fuzz.gguf")


def check_gguf_strict(data: bytes, path: Path) -> None:
    path.write_bytes(data)
    read_gguf(path)


def test_gguf_merge_of_unknown_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by fuzzing: a merge naming a token the vocabulary lacks made tokenizers raise a bare
    Exception (a traceback in the CLI)."""
    import tests.gguf_writer as gguf_writer

    monkeypatch.setattr(gguf_writer, "MERGES", [*gguf_writer.MERGES, "zz qq"])
    path = tmp_path / "merges.gguf"
    gguf_writer.write_tiny_gguf(path)
    with pytest.raises(ValueError, match="tokenizer metadata is inconsistent .*out of vocabulary"):
        read_gguf(path)


def test_gguf_tensor_claims_past_the_file(files: dict[str, Any], tmp_path: Path) -> None:
    """A tensor's offset, or its shape, claims bytes beyond the end: refused before any is read."""
    path = tmp_path / "big.gguf"
    path.write_bytes(files["gguf"])
    from gguf import GGUFReader

    last = GGUFReader(path).tensors[-1]
    data = bytearray(files["gguf"])
    name = last.name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # the last tensor's info
    n_dims = struct.unpack_from("<I", data, at)[0]
    offset_at = at + 4 + 8 * n_dims + 4
    for field_at, value in [(offset_at, 2**40), (at + 4, 2**40), (at + 4, 2**63 + 5)]:
        bad = bytearray(data)
        bad[field_at : field_at + 8] = struct.pack("<Q", value)
        with pytest.raises(ValueError, match=f"tensor {last.name} (claims bytes|has shape)"):
            check_gguf_strict(bytes(bad), path)


# -- safetensors -----------------------------------------------------------------------------------


def check_safetensors(data: bytes, folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(data)
    try:
        ckpt = read_hf_folder(folder)
    except (ValueError, FileNotFoundError) as e:
        assert type(e) in (ValueError, FileNotFoundError), f"{type(e).__name__}: {e}"
        return
    _read_every_tensor(ckpt)


@pytest.fixture
def hf_copy(files: dict[str, Any], tmp_path: Path) -> Path:
    return Path(shutil.copytree(files["hf"], tmp_path / "hf"))


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_bytes(files: dict[str, Any], hf_copy: Path, data: st.DataObject) -> None:
    raw = files["safetensors"]
    header_end = 8 + struct.unpack_from("<Q", raw)[0]
    check_safetensors(data.draw(mutated(raw, header_end)), hf_copy)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.sampled_from(EXTREMES + [-1, -(2**63)])
    | st.floats()
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _with_header(raw: bytes, header: dict[str, Any]) -> bytes:
    data_start = 8 + struct.unpack_from("<Q", raw)[0]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[data_start:]


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header_fields(files: dict[str, Any], hf_copy: Path, data: st.DataObject) -> None:
    raw = files["safetensors"]
    header = json.loads(raw[8 : 8 + struct.unpack_from("<Q", raw)[0]])
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
    if field is None:
        header[name] = data.draw(JSON_VALUES)
    elif data.draw(st.booleans()):
        header[name][field] = data.draw(JSON_VALUES)
    else:  # a list of extreme numbers where the format has [start, end] or a shape
        header[name][field] = data.draw(st.lists(st.sampled_from(EXTREMES + [-1]), max_size=5))
    check_safetensors(_with_header(raw, header), hf_copy)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"data_offsets": [0, 2**63]}, "claims bytes"),
        ({"data_offsets": [-8, 0]}, "claims bytes"),
        ({"shape": [-1, 64]}, "not a list of sizes"),
        ({"shape": [2**62, 2**62]}, "claims bytes"),
        ({"shape": [1] * 100}, "not a list of sizes"),
        ({"dtype": "I64"}, "dtype I64"),
    ],
)
def test_safetensors_regressions(
    files: dict[str, Any], hf_copy: Path, change: dict[str, Any], needle: str
) -> None:
    raw = files["safetensors"]
    header = json.loads(raw[8 : 8 + struct.unpack_from("<Q", raw)[0]])
    header["model.norm.weight"].update(change)
    (hf_copy / "model.safetensors").write_bytes(_with_header(raw, header))
    with pytest.raises(ValueError, match=f"model.safetensors has a corrupted safetensors header.*{needle}"):
        read_hf_folder(hf_copy)


@pytest.mark.parametrize("length", [0, 1, 2**63, 2**64 - 1, 10**9])
def test_safetensors_header_length_past_the_file(files: dict[str, Any], hf_copy: Path, length: int) -> None:
    raw = files["safetensors"]
    (hf_copy / "model.safetensors").write_bytes(struct.pack("<Q", length) + raw[8:])
    with pytest.raises(ValueError, match=f"not a safetensors file: its header length {length} does not fit"):
        read_hf_folder(hf_copy)


# -- the manifest ----------------------------------------------------------------------------------


def check_manifest(manifest: Any, package: Path) -> None:
    text = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    (package / MANIFEST).write_bytes(text)
    try:
        read_manifest(package, verify_hashes=True)
    except PackageError:
        return


@pytest.fixture
def package_copy(files: dict[str, Any], tmp_path: Path) -> Path:
    return Path(shutil.copytree(files["package"], tmp_path / "pkg"))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a JSON value."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_fields(files: dict[str, Any], package_copy: Path, data: st.DataObject) -> None:
    manifest = json.loads(json.dumps(files["manifest"]))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(manifest)))
        if not path:
            manifest = data.draw(JSON_VALUES)
            break
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON_VALUES)
    check_manifest(manifest, package_copy)


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_bytes(files: dict[str, Any], package_copy: Path, data: st.DataObject) -> None:
    raw = json.dumps(files["manifest"]).encode()
    check_manifest(data.draw(mutated(raw, len(raw))), package_copy)


@pytest.mark.parametrize(
    "manifest",
    [b"[]", b"null", b"1e999", b'{"format": "edge-qwen-package", "format_version": 1}', b"[" * 100_000],
    ids=["list", "null", "infinity", "no-fields", "deep"],
)
def test_manifest_regressions(package_copy: Path, manifest: bytes) -> None:
    (package_copy / MANIFEST).write_bytes(manifest)
    with pytest.raises(PackageError, match="edge_qwen.json is (corrupted|not an edge-qwen manifest)"):
        read_manifest(package_copy)
