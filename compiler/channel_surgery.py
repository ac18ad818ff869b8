"""Index rewriting: remove chosen channels from a model consistently, given the channel dependency analysis.

`PrunePlan(groups, keep)` turns a keep mask per pruned group (leaf index space) into a keep mask per tensor
axis. `apply_plan` then rewrites the model in place:

- constants (initializers, Constant nodes) are sliced along every axis that lost positions, once even when
  shared; `overrides` replace a constant by a given, already pruned array (least-squares refits);
- shape inputs of Reshape/Expand/ConstantOfShape get their size literals recomputed (a new Concat when the
  shape is assembled from pieces, so shared shape tensors are never changed under another user);
- Slice bounds and Split sizes are recomputed from the kept positions before them;
- Conv/ConvTranspose `group`, GroupNormalization `num_groups`, Attention `q_num_heads`/`kv_num_heads` (and its
  default scale, kept at the original head size) follow the kept counts;
- RMS statistics stay right when the normalized width shrinks from n to n': RMSNormalization gets
  epsilon * n/n' and scale * sqrt(n/n'); a decomposed mean of squares is multiplied by n'/n. Both are
  exact when the removed channels are zero. LayerNorm statistics are recomputed over the kept width.
- every intermediate value's shape annotation is updated.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from modelsurgeon.analyses.channel_deps import ChannelGroups, ShapePiece, constant_array, is_constant


class PrunePlan:
    """Keep masks per leaf index space, and the kept positions of any tensor axis they imply."""

    def __init__(self, groups: ChannelGroups, keep: dict[int, np.ndarray]):
        self.groups = groups
        self.atoms = groups.atoms
        self.keep = {self.atoms.find(k): np.asarray(v, dtype=bool) for k, v in keep.items()}
        for leaf, mask in self.keep.items():
            if self.atoms.frozen.get(leaf):
                raise ValueError(f"index space #{leaf} is frozen: {self.atoms.frozen[leaf][0]}")
            if not mask.any():
                raise ValueError(f"index space #{leaf} would lose every index")
        self._masks: dict[int, np.ndarray | None] = {}

    def atom_mask(self, atom: int) -> np.ndarray | None:
        """Kept positions of an atom, or None when it keeps everything (or is dynamic)."""
        atom = self.atoms.find(atom)
        if atom not in self._masks:
            mask = self.atoms.kept_positions(atom, self.keep)
            self._masks[atom] = None if mask is None or mask.all() else mask
        return self._masks[atom]

    def count(self, atom: int) -> int | None:
        mask = self.atom_mask(atom)
        return self.atoms.size(atom) if mask is None else int(mask.sum())

    def axis_masks(self, value: ir.Value) -> list[np.ndarray | None] | None:
        lay = self.groups.layouts.get(value)
        if lay is None:
            return None
        return [self.atom_mask(a) for a in lay]

    def changed(self, value: ir.Value) -> bool:
        masks = self.axis_masks(value)
        return masks is not None and any(m is not None for m in masks)

    def prune_array(self, value: ir.Value, array: np.ndarray, skip_axes: tuple[int, ...] = ()) -> np.ndarray:
        masks = self.axis_masks(value) or []
        out = array
        for axis, mask in enumerate(masks):
            if mask is not None and axis not in skip_axes:
                out = np.compress(mask, out, axis=axis)
        return np.ascontiguousarray(out)


def apply_plan(model: ir.Model, plan: PrunePlan, overrides: dict[ir.Value, np.ndarray] | None = None) -> dict[str, int]:
    """Rewrite `model` in place; returns counts of what changed."""
    overrides = dict(overrides or {})
    editor = _Editor(model)
    stats = {"constants_sliced": 0, "shape_inputs_rewritten": 0, "attributes_rewritten": 0}
    groups = plan.groups
    # 1. node-level rewrites that read the original structure (before constants change)
    for site in groups.sites:
        fn = _SITE_REWRITES.get(site.kind)
        if fn is not None and fn(site, plan, editor):
            key = "shape_inputs_rewritten" if site.kind == "shape" else "attributes_rewritten"
            stats[key] += 1
    # 2. constants
    for value, lay in list(groups.layouts.items()):
        if lay is None or not is_constant(value):
            continue
        producer = value.producer()
        if value in overrides:
            editor.set_constant(value, overrides.pop(value))
            stats["constants_sliced"] += 1
            continue
        if not plan.changed(value):
            continue
        if producer is not None and producer.op_type == "ConstantOfShape":
            continue  # its shape input was rewritten above
        editor.set_constant(value, plan.prune_array(value, constant_array(value)))
        stats["constants_sliced"] += 1
    for value, array in overrides.items():  # constants without a layout change (e.g. refit weights)
        editor.set_constant(value, array)
    # 3. shape annotations
    for value, lay in groups.layouts.items():
        if lay is None or is_constant(value) or not plan.changed(value):
            continue
        if value.shape is None:
            continue
        dims = list(value.shape)
        if len(dims) != len(lay):
            value.shape = None
            continue
        for k, atom in enumerate(lay):
            if plan.atom_mask(atom) is not None:
                dims[k] = plan.count(atom)
        value.shape = ir.Shape(dims)
    for site_fn in editor.after:
        site_fn()
    return stats


class _Editor:
    """Creates constants and nodes in the style the model needs (Constant nodes for IR version < 4)."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.use_initializers = (model.ir_version or 8) >= 4
        self.after: list = []
        self._taken = {n.name for n in self.graph.all_nodes() if n.name}
        self._taken |= {v.name for v in self.graph.initializers.values()}
        self._taken |= {v.name for n in self.graph.all_nodes() for v in n.outputs if v.name}
        self._taken |= {v.name for v in self.graph.inputs}

    def name(self, hint: str) -> str:
        """A node or value name not used anywhere in the graph."""
        base = f"{hint}_pruned"
        name, k = base, 1
        while name in self._taken:
            k += 1
            name = f"{base}_{k}"
        self._taken.add(name)
        return name

    def constant(self, array: np.ndarray, hint: str, before: ir.Node | None = None) -> ir.Value:
        array = np.ascontiguousarray(array)
        name = self.name(hint)
        if self.use_initializers:
            value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                             const_value=ir.tensor(array, name=name))
            self.graph.register_initializer(value)
            return value
        node = ir.node("Constant", [], attributes={"value": ir.tensor(array, name=name)}, name=self.name(name))
        node.outputs[0].name = name
        node.outputs[0].shape = ir.Shape(array.shape)
        node.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        first = next(iter(self.graph), None)
        if first is None:
            self.graph.append(node)
        else:
            self.graph.insert_before(first, node)
        return node.outputs[0]

    def set_constant(self, value: ir.Value, array: np.ndarray) -> None:
        """Give a constant new content (and shape), wherever it lives."""
        array = np.ascontiguousarray(array)
        producer = value.producer()
        dtype = value.dtype
        if dtype is not None and array.dtype != dtype.numpy():
            array = array.astype(dtype.numpy())
        if value.const_value is not None:
            value.const_value = ir.tensor(array, name=value.name)
        elif producer is not None and producer.op_type == "Constant":
            for key in ("value_float", "value_floats", "value_int", "value_ints"):
                producer.attributes.pop(key, None)
            producer.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=value.name))
        else:  # ConstantOfShape with a non-uniform replacement: a new constant takes over its uses
            new = self.constant(array, value.name or "constant")
            ir.convenience.replace_all_uses_with(value, new)
            if value.is_graph_output():
                raise ValueError(f"cannot replace graph output '{value.name}'")
            return
        value.shape = ir.Shape(array.shape)


# ------------------------------------------------------------------------------------------ site rewrites

def _rewrite_shape(site, plan: PrunePlan, editor: _Editor) -> bool:
    node, info = site.node, site.info
    out: ir.Value = info["out"]
    lay = plan.groups.layouts.get(out)
    if lay is None:
        return False
    old = [plan.atoms.size(a) for a in lay]
    new = [plan.count(a) for a in lay]
    j = info["first_axis"]
    new_pieces: list[tuple[ShapePiece, list[int] | None]] = []
    any_change = False
    for piece in info["pieces"]:
        values, changed = [], False
        for e in piece.entries:
            v = e.value
            if (e.kind == "lit" and 0 <= j < len(lay) and old[j] is not None and v == old[j] and v not in (0, -1)
                    and new[j] != old[j]):
                v, changed = new[j], True
            values.append(v)
            j += 1
        if changed and not piece.rewritable:
            raise ValueError(f"{node.op_type} '{node.name}': shape literal cannot be rewritten (analysis should have frozen it)")
        new_pieces.append((piece, values if changed else None))
        any_change |= changed
    if not any_change:
        return False
    shape_input = node.inputs[info["index"]]
    dtype = shape_input.dtype.numpy() if shape_input.dtype is not None else np.int64
    if len(new_pieces) == 1 and new_pieces[0][0].value is None:
        node.replace_input_with(info["index"], editor.constant(np.asarray(new_pieces[0][1], dtype=dtype), "shape"))
        return True
    concat = shape_input.producer()
    if concat is None or concat.op_type != "Concat":
        raise ValueError(f"{node.op_type} '{node.name}': cannot rebuild its shape input")
    inputs = []
    for piece, values in new_pieces:
        if values is None:
            inputs.append(piece.value)
        else:
            pdtype = piece.value.dtype.numpy() if piece.value.dtype is not None else dtype
            shape = piece.value.shape
            arr = np.asarray(values, dtype=pdtype)
            if shape is not None and len(shape) == 0:
                arr = arr.reshape(())
            inputs.append(editor.constant(arr, "shape"))
    new_concat = ir.node("Concat", inputs, attributes={"axis": 0}, name=editor.name(concat.name or "Concat"))
    new_concat.outputs[0].name = editor.name(shape_input.name or "shape")
    new_concat.outputs[0].dtype = shape_input.dtype
    new_concat.outputs[0].shape = shape_input.shape
    editor.graph.insert_before(node, new_concat)
    node.replace_input_with(info["index"], new_concat.outputs[0])
    return True


def _rewrite_slice(site, plan: PrunePlan, editor: _Editor) -> bool:
    node, info = site.node, site.info
    lay = plan.groups.layouts.get(info["input"])
    changes = {}
    for axis, s, e in info["sliced"]:
        mask = plan.atom_mask(lay[axis])
        if mask is None:
            continue
        new_s = int(mask[:s].sum())
        changes[axis] = (new_s, new_s + int(mask[s:e].sum()))
    if not changes:
        return False
    if "starts" in node.attributes:  # opset < 10
        axes = list(node.attributes["axes"].value) if "axes" in node.attributes else list(range(len(node.attributes["starts"].value)))
        rank = len(lay)
        starts, ends = list(node.attributes["starts"].value), list(node.attributes["ends"].value)
        for k, a in enumerate(axes):
            if a % rank in changes:
                starts[k], ends[k] = changes[a % rank]
        node.attributes["starts"] = ir.AttrInt64s("starts", starts)
        node.attributes["ends"] = ir.AttrInt64s("ends", ends)
        return True
    starts = constant_array(node.inputs[1]).reshape(-1).copy()
    ends = constant_array(node.inputs[2]).reshape(-1).copy()
    rank = len(lay)
    axes = constant_array(node.inputs[3]).reshape(-1) if len(node.inputs) > 3 and node.inputs[3] is not None else np.arange(len(starts))
    for k, a in enumerate(axes):
        if int(a) % rank in changes:
            starts[k], ends[k] = changes[int(a) % rank]
    node.replace_input_with(1, editor.constant(starts.astype(node.inputs[1].dtype.numpy() if node.inputs[1].dtype else np.int64), "starts"))
    node.replace_input_with(2, editor.constant(ends.astype(node.inputs[2].dtype.numpy() if node.inputs[2].dtype else np.int64), "ends"))
    return True


def _rewrite_split(site, plan: PrunePlan, editor: _Editor) -> bool:
    node, info = site.node, site.info
    axis = info["axis"]
    sizes, changed = [], False
    for out in info["outputs"]:
        lay = plan.groups.layouts.get(out)
        mask = plan.atom_mask(lay[axis])
        changed |= mask is not None
        sizes.append(plan.count(lay[axis]))
    if not changed:
        return False
    if len(node.inputs) > 1 or "num_outputs" in node.attributes or "split" not in node.attributes and _opset(editor) >= 13:
        node.attributes.pop("num_outputs", None)
        split = editor.constant(np.asarray(sizes, dtype=np.int64), "split")
        if len(node.inputs) > 1:
            node.replace_input_with(1, split)
        else:
            node.resize_inputs(2)
            node.replace_input_with(1, split)
    else:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
    return True


def _opset(editor: _Editor) -> int:
    return next((v for k, v in editor.model.opset_imports.items() if k in ("", "ai.onnx")), 18)


def _rewrite_group(site, plan: PrunePlan, editor: _Editor) -> bool:
    n = plan.count(site.info["atom"])
    key = "num_groups" if site.kind == "groupnorm" else "group"
    if n is None or n == site.node.attributes[key].value:
        return False
    site.node.attributes[key] = ir.AttrInt64(key, n)
    return True


def _rewrite_attention(site, plan: PrunePlan, editor: _Editor) -> bool:
    node, info = site.node, site.info
    changed = False
    if info["rank"] == 3:
        kv, grp = plan.count(info["kv"]), plan.count(info["grp"])
        if kv != node.attributes["kv_num_heads"].value or kv * grp != node.attributes["q_num_heads"].value:
            node.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", kv)
            node.attributes["q_num_heads"] = ir.AttrInt64("q_num_heads", kv * grp)
            changed = True
    hd = info["hd"]
    if plan.atom_mask(hd) is not None and "scale" not in node.attributes:
        node.attributes["scale"] = ir.AttrFloat32("scale", 1.0 / math.sqrt(plan.atoms.size(hd)))
        changed = True
    return changed


def _widths(site, plan: PrunePlan) -> tuple[int, int] | None:
    atoms = site.info["atoms"]
    old = math.prod(plan.atoms.size(a) or 0 for a in atoms)
    new = math.prod(plan.count(a) or 0 for a in atoms)
    if not old or old == new:
        return None
    return old, new


def _rewrite_rmsnorm(site, plan: PrunePlan, editor: _Editor) -> bool:
    widths = _widths(site, plan)
    if widths is None:
        return False
    n, n_new = widths
    node = site.node
    eps = node.attributes["epsilon"].value if "epsilon" in node.attributes else 1e-5
    node.attributes["epsilon"] = ir.AttrFloat32("epsilon", float(eps) * n / n_new)
    scale = node.inputs[1]
    factor = math.sqrt(n / n_new)

    def rescale():  # after constants are sliced
        arr = constant_array(scale)
        if arr is None:
            raise ValueError(f"{node.op_type} '{node.name}': scale is not a constant")
        node.replace_input_with(1, editor.constant((arr * factor).astype(arr.dtype), scale.name or "scale"))

    editor.after.append(rescale)
    return True


def _rewrite_mean_of_squares(site, plan: PrunePlan, editor: _Editor) -> bool:
    widths = _widths(site, plan)
    if widths is None:
        return False
    n, n_new = widths
    node = site.node
    out = node.outputs[0]
    dtype = out.dtype.numpy() if out.dtype is not None else np.float32
    factor = editor.constant(np.asarray(n_new / n, dtype=dtype), "rms_width")
    mul = ir.node("Mul", [out, factor], name=editor.name(f"{node.name}_keep_width"))
    mul.outputs[0].name = editor.name(out.name or "mean")
    mul.outputs[0].dtype = out.dtype
    mul.outputs[0].shape = out.shape
    editor.graph.insert_after(node, mul)
    for user, idx in list(out.uses()):
        if user is not mul:
            user.replace_input_with(idx, mul.outputs[0])
    if out.is_graph_output():
        raise ValueError(f"'{out.name}' is a graph output")
    return True


def _rewrite_identity_gather(site, plan: PrunePlan, editor: _Editor) -> bool:
    """An identity gather (torch's as_strided of a contiguous tensor) reads a flat view at offsets computed for the
    original sizes: its users read its source instead, and it is removed (its index arithmetic is left dead)."""
    node, source = site.node, site.info["source"]
    out = node.outputs[0]
    if out.is_graph_output() or not (plan.changed(source) or plan.changed(out)):
        return False
    ir.convenience.replace_all_uses_with(out, source)
    node.graph.remove(node, safe=True)
    return True


_SITE_REWRITES: dict[str, Any] = {
    "identity_gather": _rewrite_identity_gather,
    "shape": _rewrite_shape,
    "slice": _rewrite_slice,
    "split": _rewrite_split,
    "group": _rewrite_group,
    "groupnorm": _rewrite_group,
    "attention": _rewrite_attention,
    "rmsnorm": _rewrite_rmsnorm,
    "mean_of_squares": _rewrite_mean_of_squares,
}
