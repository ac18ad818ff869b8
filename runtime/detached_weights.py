"""A model's graph as a protobuf without its large weights, and those weights as arrays, never copied.

Serializing an IR model copies every weight into the protobuf (and a model over 2 GB cannot be serialized
at all), and handing ONNX Runtime a model whose weights live in the input's external data file used to
mean writing a full copy of it beside a temporary model file. Instead, each large initializer is written
into the protobuf as external data in a file of its own name that exists only in memory: its array (a numpy
array, or a read-only memory map of the input's data file) is that file's content, given to ONNX Runtime with
`SessionOptions.add_external_initializers_from_files_in_memory` and used in place
(`session.use_external_initializer_file_buffers_directly`; `add_external_initializers` would copy it). The
same weightless protobuf serves the ONNX checker and shape inference.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import numpy as np
import onnx
import onnx_ir as ir

PLACEHOLDER_LOCATION = "__modelsurgeon_detached__"
MIN_DETACHED_BYTES = 64 * 1024

# Element types whose numpy array has ONNX Runtime's own memory layout (4-bit and bfloat16 tensors do not).
_NATIVE = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8, ir.DataType.UINT8,
           ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64,
           ir.DataType.UINT64, ir.DataType.BOOL}


@dataclasses.dataclass
class DetachedModel:
    """`proto` refers to each array in `weights` as the whole of the external file named by its key.

    `base_dir` is the folder that the external tensors left in `proto` (types without a native layout) are
    read from, or None when there are none."""

    proto: onnx.ModelProto
    weights: dict[str, np.ndarray]
    base_dir: str | None


def _detachable(tensor: ir.TensorProtocol | None, min_bytes: int) -> bool:
    return (tensor is not None and tensor.dtype in _NATIVE and tensor.nbytes >= min_bytes
            and not isinstance(tensor, ir.StringTensor))


@contextlib.contextmanager
def _placeholders(model: ir.Model, min_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    """Swap each large initializer for a placeholder while the block runs; yields {file name: array}."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    arrays: dict[str, np.ndarray] = {}
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if not _detachable(tensor, min_bytes) or value.name is None:
                continue
            array = tensor.numpy()  # in-memory: the array itself; external: a read-only memory map
            if not array.flags.c_contiguous:
                array = np.ascontiguousarray(array)
            location = f"{PLACEHOLDER_LOCATION}{len(arrays)}"
            arrays[location] = array
            swapped.append((value, tensor))
            value.const_value = ir.ExternalTensor(location, offset=0, length=tensor.nbytes,
                                                  dtype=tensor.dtype, shape=ir.Shape(tensor.shape),
                                                  name=value.name, base_dir="")
        yield arrays
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def detach_weights(model: ir.Model, min_bytes: int = MIN_DETACHED_BYTES) -> DetachedModel:
    """The model's protobuf with every initializer of at least `min_bytes` detached (see the module doc)."""
    with _placeholders(model, min_bytes) as arrays:
        proto = ir.serde.serialize_model(model)
    base_dirs = {str(v.const_value.base_dir) for v in model.graph.initializers.values()
                 if isinstance(v.const_value, ir.ExternalTensor)}
    return DetachedModel(proto, arrays, next(iter(base_dirs)) if len(base_dirs) == 1 else None)


def is_placeholder(location: str) -> bool:
    """Whether an external-data location names a detached array rather than a file on disk."""
    return location.startswith(PLACEHOLDER_LOCATION)
