"""Packing sibling projections: MatMuls (or 4-bit MatMulNBits, or our SparseQuantMatMul) that read the same activation become one product
with their weights concatenated along N, followed by a Split, the way ONNX Runtime GenAI builds q/k/v and gate/up.

One product instead of three (q, k, v) or two (gate, up) reads the activation once and pays one kernel launch and one
thread-pool fork per group: at one decode token per step, those fixed costs are a large part of a small model's
time. Each output column is computed exactly as before (a MatMulNBits block runs along K, so concatenating rows of
its weights changes no column's blocks, scales or zero points; a float MatMul's columns are independent dot
products), so the rewrite is exact up to the GEMM's float summation order.

A GroupQueryAttention whose query, key and value are the three parts of one such Split then reads the packed
product directly (its packed-QKV form: query [B, S, (heads + 2 kv_heads) * head_size], key and value absent), as
GenAI's models do.

Not a pass module (the leading underscore keeps `passes/__init__` from importing it as one): `fuse` runs it last.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from modelsurgeon.passes._quant_graph import Namer, add_initializer, attr, drop_unused_initializers
from modelsurgeon.runtime.sparse_quant_format import INPUT_NAMES as SQMM_INPUTS
from modelsurgeon.runtime.sparse_quant_function import DEFAULTS as SQMM_DEFAULTS


def _is(node: ir.Node, domain: str, op: str) -> bool:
    return node.op_type == op and (node.domain in ("", "ai.onnx") if domain == "" else node.domain == domain)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    try:
        return value.const_value.numpy()
    except Exception:
        return None


def _float_key(node: ir.Node):
    """Grouping key of a MatMul by a constant 2-D weight [K, N], or None when it cannot be packed."""
    b = node.inputs[1]
    if b is None or b.const_value is None or b.is_graph_input() or b.shape is None or b.shape.rank() != 2:
        return None
    return ("MatMul", node.inputs[0], b.dtype, int(b.shape[0]))


_NBITS_ATTRS = ("K", "bits", "block_size", "accuracy_level")


def _nbits_key(node: ir.Node):
    """Grouping key of a MatMulNBits, or None when it cannot be packed (g_idx, non-constant inputs)."""
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    if inputs[4] is not None:  # g_idx: columns of another input ordering
        return None
    if any(v is not None and (v.const_value is None or v.is_graph_input()) for v in inputs[1:]):
        return None
    optional = tuple(None if v is None else v.dtype for v in (inputs[3], inputs[5]))
    return ("MatMulNBits", inputs[0], inputs[2].dtype, optional,
            tuple(attr(node, a, 0 if a == "accuracy_level" else None) for a in _NBITS_ATTRS))


_SQMM_ATTRS = ("K", "block", "bits", "accuracy_level", *SQMM_DEFAULTS)
_SQMM_DEFAULTS = {"bits": 4, "accuracy_level": 4, **SQMM_DEFAULTS}


def _sqmm_key(node: ir.Node):
    """Grouping key of our SparseQuantMatMul (runtime/sparse_quant_format.py), or None when it cannot be packed: a
    weight input that is not constant, or an N that does not end on a whole tile (the next part's first tile would
    share blocks with it)."""
    inputs = list(node.inputs) + [None] * (len(SQMM_INPUTS) - len(node.inputs))
    if any(v is not None and (v.const_value is None or v.is_graph_input()) for v in inputs[1:]):
        return None
    attrs = tuple(attr(node, a, _SQMM_DEFAULTS.get(a)) for a in _SQMM_ATTRS)
    if int(attr(node, "N")) % attrs[_SQMM_ATTRS.index("tile")]:
        return None
    types = tuple(None if v is None else v.dtype for v in inputs[1:])
    return ("SparseQuantMatMul", inputs[0], types, attrs)


def _packed_sqmm(model: ir.Model, namer: Namer, group: list[ir.Node]) -> ir.Node:
    """Columns of several SparseQuantMatMul weights side by side: every slot-major array concatenated, group_ptr
    offset by the kept tile-groups before it (each part's N is a whole number of tiles)."""
    first = group[0]
    inputs: list[ir.Value | None] = [first.inputs[0]]
    for i, label in enumerate(SQMM_INPUTS[1:], start=1):
        if i >= len(first.inputs) or first.inputs[i] is None:
            inputs.append(None)
            continue
        parts = [_const(n.inputs[i]) for n in group]
        if label == "group_ptr":
            offsets = np.cumsum([0] + [int(ptr[-1]) for ptr in parts[:-1]])
            parts = [parts[0]] + [ptr[1:] + off for ptr, off in zip(parts[1:], offsets[1:])]
        packed = np.concatenate(parts, axis=0).astype(parts[0].dtype)
        inputs.append(add_initializer(model, namer, f"{first.name}_packed_{label}", packed))
    while inputs[-1] is None:
        inputs.pop()
    attrs = [ir.AttrInt64("N", sum(int(attr(n, "N")) for n in group))]
    attrs += [ir.AttrInt64(a, int(attr(first, a, _SQMM_DEFAULTS.get(a)))) for a in _SQMM_ATTRS]
    return ir.Node(first.domain, first.op_type, inputs, attrs, name=namer(f"{first.name}_packed"))


def _rows(array: np.ndarray, n: int) -> np.ndarray:
    """An N-major MatMulNBits input ([N, ...] or flattened [N * per_row]) as [N, per_row]."""
    return array.reshape(n, -1)


def _packed_nbits(model: ir.Model, namer: Namer, group: list[ir.Node]) -> ir.Node:
    ns = [int(attr(n, "N")) for n in group]
    first = group[0]
    inputs: list[ir.Value | None] = [first.inputs[0]]
    for i, label in ((1, "B"), (2, "scales"), (3, "zero_points"), (4, None), (5, "bias")):
        if i >= len(first.inputs) or first.inputs[i] is None or label is None:
            inputs.append(None)
            continue
        parts = [_rows(_const(n.inputs[i]), size) for n, size in zip(group, ns)]
        packed = np.concatenate(parts, axis=0)
        if first.inputs[i].shape is not None and first.inputs[i].shape.rank() == 1:
            packed = packed.reshape(-1)
        if i == 1:
            packed = packed.reshape(sum(ns), *first.inputs[1].const_value.shape[1:])
        inputs.append(add_initializer(model, namer, f"{first.inputs[1].name}_packed_{label}", packed))
    while inputs[-1] is None:
        inputs.pop()
    attrs = [ir.AttrInt64("N", sum(ns))] + [ir.AttrInt64(a, int(attr(first, a, 0))) for a in _NBITS_ATTRS]
    return ir.Node("com.microsoft", "MatMulNBits", inputs, attrs, name=namer(f"{first.name}_packed"))


def _packed_float(model: ir.Model, namer: Namer, group: list[ir.Node]) -> ir.Node:
    weights = np.concatenate([_const(n.inputs[1]) for n in group], axis=1)
    w = add_initializer(model, namer, f"{group[0].inputs[1].name}_packed", weights)
    return ir.Node("", "MatMul", [group[0].inputs[0], w], name=namer(f"{group[0].name}_packed"))


def _width(node: ir.Node) -> int:
    return int(attr(node, "N")) if node.op_type in ("MatMulNBits", "SparseQuantMatMul") else int(node.inputs[1].shape[1])


def pack_projections(model: ir.Model) -> int:
    """Pack every group of sibling projections in the main graph; returns how many groups were packed."""
    groups: dict[tuple, list[ir.Node]] = collections.defaultdict(list)
    for node in model.graph:
        key = None
        if _is(node, "", "MatMul"):
            key = _float_key(node)
        elif _is(node, "com.microsoft", "MatMulNBits"):
            key = _nbits_key(node)
        elif _is(node, "ai.modelsurgeon", "SparseQuantMatMul"):
            key = _sqmm_key(node)
        if key is not None and not node.outputs[0].is_graph_output():
            groups[key].append(node)
    namer = Namer(model)
    packed = 0
    for key, group in groups.items():
        if len(group) < 2 or any(_const(n.inputs[1]) is None for n in group):
            continue
        widths = [_width(n) for n in group]
        product = {"MatMulNBits": _packed_nbits, "SparseQuantMatMul": _packed_sqmm}.get(key[0], _packed_float)(
            model, namer, group)
        product.outputs[0].name = namer(f"{group[0].outputs[0].name}_packed")
        dtype = group[0].outputs[0].dtype or group[0].inputs[0].dtype  # (a hand-built graph may leave it untyped)
        product.outputs[0].dtype = dtype
        sizes = ir.Value(name=namer(f"{product.name}_split_sizes"), shape=ir.Shape([len(widths)]),
                         type=ir.TensorType(ir.DataType.INT64),
                         const_value=ir.tensor(np.array(widths, np.int64), name=None))
        sizes.const_value.name = sizes.name
        model.graph.register_initializer(sizes)
        split = ir.Node("", "Split", [product.outputs[0], sizes], [ir.AttrInt64("axis", -1)],
                        num_outputs=len(group), name=namer(f"{product.name}_split"))
        model.graph.insert_before(group[0], [product, split])
        for old, new in zip(group, split.outputs):
            out = old.outputs[0]
            new.dtype, new.shape = out.dtype or dtype, out.shape
            ir.convenience.replace_all_uses_with(out, new)
            name = out.name
            old_inputs = list(old.inputs)
            model.graph.remove(old, safe=True)
            new.name = name
            drop_unused_initializers(model, old_inputs[1:])
        packed += 1
    _packed_qkv_attention(model)
    return packed


def _packed_qkv_attention(model: ir.Model) -> None:
    """GroupQueryAttention(q, k, v) with q, k, v the three parts of one Split -> GroupQueryAttention(packed)."""
    for node in model.graph:
        if not _is(node, "com.microsoft", "GroupQueryAttention") or len(node.inputs) < 3:
            continue
        q, k, v = node.inputs[:3]
        split = q.producer() if q is not None else None
        if split is None or not _is(split, "", "Split") or len(split.outputs) != 3 or k is None or v is None:
            continue
        if [q, k, v] != list(split.outputs) or any(len(o.uses()) != 1 for o in split.outputs):
            continue
        axis = attr(split, "axis", 0)
        rank = split.inputs[0].shape.rank() if split.inputs[0].shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            continue
        node.replace_input_with(0, split.inputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        model.graph.remove(split, safe=True)
