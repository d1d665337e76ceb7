"""The package's weights file, mapped by us and handed to ONNX Runtime as views, so its pages can be dropped.

Left to itself, ONNX Runtime maps each external initializer of model.onnx.data, packs the MatMulNBits
weights into buffers of its own, and keeps what it did not pack mapped: on x86 the int8-compute path
copies the scales into the packed buffer but reports them as not packed, so they stay resident, unused
(~54 MB for the 0.5B at block 32, all of them at once by the end of the build). The process's peak
size is reached there.

Here the file is mapped once, read-only, and the external initializers are given to the session as
views of that mapping (`SessionOptions.add_initializer`: ONNX Runtime uses the memory, it does not copy
it). A mapping of our own can be dropped at any moment without losing data: its pages were only ever
read, so the kernel forgets them and brings them back from the file (usually still in the page cache)
should anything read them again. `drop_pages` does so; `MappedWeights.dropping` does it every few
milliseconds while the session is built, so the scales being packed never pile up.

The quantized weights themselves (PACKED: MatMulNBits' input B, 65% of the default 0.5B's file) are the
exception: ONNX Runtime maps each, packs it and unmaps it, all in its own thread. Our dropping thread
runs Python, so it needs the GIL, which the tokenizer's parse holds for ~0.3 s while the session builds
beside it (model.load): through our mapping, the weights read in that time piled up (peak +44 to +113
MB in 3 of 4 runs); left to ONNX Runtime, they do not (docs/memory.md, "Load time").

After loading, each run still reads some tensors as stored. A read maps more than its page: the
kernel maps the neighbouring pages already in the page cache too ("fault-around", 64 KB), and, since
Linux 6.18, a whole large folio, which a file just written, copied or read ahead is cached in (up to
2 MiB). So a norm's 3.5 KB mapped up to 2 MiB of the weights around it, and one decode step of the
0.5B made ~76 MB of the file resident (docs/memory.md). Two kinds of tensors are read so:

- those read whole at every run (EACH_RUN: the norms' weights, biases, the rotary caches; ~1.3 MB for
  the 0.5B) are copied into memory of their own at load;
- the row tables (ROWS: the embedding table, its scales and zero points), read a row per token, stay
  mapped. `sparse_rows`, once the session is built, advises them MADV_RANDOM (a row missing from the
  page cache is read alone, one page, no readahead) and, when most of a table is cached, flushes and
  evicts it from the page cache, so that each row comes back from disk once and maps its own page
  (a 64-token chunk of random ids: 81 MB of the file at once before, ~1 MB after). Only tables nothing
  else reads are treated so: a tied lm_head packs the whole table at every load, and evicting it would
  make every load read it from disk again.

`ran` still drops the mapping's pages after each prompt chunk and every DROP_EVERY decoded tokens,
so rows do not pile up. Dropping while a prompt runs, too, took 3% off prefill (281.8 vs 290.5
tok/s, 8 interleaved 128-token prompts) for ~6 MB less peak: not done.

The mapping must outlive the session: `WeightsSession` holds it.
"""

from __future__ import annotations

import linecache
import mmap
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_qwen.errors import PackageError
from edge_qwen.memory import HUGE_PAGE, drop_pages, resident_fraction

# ONNX TensorProto.DataType -> numpy; an initializer of another type is left to ONNX Runtime.
NUMPY_TYPES = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}
EXTERNAL = 1  # TensorProto.DataLocation
DROP_INTERVAL = 0.01  # seconds between drops while the session is built
DROP_EVERY = 16  # tokens between drops afterwards; a drop takes ~2-20 us, a decode step ~13 ms
# How the session reads an initializer after loading, where external_tensors can tell from its nodes:
ROWS = "rows"  # a row per token: a Gather's table (and GatherBlockQuantized's scales and zero points)
EACH_RUN = "each run"  # whole, at every run, unpacked: norms' weights, biases, the rotary caches
PACKED = "packed"  # once, at load, into a buffer of ONNX Runtime's, which then lets the stored bytes go
ROW_INPUTS = {  # op type -> the inputs it reads one row per index of (not the indices themselves)
    "Gather": (0,),
    "GatherBlockQuantized": (0, 2, 3),  # data, scales, zero points
}
EACH_RUN_INPUTS = frozenset(  # (op_type, input index) that ONNX Runtime reads at every run as stored
    {
        ("SimplifiedLayerNormalization", 1),
        ("SkipSimplifiedLayerNormalization", 2),
        ("MatMulNBits", 5),  # the bias; its weights, scales and zero points are packed at load
        ("GroupQueryAttention", 7),  # cos_cache
        ("GroupQueryAttention", 8),  # sin_cache
        ("Add", 0),
        ("Add", 1),
    }
)
PACKED_INPUTS = frozenset({("MatMulNBits", 1)})  # the quantized weights; not their scales (see above)
DENSE = 0.25  # share of a row table in the page cache above which sparse_rows evicts it
COPY_LIMIT = 4 << 20  # EACH_RUN tensors up to this size are copied out of the mapping (see MappedWeights)


@dataclass(frozen=True)
class ExternalTensor:
    """An initializer whose bytes are in an external file."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    location: str
    offset: int
    length: int
    read: str | None = None  # ROWS, EACH_RUN or PACKED; None when read otherwise or more than one way


class MappedWeights:
    """`path` mapped read-only, with a view of it for each of `tensors` stored there."""

    def __init__(self, path: Path, tensors: Sequence[ExternalTensor]) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # read-only, any OS
        except (OSError, ValueError) as e:  # missing, unreadable, empty
            raise PackageError(f"{path}: cannot map the weights ({e}): re-export the package") from e
        data = np.frombuffer(self._map, np.uint8)
        self._address, self.size = data.ctypes.data, data.size
        self.values: dict[str, ort.OrtValue] = {}
        self._tokens = 0  # run since the last drop
        self._row_tables: list[tuple[int, int]] = []  # (start, end) byte ranges, start page-aligned
        for t in tensors:
            if t.location != path.name or t.data_type not in NUMPY_TYPES or t.read == PACKED:
                continue  # ONNX Runtime reads it itself
            if t.offset + t.length > self.size:
                raise PackageError(
                    f"{path}: {t.name} ends at byte {t.offset + t.length}, past the file's {self.size} "
                    "bytes (a truncated download or copy?): re-export or copy the package again"
                )
            dtype = np.dtype(NUMPY_TYPES[t.data_type])
            if t.length != int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize:
                raise PackageError(
                    f"{path}: {t.name} is {t.length} bytes, not the {t.dims} {dtype} model.onnx says: "
                    "re-export the package"
                )
            view = data[t.offset : t.offset + t.length].view(dtype).reshape(t.dims)
            if t.read == EACH_RUN and t.length <= COPY_LIMIT:
                view = view.copy()  # read at every run: the module docstring says why it is copied
            elif t.read == ROWS:
                self._row_tables.append((t.offset // mmap.PAGESIZE * mmap.PAGESIZE, t.offset + t.length))
            self.values[t.name] = ort.OrtValue.ortvalue_from_numpy(view)  # used as is, not copied

    def add_to(self, options: ort.SessionOptions) -> None:
        for name, value in self.values.items():
            options.add_initializer(name, value)

    def drop_pages(self) -> None:
        drop_pages(self._address, self.size)

    def ran(self, tokens: int) -> None:
        """After a session run of `tokens` tokens: drop what reads of the file left resident, once
        DROP_EVERY tokens have run since the last drop (after every prompt chunk, so)."""
        self._tokens += tokens
        if self._tokens >= DROP_EVERY:
            self.drop_pages()
            self._tokens = 0

    def sparse_rows(self) -> int:
        """Make each row read of the row tables map its own page (the module docstring says why): no
        readahead on them, and their page cache emptied where it is dense. Returns the bytes evicted
        (those of pages another process maps, or not yet written back, stay)."""
        advise = getattr(mmap, "MADV_RANDOM", None)
        fadvise = getattr(os, "posix_fadvise", None)  # Linux; elsewhere rows map as the system likes
        dense = []
        for start, end in self._row_tables:
            if advise is not None:
                self._map.madvise(advise, start, end - start)
            if fadvise is not None and resident_fraction(self._address + start, end - start) > DENSE:
                # Whole folios only are evicted: widen to the largest a kernel caches (its neighbours
                # are packed weights, read again only by the next load).
                dense.append(
                    (start // HUGE_PAGE * HUGE_PAGE, min(self.size, -(-end // HUGE_PAGE) * HUGE_PAGE))
                )
        if not dense or fadvise is None:
            return 0
        try:
            with open(self.path, "rb") as f:
                os.fdatasync(f.fileno())  # a just-written file's dirty pages cannot be evicted
                for start, end in dense:
                    drop_pages(self._address + start, end - start)  # ours first: mapped pages stay
                    fadvise(f.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            return 0  # a file system without them: rows map as before
        return sum(end - start for start, end in dense)

    @contextmanager
    def dropping(self, interval: float = DROP_INTERVAL) -> Iterator[None]:
        """Drop the mapping's pages every `interval` seconds while the block runs, and once after."""
        stop = threading.Event()

        def drop_until_stopped() -> None:
            while not stop.wait(interval):
                self.drop_pages()

        worker = threading.Thread(target=drop_until_stopped, name="edge-qwen-drop", daemon=True)
        worker.start()
        try:
            yield
        finally:
            stop.set()
            worker.join()
            self.drop_pages()


class WeightsSession(ort.InferenceSession):
    """An InferenceSession whose external initializers are views of `weights`, which it keeps alive
    (ONNX Runtime keeps only raw pointers to them); with None, ONNX Runtime reads the file itself.

    `native`, if given, is set once the build is about to enter ONNX Runtime's C++ initialization,
    which lets go of the GIL (or once the build is over, should that never be seen): another thread
    can then hold the GIL for long without holding the build up. Before that point the build runs
    Python (checks, reading model.onnx) and waits for the GIL at every step.
    """

    def __init__(
        self,
        model: Path,
        options: ort.SessionOptions,
        providers: Sequence[Any],
        weights: MappedWeights | None,
        native: threading.Event | None = None,
    ) -> None:
        try:
            with reaching(NATIVE_INIT, native) if native is not None else nullcontext():
                self.weights = weights
                if weights is not None:
                    weights.add_to(options)
                super().__init__(str(model), options, providers=providers)
        finally:
            if native is not None:
                native.set()  # built or failed: whoever waits for the build to go native goes on


# The C++ method onnxruntime's InferenceSession calls from Python to initialize (graph transforms,
# packing the weights) without the GIL: onnxruntime_pybind_state.cc.
NATIVE_INIT = "initialize_session"


@contextmanager
def reaching(name: str, reached: threading.Event) -> Iterator[None]:
    """Set `reached` when this thread, inside the block, is about to run a line of Python that calls
    `name`: sys.settrace's line events, in the functions whose code names it, their source read by
    linecache (a package installed without its .py files is never seen to call it). The thread's
    tracer is restored after the block. sys.setprofile's "c_call" would be exact, but Python 3.12.1 reports no
    call of a bound pybind11 method, where line events work from 3.11 to 3.13 (checked)."""
    call = name + "("

    def in_line(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and call in linecache.getline(frame.f_code.co_filename, frame.f_lineno):
            reached.set()
        return None if reached.is_set() else in_line

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return in_line if not reached.is_set() and name in frame.f_code.co_names else None

    before = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(before)


def external_tensors(model_onnx: Path) -> list[ExternalTensor]:
    """The initializers of `model_onnx` stored in external files, read without the onnx package.

    Only the fields needed are declared (protobuf skips the others): importing onnx would cost the
    runtime ~50 ms and ~11 MB at every load. `read` says how the session reads each, where known.
    """
    model = _model_class()()
    try:
        model.ParseFromString(model_onnx.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise PackageError(f"{model_onnx}: not an ONNX model ({e}): re-export the package") from e
    reads = _how_read(model.graph.node)
    found = []
    for t in model.graph.initializer:
        if t.data_location != EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in t.external_data}
        try:
            found.append(
                ExternalTensor(
                    t.name,
                    t.data_type,
                    tuple(t.dims),
                    info["location"],
                    int(info.get("offset", 0)),
                    int(info["length"]),
                    read=reads.get(t.name),
                )
            )
        except (KeyError, ValueError) as e:
            raise PackageError(f"{model_onnx}: {t.name}'s external data is malformed ({e})") from e
    return found


def _how_read(nodes: Any) -> dict[str, str | None]:
    """ROWS, EACH_RUN or PACKED for each node input read only that way; None for the others (scales
    and zero points packed at load, a Cast ONNX Runtime folds, inputs read in more than one way)."""
    ways: dict[str, set[str | None]] = {}
    for node in nodes:
        for i, name in enumerate(node.input):
            if i in ROW_INPUTS.get(node.op_type, ()):
                way: str | None = ROWS
            elif (node.op_type, i) in EACH_RUN_INPUTS:
                way = EACH_RUN
            elif (node.op_type, i) in PACKED_INPUTS:
                way = PACKED
            else:
                way = None
            ways.setdefault(name, set()).add(way)
    return {name: next(iter(w)) if len(w) == 1 else None for name, w in ways.items()}


_MODEL_CLASS: Any = None


def _model_class() -> Any:
    """A protobuf class for the part of onnx.proto's ModelProto that names the external initializers
    and the nodes that read them."""
    global _MODEL_CLASS
    if _MODEL_CLASS is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        f = descriptor_pb2.FieldDescriptorProto
        proto = descriptor_pb2.FileDescriptorProto(name="edge_qwen_onnx.proto", package="edge_qwen_onnx")
        # (message, [(field, number, type, repeated, message type)]), numbered as in onnx.proto
        for message, fields in (
            ("Entry", [("key", 1, f.TYPE_STRING, False, ""), ("value", 2, f.TYPE_STRING, False, "")]),
            (
                "Tensor",
                [
                    ("dims", 1, f.TYPE_INT64, True, ""),
                    ("data_type", 2, f.TYPE_INT32, False, ""),
                    ("name", 8, f.TYPE_STRING, False, ""),
                    ("external_data", 13, f.TYPE_MESSAGE, True, ".edge_qwen_onnx.Entry"),
                    ("data_location", 14, f.TYPE_INT32, False, ""),
                ],
            ),
            ("Node", [("input", 1, f.TYPE_STRING, True, ""), ("op_type", 4, f.TYPE_STRING, False, "")]),
            (
                "Graph",
                [
                    ("node", 1, f.TYPE_MESSAGE, True, ".edge_qwen_onnx.Node"),
                    ("initializer", 5, f.TYPE_MESSAGE, True, ".edge_qwen_onnx.Tensor"),
                ],
            ),
            ("Model", [("graph", 7, f.TYPE_MESSAGE, False, ".edge_qwen_onnx.Graph")]),
        ):
            m = proto.message_type.add(name=message)
            for name, number, kind, repeated, type_name in fields:
                label = f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL
                field = m.field.add(name=name, number=number, type=kind, label=label)
                if type_name:
                    field.type_name = type_name
        pool = descriptor_pool.DescriptorPool()
        pool.Add(proto)
        _MODEL_CLASS = message_factory.GetMessageClass(pool.FindMessageTypeByName("edge_qwen_onnx.Model"))
    return _MODEL_CLASS
