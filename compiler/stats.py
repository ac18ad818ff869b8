"""Model statistics for reports and `inspect`: nodes, parameters, bytes, estimated MACs, op histogram.

MACs are counted for MatMul, Gemm, Conv, ConvTranspose and the weight-compressed matmuls
(MatMulNBits, SparseQuantMatMul) from shapes observed in one ONNX Runtime run on a single sample, so
symbolic dimensions and custom ops are handled alike.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import onnx_ir as ir

from modelsurgeon.runtime.detached_weights import detach_weights

MAC_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulNBits", "SparseQuantMatMul", "FusedMatMul", "QLinearMatMul",
           "MatMulInteger", "ConvInteger", "QLinearConv"}


def count_parameters(model: ir.Model) -> int:
    """Number of elements in initializers and Constant nodes' tensors."""
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += int(np.prod(value.const_value.shape, dtype=np.int64))
    for node in model.graph.all_nodes():
        if node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
            total += int(np.prod(node.attributes["value"].value.shape, dtype=np.int64))
    return total


def tensor_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    for node in model.graph.all_nodes():
        if node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
            total += node.attributes["value"].value.nbytes
    return total


def file_bytes(model: ir.Model) -> int:
    """Bytes the model takes on disk: tensor data plus the serialized graph without it."""
    proto = detach_weights(model).proto
    for init in proto.graph.initializer:
        init.ClearField("raw_data")
        del init.external_data[:]
        for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            init.ClearField(f)
    return tensor_bytes(model) + proto.ByteSize()


def op_histogram(model: ir.Model) -> dict[str, int]:
    hist = collections.Counter((f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
                               for n in model.graph.all_nodes())
    return dict(hist.most_common())


def _shape(value: ir.Value | None, observed: dict[str, tuple]) -> tuple | None:
    if value is None:
        return None
    if value.const_value is not None:
        return tuple(value.const_value.shape)
    if value.name in observed:
        return observed[value.name]
    if value.shape is not None and all(isinstance(d, int) for d in value.shape):
        return tuple(value.shape)
    return None


def node_macs(node: ir.Node, observed: dict[str, tuple]) -> int | None:
    """Multiply-accumulates of one node, or None when its shapes are unknown."""
    out = _shape(node.outputs[0], observed) if node.outputs else None
    if out is None:
        return None
    n_out = int(np.prod(out, dtype=np.int64))
    op = node.op_type
    if op in ("MatMul", "FusedMatMul", "MatMulInteger", "QLinearMatMul"):
        a = _shape(node.inputs[0], observed)
        return None if not a else n_out * int(a[-1])
    if op == "Gemm":
        a = _shape(node.inputs[0], observed)
        if not a:
            return None
        trans_a = node.attributes.get("transA")
        k = a[0] if (trans_a is not None and trans_a.value) else a[-1]
        return n_out * int(k)
    if op in ("MatMulNBits", "SparseQuantMatMul"):
        k = node.attributes.get("K")
        return None if k is None else n_out * int(k.value)
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = _shape(node.inputs[3 if op == "QLinearConv" else 1], observed)
        return None if not w else n_out * int(np.prod(w[1:], dtype=np.int64))
    if op == "ConvTranspose":
        x, w = _shape(node.inputs[0], observed), _shape(node.inputs[1], observed)
        return None if not (x and w) else int(np.prod(x, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    return None


def mac_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph.all_nodes() if n.op_type in MAC_OPS]


def observe_shapes(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Shapes of the inputs and outputs of MAC nodes in one ORT run (nothing is kept but the shapes)."""
    from modelsurgeon.capture import ActivationCapture

    names = []
    for node in mac_nodes(model):
        for v in (node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None, node.outputs[0]):
            if v is not None and v.const_value is None and v.name:
                names.append(v.name)
    if not names:
        return {}
    cap = ActivationCapture(model, names, prepack=False)  # one run
    return {k: tuple(v.shape) for k, v in cap.run(feeds).items()}


def estimate_macs(model: ir.Model, feeds: dict[str, np.ndarray] | None) -> int | None:
    """MACs of one forward pass on `feeds` (use a single sample); None if some MAC node has unknown shapes."""
    nodes = mac_nodes(model)
    if not nodes:
        return 0
    try:
        observed = observe_shapes(model, feeds) if feeds is not None else {}
    except Exception:
        observed = {}
    total = 0
    for node in nodes:
        m = node_macs(node, observed)
        if m is None:
            return None
        total += m
    return total


def model_stats(model: ir.Model, feeds: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    return {
        "nodes": sum(1 for _ in model.graph.all_nodes()),
        "parameters": count_parameters(model),
        "bytes": file_bytes(model),
        "macs": estimate_macs(model, feeds),
    }


def human(n: float | int | None, unit: str = "") -> str:
    if n is None:
        return "?"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if isinstance(n, (int, np.integer)) or float(n).is_integer() else f"{n:.3g}{unit}"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n} B"
