"""Channel rules of the ops that map indices by position: Concat, Split, Slice, Gather, ScatterND.

Part of the `channel_groups` analysis (`modelsurgeon.analyses.channel_deps` holds the builder and the other rule
families; these register into its `RULES` table). Concat and Split map offsets (the output atom is a concatenation
of the inputs', or a segment of the input's); Slice maps a constant, unit-step range of positions, and an axis whose
range does not fall on index boundaries (torch.roll of Swin's windows cuts a spatial axis of 8 x 7 at 53) is frozen
alone, without freezing the node's other axes; Gather freezes the axis it indexes, except the identity gather that
torch exports for `as_strided` (ConvNeXt's flatten: a flat view read back at row-major offsets, recognized by
`affine_index` and rewired to its input by the rewrite); ScatterND freezes the axes it indexes and ties the rest to
the updates'.

What they cannot do: a Split or Concat boundary inside an index structure that must stay whole (ShuffleNet's
later units split a channel shuffle of a channel shuffle at an odd offset: frozen with the reason), strided
slices, gathers with computed indices other than the identity, and GatherElements, GatherND or ScatterElements.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelsurgeon.analyses.channel_deps import (Builder, RuleError, Site, WeightUse, _attr, _constant, _slice_bounds,
                                                is_constant, rule)
from modelsurgeon.channel_atoms import Unresolvable


@rule("Concat")
def _concat(b: Builder, node: ir.Node) -> None:
    inputs = [v for v in node.inputs if v is not None]
    lays = [b.L(v) for v in inputs]
    r = len(lays[0])
    if any(len(lay) != r for lay in lays):
        raise RuleError("inputs of different ranks")
    axis = _attr(node, "axis", 0) % r
    y = node.outputs[0]
    out = []
    for k in range(r):
        if k == axis:
            out.append(b.atoms.make_concat([lay[k] for lay in lays], origin=b.where()))
        else:
            a0 = lays[0][k]
            for v, lay in zip(inputs[1:], lays[1:]):
                b.edge(inputs[0], k, v, k, "identity")
                b.same(a0, lay[k], "concat")
            out.append(a0)
    b.set(y, out)
    offset = 0
    for v, lay in zip(inputs, lays):
        s = b.size(lay[axis])
        b.edge(v, axis, y, axis, f"concat offset {offset}" if s is not None else "concat")
        offset += s or 0


@rule("Split")
def _split(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    axis = _attr(node, "axis", 0) % len(lay)
    n = b.size(lay[axis])
    outs = [o for o in node.outputs]
    if n is None:
        raise RuleError("splitting a dynamic axis")
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = _constant(node.inputs[1])
        if sizes is None:
            raise RuleError("split sizes are not constant")
        sizes = [int(s) for s in sizes.reshape(-1)]
    elif "split" in node.attributes:
        sizes = list(_attr(node, "split"))
    else:
        k = len(outs)
        chunk = -(-n // k)
        sizes = [min(chunk, n - i * chunk) for i in range(k)]
    pos = 0
    for out, s in zip(outs, sizes):
        try:
            seg = b.atoms.segment(lay[axis], pos, pos + s)
        except Unresolvable as exc:
            raise RuleError(f"a channel shuffle cannot be split at {pos} ({exc})")
        b.set(out, [seg if k == axis else a for k, a in enumerate(lay)])
        b.edge(x, axis, out, axis, f"split [{pos}:{pos + s})")
        pos += s
    b.sites.append(Site(node, "split", {"axis": axis, "outputs": outs}))


@rule("Slice")
def _slice(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    bounds = _slice_bounds(node, b.opset)
    if bounds is None:
        raise RuleError("its bounds are not constant")
    out = list(lay)
    sliced = []
    for start, end, axis, step in zip(*bounds):
        axis = int(axis) % len(lay)
        n = b.size(lay[axis])
        if n is None:
            out[axis] = b.new(None, f"{b.where()}: slice of a dynamic axis")
            continue
        s, e, _ = slice(int(start), int(end), int(step)).indices(n)
        if int(step) != 1:
            b.atoms.freeze(lay[axis], f"{b.where()}: strided slice")
            out[axis] = b.new(len(range(s, e, int(step))), f"{b.where()}: strided slice")
            continue
        e = max(e, s)
        try:
            out[axis] = b.atoms.segment(lay[axis], s, e)
        except Unresolvable as exc:  # offsets that cut a product (torch.roll of Swin's windows): this axis only
            reason = f"{b.where()}: slice [{s}:{e}) does not fall on index boundaries ({exc})"
            b.atoms.freeze(lay[axis], reason)
            out[axis] = b.new(e - s, reason)
            continue
        sliced.append((axis, s, e))
        b.edge(x, axis, node.outputs[0], axis, f"slice [{s}:{e})")
    b.set(node.outputs[0], out)
    b.sites.append(Site(node, "slice", {"sliced": sliced, "input": x}))


@rule("Gather")
def _gather(b: Builder, node: ir.Node) -> None:
    data, idx = node.inputs[0], node.inputs[1]
    dl, il = b.L(data), b.L(idx)
    axis = _attr(node, "axis", 0) % len(dl)
    source = _identity_gather_source(b, node)
    if source is not None:
        b.set(node.outputs[0], b.L(source))
        for k in range(len(b.L(source))):
            b.edge(source, k, node.outputs[0], k, "identity (as_strided)")
        for a in il:
            b.atoms.freeze(a, f"{b.where()}: positions of an identity gather")
        b.sites.append(Site(node, "identity_gather", {"source": source}))
        return
    b.atoms.freeze(dl[axis], f"{b.where()}: indexed by Gather")
    out = dl[:axis] + il + dl[axis + 1:]
    b.set(node.outputs[0], out)
    if is_constant(data) and len(dl) == 2 and axis == 0:
        b.weight_uses.append(WeightUse(node, data, "embedding", None, 1))
        b.tag(dl[1], "embedding")


def _identity_gather_source(b: Builder, node: ir.Node) -> ir.Value | None:
    """x when the node is Gather(Reshape(x, [-1]), idx, axis=0) with idx[i0, .., ir) = the row-major offset of
    (i0, .., ir) in x and idx shaped like x: the output is x itself (torch's as_strided of a contiguous tensor)."""
    flat = node.inputs[0]
    producer = flat.producer()
    if _attr(node, "axis", 0) != 0 or producer is None or producer.op_type != "Reshape" or len(b.L(flat)) != 1:
        return None
    x = producer.inputs[0]
    xl, il = b.layouts.get(x), b.L(node.inputs[1])
    if xl is None or len(xl) != len(il):
        return None
    affine = affine_index(b, node.inputs[1])
    if affine is None or affine[1] != 0:
        return None
    stride = 1
    for k in reversed(range(len(xl))):
        size = b.size(xl[k])
        if b.atoms.mono(il[k]) != b.atoms.mono(xl[k]) and not (k == 0 and size is None and b.size(il[k]) is None):
            return None  # (a dynamic leading size: the Range over the batch is another symbol for it)
        if size != 1 and affine[0][k] != stride:
            return None
        if size is None:
            if k != 0:
                return None  # a dynamic size inside: its stride is not a constant
        else:
            stride *= size
    return x


def affine_index(b: Builder, v: ir.Value, depth: int = 0) -> tuple[list[int], int] | None:
    """(strides, offset) when every element of integer tensor `v` is offset + sum_k strides[k] * i_k (i_k its
    position along axis k), built from constants, Range, Mul by a constant scalar, Add, Unsqueeze and Cast."""
    if depth > 12:
        return None
    rank = len(b.layouts.get(v) or ()) if v in b.layouts else None
    arr = _constant(v)
    if arr is not None:
        if not np.issubdtype(arr.dtype, np.integer):
            return None
        if arr.size == 0:
            return None
        offset = int(arr.reshape(-1)[0])
        strides = []
        for k in range(arr.ndim):
            strides.append(int(np.take(arr, 1, axis=k).reshape(-1)[0]) - offset if arr.shape[k] > 1 else 0)
        grid = offset + sum(s * np.arange(n).reshape([-1 if j == k else 1 for j in range(arr.ndim)])
                            for k, (s, n) in enumerate(zip(strides, arr.shape))) if arr.ndim else offset
        return (strides, offset) if np.array_equal(np.broadcast_to(grid, arr.shape), arr) else None
    node = v.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op == "Range":
        start, delta = _constant(node.inputs[0]), _constant(node.inputs[2])
        if start is None or delta is None:
            return None
        return [int(delta.reshape(-1)[0])], int(start.reshape(-1)[0])
    if op in ("Cast", "Identity"):
        return affine_index(b, node.inputs[0], depth + 1)
    if op == "Unsqueeze":
        inner = affine_index(b, node.inputs[0], depth + 1)
        if inner is None or rank is None:
            return None
        axes = _constant(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(_attr(node, "axes", []))
        if axes is None:
            return None
        axes = sorted(int(a) % rank for a in axes.reshape(-1))
        strides = list(inner[0])
        for a in axes:
            strides.insert(a, 0)
        return strides, inner[1]
    if op == "Mul":
        for i in (0, 1):
            c = _constant(node.inputs[1 - i])
            if c is not None and c.size == 1 and np.issubdtype(c.dtype, np.integer):
                inner = affine_index(b, node.inputs[i], depth + 1)
                if inner is None or c.ndim > len(inner[0]):
                    return None
                f = int(c.reshape(-1)[0])
                return [s * f for s in inner[0]], inner[1] * f
        return None
    if op == "Add":
        parts = [affine_index(b, i, depth + 1) for i in node.inputs]
        if any(p is None for p in parts):
            return None
        r = max(len(p[0]) for p in parts)
        strides = [0] * r
        for p in parts:
            for k, s in enumerate(p[0]):
                strides[r - len(p[0]) + k] += s
        return strides, sum(p[1] for p in parts)
    return None


@rule("GatherElements", "GatherND", "ScatterElements", "Scatter")
def _gather_elements(b: Builder, node: ir.Node) -> None:
    raise RuleError("index-valued access")


@rule("ScatterND")
def _scatter_nd(b: Builder, node: ir.Node) -> None:
    """data [d0..dr), indices [i0..iq, k], updates [i0..iq, dk..dr): the first k axes of data are indexed by
    position (frozen); its trailing axes are the updates' trailing axes, index for index; the output is data's
    layout (Swin's shifted-window mask writes rows of a [windows, 49] table)."""
    data, idx, upd = node.inputs[0], node.inputs[1], node.inputs[2]
    dl, il, ul = b.L(data), b.L(idx), b.L(upd)
    k = b.size(il[-1]) if il else None
    q = len(il) - 1
    if k is None or k > len(dl) or len(ul) != q + len(dl) - k:
        raise RuleError("index depth unknown")
    for a in dl[:k]:
        b.atoms.freeze(a, f"{b.where()}: indexed by ScatterND")
    for j in range(q):
        b.same(ul[j], il[j], "scatter update rows")
        b.atoms.freeze(ul[j], f"{b.where()}: scattered rows")
    for j, a in enumerate(dl[k:]):
        b.edge(data, k + j, upd, q + j, "identity")
        b.same(a, ul[q + j], "scatter trailing axis")
    b.set(node.outputs[0], dl)
    for j in range(len(dl)):
        b.edge(data, j, node.outputs[0], j, "identity")
