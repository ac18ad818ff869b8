"""A model's graph as a protobuf without its weights, and those weights as byte arrays, never copied.

Serializing an IR model copies every weight into the protobuf (and a model over 2 GB cannot be serialized
at all), and handing ONNX Runtime a model whose weights live in the input's external data file used to
mean writing a full copy of it beside a temporary model file. Instead, each large initializer, and every
one still read from a file, is written into the protobuf as external data in a file of its own name that
exists only in memory: the tensor's bytes (a view of its numpy array, or of a read-only memory map of the
input's data file) are that file's content, given to ONNX Runtime with
`SessionOptions.add_external_initializers_from_files_in_memory` and used in place
(`session.use_external_initializer_file_buffers_directly`; `add_external_initializers` would copy them).
Once that table of in-memory files exists, ONNX Runtime reads no external data from disk, which is why
every file-backed tensor goes through it. The same weightless protobuf serves the ONNX checker and shape
inference.
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


@dataclasses.dataclass
class DetachedModel:
    """`proto` refers to each array in `weights` (raw bytes, uint8) as the whole external file of its key."""

    proto: onnx.ModelProto
    weights: dict[str, np.ndarray]


def _detachable(tensor: ir.TensorProtocol | None, min_bytes: int) -> bool:
    """Tensors read from a file, and in-memory ones of at least `min_bytes`; never strings."""
    return (tensor is not None and tensor.dtype != ir.DataType.STRING
            and (isinstance(tensor, ir.ExternalTensor) or tensor.nbytes >= min_bytes))


def _raw_bytes(tensor: ir.TensorProtocol) -> np.ndarray:
    """The tensor's bytes as ONNX stores them, as uint8: a view of its array (in memory or memory-mapped) where
    elements are whole bytes, a copy for 4-bit and 2-bit types (stored packed, two or four to a byte)."""
    if tensor.dtype.bitwidth % 8 == 0:
        array = tensor.numpy()
        if array.flags.c_contiguous:
            return array.reshape(-1).view(np.uint8)
    return np.frombuffer(tensor.tobytes(), np.uint8)


@contextlib.contextmanager
def _placeholders(model: ir.Model, min_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    """Swap each detachable initializer for a placeholder while the block runs; yields {file name: bytes}."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    files: dict[str, np.ndarray] = {}
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if not _detachable(tensor, min_bytes) or value.name is None:
                continue
            location = f"{PLACEHOLDER_LOCATION}{len(files)}"
            files[location] = _raw_bytes(tensor)
            swapped.append((value, tensor))
            value.const_value = ir.ExternalTensor(location, offset=0, length=files[location].nbytes,
                                                  dtype=tensor.dtype, shape=ir.Shape(tensor.shape),
                                                  name=value.name, base_dir="")
        yield files
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def detach_weights(model: ir.Model, min_bytes: int = MIN_DETACHED_BYTES) -> DetachedModel:
    """The model's protobuf with its file-backed and large initializers detached (see the module doc)."""
    with _placeholders(model, min_bytes) as files:
        proto = ir.serde.serialize_model(model)
    return DetachedModel(proto, files)


def is_placeholder(location: str) -> bool:
    """Whether an external-data location names a detached array rather than a file on disk."""
    return location.startswith(PLACEHOLDER_LOCATION)
