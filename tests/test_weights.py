"""The weights file mapped by us: the initializers ONNX Runtime gets are views of it, and its pages go."""

from __future__ import annotations

import gc
import math
import mmap
import os
import shutil
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import edge_qwen
from edge_qwen.errors import PackageError
from edge_qwen.memory import resident_fraction
from edge_qwen.model import Model
from edge_qwen.weights import (
    DROP_EVERY,
    EACH_RUN,
    NATIVE_INIT,
    PACKED,
    ROWS,
    ExternalTensor,
    MappedWeights,
    WeightsSession,
    external_tensors,
    reaching,
)
from tests.conftest import TinyModel, export_tiny, mapped_kb

needs_smaps = pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads /proc/self/smaps")


@pytest.fixture(scope="module")
def tiny_int4(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("weights") / "int4"
    return export_tiny(tiny.hf_dir, out, precision="int4", algo="rtn", lm_head="int4")


def test_the_external_initializers_are_read_as_onnx_reads_them(tiny_int4: Path) -> None:
    graph = onnx.load(str(tiny_int4 / "model.onnx"), load_external_data=False).graph
    expected = {}
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            expected[t.name] = (t.data_type, tuple(t.dims), info["location"], int(info.get("offset", 0)))
    tensors = external_tensors(tiny_int4 / "model.onnx")
    found = {t.name: (t.data_type, t.dims, t.location, t.offset) for t in tensors}
    assert found == expected
    assert {dtype for dtype, *_ in found.values()} >= {onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT}


def test_each_view_holds_the_tensor_onnx_loads(tiny_int4: Path) -> None:
    weights = MappedWeights(tiny_int4 / "model.onnx.data", external_tensors(tiny_int4 / "model.onnx"))
    model = onnx.load(str(tiny_int4 / "model.onnx"))  # with its external data
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert weights.values and set(weights.values) <= set(stored)
    for name, value in weights.values.items():
        view = value.numpy()
        assert view.dtype == stored[name].dtype and np.array_equal(view, stored[name]), name


def test_how_the_session_reads_each_initializer_is_told_from_its_nodes(tiny_int4: Path) -> None:
    graph = onnx.load(str(tiny_int4 / "model.onnx"), load_external_data=False).graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    read = {t.name: t.read for t in external_tensors(tiny_int4 / "model.onnx")}
    assert {name for name, way in read.items() if way == ROWS} == {
        "model.embed_tokens.weight_q4",
        "model.embed_tokens.weight_scales",
        "model.embed_tokens.weight_zero_points",
    }
    each_run = {name for name, way in read.items() if way == EACH_RUN}
    norms = {
        n for n in read if readers[n] & {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}
    }
    assert norms and norms <= each_run
    assert {n for n in read if "rotary" in n} <= each_run
    matmuls = [node for node in graph.node if node.op_type == "MatMulNBits"]
    weights = {node.input[1] for node in matmuls}
    only_packed = {n for n in weights if len(readers[n]) == 1}  # a tied table is read as rows too
    assert {name for name, way in read.items() if way == PACKED} == only_packed
    scales = {name for node in matmuls for name in node.input[2:4] if name}
    assert scales and all(read[n] is None for n in scales)  # kept by ONNX Runtime on x86: ours to drop


def test_tensors_read_at_every_run_are_copied_out_of_the_mapping(tiny_int4: Path) -> None:
    """Their pages would otherwise map whole large folios of the weights around them at every run."""
    tensors = external_tensors(tiny_int4 / "model.onnx")
    weights = MappedWeights(tiny_int4 / "model.onnx.data", tensors)
    start, end = weights._address, weights._address + weights.size
    for t in tensors:
        if t.read == PACKED:
            assert t.name not in weights.values  # ONNX Runtime maps, packs and unmaps it itself
            continue
        inside = start <= weights.values[t.name].data_ptr() < end
        assert inside == (t.read != EACH_RUN), t.name


def test_a_tensor_past_the_end_of_the_file_is_a_package_error(tmp_path: Path) -> None:
    (tmp_path / "model.onnx.data").write_bytes(b"\0" * 64)
    beyond = ExternalTensor("w", 1, (32,), "model.onnx.data", offset=0, length=128)
    with pytest.raises(PackageError, match="w ends at byte 128, past the file's 64 bytes"):
        MappedWeights(tmp_path / "model.onnx.data", [beyond])


def test_a_tensor_of_the_wrong_length_is_a_package_error(tmp_path: Path) -> None:
    (tmp_path / "model.onnx.data").write_bytes(b"\0" * 64)
    short = ExternalTensor("w", 1, (4, 4), "model.onnx.data", offset=0, length=60)
    with pytest.raises(PackageError, match=r"w is 60 bytes, not the \(4, 4\) float32 model.onnx says"):
        MappedWeights(tmp_path / "model.onnx.data", [short])


def test_an_empty_weights_file_is_a_package_error(tmp_path: Path) -> None:
    (tmp_path / "model.onnx.data").write_bytes(b"")
    with pytest.raises(PackageError, match="cannot map the weights"):
        MappedWeights(tmp_path / "model.onnx.data", [])


def test_a_model_that_is_not_onnx_is_a_package_error(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\xff\xff\xff not protobuf")
    with pytest.raises(PackageError, match="not an ONNX model"):
        external_tensors(tmp_path / "model.onnx")


@needs_smaps
def test_loading_maps_the_file_once_and_leaves_none_of_it_resident(tiny_int4: Path) -> None:
    model = edge_qwen.load(tiny_int4)
    data = tiny_int4 / "model.onnx.data"
    assert model.session.weights is not None  # type: ignore[attr-defined]
    assert mapped_kb(data, "Size:") == -(-data.stat().st_size // 4096) * 4  # one mapping, whole file
    assert mapped_kb(data, "Rss:") == 0
    cache = model.new_cache(32)
    model.forward(list(range(1, DROP_EVERY + 1)), cache)  # a prompt's pages are dropped after it
    assert mapped_kb(data, "Rss:") == 0
    model.forward([4], cache)  # one token's are left for a while: its embedding row
    assert mapped_kb(data, "Rss:") > 0


@needs_smaps
def test_pages_read_by_lookups_are_dropped_every_few_tokens(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1024
    (tmp_path / "model.onnx.data").write_bytes(data)
    table = ExternalTensor("table", 2, (len(data),), "model.onnx.data", 0, len(data))
    weights = MappedWeights(tmp_path / "model.onnx.data", [table])
    view = weights.values["table"].numpy()
    assert view.tobytes() == data
    weights.ran(DROP_EVERY - 1)
    assert mapped_kb(tmp_path / "model.onnx.data", "Rss:") > 0
    weights.ran(1)
    assert mapped_kb(tmp_path / "model.onnx.data", "Rss:") == 0
    assert view.tobytes() == data  # back from the file, unchanged


@needs_smaps
def test_pages_are_dropped_while_the_session_is_built(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1024
    path = tmp_path / "model.onnx.data"
    path.write_bytes(data)
    weights = MappedWeights(path, [ExternalTensor("table", 2, (len(data),), path.name, 0, len(data))])
    view = weights.values["table"].numpy()
    with weights.dropping(interval=0.005):
        assert view.tobytes() == data
        deadline = time.monotonic() + 10  # a loaded machine may be slow to schedule the dropping thread
        while mapped_kb(path, "Rss:") > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert mapped_kb(path, "Rss:") == 0
        assert view.tobytes() == data
    assert mapped_kb(path, "Rss:") == 0  # and once more on the way out


def test_the_session_keeps_the_mapping_alive(tiny_int4: Path) -> None:
    """ONNX Runtime holds raw pointers into the mapping: it must live as long as the session."""
    model = edge_qwen.load(tiny_int4)
    expected = model.forward([1, 2, 3], model.new_cache(8))
    session, manifest = model.session, model.manifest
    alive = weakref.ref(session.weights)  # type: ignore[attr-defined]
    del model
    gc.collect()
    assert alive() is not None
    again = Model(tiny_int4, manifest, session)  # the session alone, the first Model gone
    np.testing.assert_array_equal(again.forward([1, 2, 3], again.new_cache(8)), expected)
    del again, session
    gc.collect()
    assert alive() is None


@needs_smaps
@pytest.mark.skipif(
    "AzureExecutionProvider" not in ort.get_available_providers(), reason="needs a second provider to ask for"
)
def test_with_another_provider_onnx_runtime_maps_the_file_and_its_pages_are_dropped(tiny_int4: Path) -> None:
    """Providers that compile their nodes read the file themselves: left to ONNX Runtime, as before."""
    model = edge_qwen.load(tiny_int4, provider="AzureExecutionProvider")  # takes no node: all on the CPU
    assert model.providers == ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert model.session.weights is None  # type: ignore[attr-defined]
    data = tiny_int4 / "model.onnx.data"
    assert mapped_kb(data, "Size:") > 0 and mapped_kb(data, "Rss:") == 0  # ORT's mappings, released
    assert np.isfinite(model.forward([1, 2, 3], model.new_cache(8))).all()


def _written_and_cached(path: Path, size: int) -> None:
    path.write_bytes(os.urandom(size))
    assert path.read_bytes()  # in the page cache, as after an export or a copy


def _table(path: Path, offset: int, length: int) -> ExternalTensor:
    return ExternalTensor("table", 2, (length,), path.name, offset, length, read=ROWS)


@needs_smaps
def test_a_densely_cached_row_table_is_evicted_and_read_without_readahead(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx.data"
    _written_and_cached(path, 8 << 20)
    probe = MappedWeights(path, [])
    if resident_fraction(probe._address, probe.size) < 0.9:
        pytest.skip("this file system does not keep what was just read in the page cache")
    weights = MappedWeights(path, [_table(path, 4 << 20, 4 << 20)])
    table = weights._address + (4 << 20)
    assert resident_fraction(table, 4 << 20) == 1.0
    assert weights.sparse_rows() >= 4 << 20
    if resident_fraction(table, 4 << 20) > 0.1:
        pytest.skip("this file system keeps its pages cached (tmpfs?)")
    assert weights.values["table"].numpy()[123_456] == path.read_bytes()[(4 << 20) + 123_456]
    assert mapped_kb(path, "Rss:") <= 16  # the row read, not the 64 KB or 2 MiB around it
    flags = [line for line in Path("/proc/self/smaps").read_text().splitlines() if line.startswith("VmFlags")]
    assert any(" rr" in line for line in flags)  # MADV_RANDOM: no readahead


def test_a_sparsely_cached_row_table_keeps_its_cached_rows(tmp_path: Path) -> None:
    """Rows read one page at a time by earlier runs are left where they are, for the next run."""
    path = tmp_path / "model.onnx.data"
    _written_and_cached(path, 4 << 20)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        f.seek(1 << 20)
        f.read(mmap.PAGESIZE)
    weights = MappedWeights(path, [_table(path, 0, 4 << 20)])
    if resident_fraction(weights._address, 4 << 20) > 0.25:
        pytest.skip("this file system keeps its pages cached (tmpfs?)")
    assert weights.sparse_rows() == 0
    assert resident_fraction(weights._address + (1 << 20), mmap.PAGESIZE) == 1.0


@needs_smaps
@pytest.mark.slow
def test_a_prompt_of_the_real_model_maps_one_page_a_row() -> None:
    """The real 0.5B's embedding table, cached as after an export (large folios, read ahead): a
    64-token chunk of random ids made tens of MB of the file resident before sparse_rows."""
    from tests import real_model

    package = real_model.exported("q05-fp32", "--precision", "fp32")
    data = package / "model.onnx.data"
    (table,) = [t for t in external_tensors(package / "model.onnx") if t.read == ROWS]
    with open(data, "rb") as f:  # what `cp` or the exporter leaves in the page cache
        f.seek(table.offset)
        while f.tell() < table.offset + table.length and f.read(8 << 20):
            pass
    model = edge_qwen.load(package)
    weights = model.session.weights  # type: ignore[attr-defined]
    assert resident_fraction(weights._address + table.offset, table.length) < 0.05
    weights.ran = lambda tokens: None  # keep what the prompt maps
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 64)
    model.forward(ids, model.new_cache(64))
    assert mapped_kb(data, "Rss:") < 2048  # 64 rows of 3.5 KB; 64 KB to 2 MiB a row before


def _root_of_two() -> float:
    return math.sqrt(2.0)


def test_reaching_tells_when_a_line_calling_the_name_is_about_to_run() -> None:
    reached = threading.Event()
    before = sys.gettrace()
    with reaching("sqrt", reached):
        len("not it")
        assert not reached.is_set()
        _root_of_two()
        assert reached.is_set()  # at the line, not at the block's end
    assert sys.gettrace() is before


def test_reaching_leaves_the_event_alone_when_the_name_is_never_called() -> None:
    reached = threading.Event()
    with pytest.raises(RuntimeError), reaching("sqrt", reached):
        raise RuntimeError("the build failed before")
    assert not reached.is_set()


def test_onnx_runtime_initializes_a_session_in_the_call_load_waits_for(tiny_int4: Path) -> None:
    reached = threading.Event()
    with reaching(NATIVE_INIT, reached):
        ort.InferenceSession(str(tiny_int4 / "model.onnx"), providers=["CPUExecutionProvider"])
    assert reached.is_set()  # renamed, load() would parse the tokenizer after the build, not beside


def test_a_failed_build_still_lets_the_loader_go_on(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    native = threading.Event()
    with pytest.raises(Exception):  # noqa: B017 - ONNX Runtime's own exception types
        WeightsSession(tmp_path / "model.onnx", ort.SessionOptions(), ["CPUExecutionProvider"], None, native)
    assert native.is_set()


def test_a_graph_onnx_runtime_rejects_is_a_clear_error(tiny_int4: Path, tmp_path: Path) -> None:
    pkg = Path(shutil.copytree(tiny_int4, tmp_path / "pkg"))
    graph = pkg / "model.onnx"
    graph.write_bytes(graph.read_bytes().replace(b"GroupQueryAttention", b"GroupQueryAttentioX"))
    failed: list[BaseException] = []

    def load() -> None:
        try:
            edge_qwen.load(pkg)
        except PackageError as e:
            failed.append(e)

    loading = threading.Thread(target=load, daemon=True)
    loading.start()
    loading.join(timeout=120)
    assert not loading.is_alive(), "load() hung on a graph ONNX Runtime could not build"
    assert failed and "ONNX Runtime could not load model.onnx" in str(failed[0])
