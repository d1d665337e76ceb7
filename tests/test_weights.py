"""The weights file mapped by us: the initializers ONNX Runtime gets are views of it, and its pages go."""

from __future__ import annotations

import gc
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
from edge_qwen.model import Model
from edge_qwen.weights import DROP_EVERY, ExternalTensor, MappedWeights, external_tensors
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
    model.forward([4], cache)  # one token's are left for a while: an embedding row, the norms
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
