"""A small ONNX graph builder: nodes, constants made once, weights streamed to external data.

Weights never sit in the protobuf: each initializer's bytes go straight to `model.onnx.data` at a
4 KiB-aligned offset (so ONNX Runtime can mmap them), and the TensorProto only points at them. This
keeps a 2.5 GB fp32 export within protobuf's 2 GB limit and its memory use to one tensor at a time.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 4096
OPSET = 21
MS_DOMAIN = "com.microsoft"


class Graph:
    """Accumulates nodes and initializers; `to_model()` returns the ModelProto (weights external)."""

    def __init__(self, data_file: BinaryIO, data_name: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._data = data_file
        self._data_name = data_name
        self._constants: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self._names: set[str] = set()

    def input(self, name: str, elem_type: int, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list[int | str]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def node(
        self,
        op: str,
        inputs: list[str],
        name: str,
        outputs: int | list[str] = 1,
        domain: str = "",
        **attrs: object,
    ) -> list[str]:
        """Add a node named `name`; its outputs are `name/output_i` unless given."""
        if name in self._names:
            raise ValueError(f"duplicate node name {name}")
        self._names.add(name)
        outs = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def op(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs: object) -> str:
        """A single-output node; returns its output name."""
        return self.node(op, inputs, name, 1, domain, **attrs)[0]

    def weight(self, name: str, array: np.ndarray) -> str:
        """Stream `array` into the external data file and register an initializer pointing at it."""
        array = np.ascontiguousarray(array)
        offset = self._data.tell()
        pad = (-offset) % ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            offset += pad
        self._data.write(array.data)  # the array's own bytes, not a copy
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self._data_name),
            ("offset", str(offset)),
            ("length", str(array.nbytes)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def alias(self, name: str, existing: str, like: np.ndarray, start: int = 0) -> str:
        """A second initializer over bytes of `existing` from `start`, with the shape and dtype of `like`.

        A tied embedding and lm_head share one quantized matrix this way: stored once on disk, and
        each lm_head part sees its rows of it.
        """
        source = next(t for t in self.initializers if t.name == existing)
        location = {e.key: e.value for e in source.external_data}
        if start < 0 or start + like.nbytes > int(location["length"]):
            raise ValueError(
                f"alias {name}: bytes [{start}, {start + like.nbytes}) are not within "
                f"{existing}'s {location['length']}"
            )
        location["offset"] = str(int(location["offset"]) + start)
        location["length"] = str(like.nbytes)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(like.dtype)
        tensor.dims.extend(like.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key in ("location", "offset", "length"):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, location[key]
        self.initializers.append(tensor)
        return name

    def overridable(self, name: str, default: np.ndarray) -> str:
        """A small initializer that is also a graph input: a run may feed another value."""
        self.initializers.append(onnx.numpy_helper.from_array(default, name))
        return self.input(name, helper.np_dtype_to_tensor_dtype(default.dtype), list(default.shape))

    def constant(self, values: list[int] | list[float] | np.ndarray, dtype: type = np.int64) -> str:
        """A small inline initializer, made once per distinct value (like onnxruntime-genai's builder)."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._constants:
            head = "_".join(map(str, array.ravel()[:4]))
            name = f"/constants/{array.dtype.name}/{head}/{len(self._constants)}"
            self.initializers.append(onnx.numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def to_model(self, graph_name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edge-qwen")
        model.ir_version = 10
        return model


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    """How many nodes of each op type a model has (for `edge-qwen info`)."""
    return Counter(n.op_type for n in model.graph.node)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write the graph only; the weights are already in the external data file."""
    path.write_bytes(model.SerializeToString())
