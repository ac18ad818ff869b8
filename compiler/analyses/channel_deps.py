"""Channel dependency analysis (`channel_groups`): which channels must be pruned together, and how indices map.

Every axis of every tensor (a *channel space*) gets a layout atom (see `modelsurgeon.channel_atoms`). A rule
per op type says how the op maps its inputs' channel spaces to its outputs' (identity for elementwise ops,
numpy broadcasting for binaries, offsets for Concat/Split/Slice, heads x head_dim products for Reshape,
permutations for Transpose, groups x channels for grouped Conv, contracted axes for MatMul/Gemm/Einsum,
...). An op without a rule freezes every channel space it touches ("unknown op X"); nothing is assumed
elementwise. Constants start their own index spaces, so one initializer used by two nodes couples both.

The leaves of the resulting atom structure are the *channel groups*: choosing which indices of a leaf to
keep determines, in every tensor containing it, which positions survive. A group is frozen when any member
cannot change: model inputs and outputs, dynamic sizes, spatial axes, unknown ops, shape constants that
cannot be rewritten, sizes read by Shape for arithmetic, or index structures that cannot be reconciled
(each reason is recorded). The analysis also records what the rewrite must touch beyond slicing weights:
Reshape/Expand shape literals, Slice bounds, Split sizes, Conv groups, head counts, norm statistics.

`ChannelGroups.graph` is a networkx MultiGraph whose nodes are channel spaces `(tensor name, axis)` and whose
edges say that pruning one forces the (mapped) indices on the other, labelled with the op and the mapping.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir

from modelsurgeon.analysis import register_analysis
from modelsurgeon.channel_atoms import ONE, Atoms, Unresolvable, mono_div, mono_mul

log = logging.getLogger("modelsurgeon")

KIND_ORDER = ("heads", "head_group", "head_dim", "conv_groups", "channels", "hidden", "ffn", "other")
KIND_HELP = {
    "heads": "attention heads (with their query groups, keys, values and output rows)",
    "head_group": "query heads within each key/value head (grouped-query attention)",
    "head_dim": "dimensions inside every head (query/key or value), rotary pairs kept together",
    "conv_groups": "whole groups of a grouped convolution",
    "channels": "convolution channels",
    "hidden": "the residual width (normalized axis, embeddings)",
    "ffn": "hidden units between two linear layers",
    "other": "constant index spaces that are none of the above",
}


class RuleError(Exception):
    """A rule cannot describe this node (missing shapes, non-constant attributes): the node is treated as unknown."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One element of a shape tensor: a literal, the size of some axis (`ref`), or unknown."""

    kind: str  # "lit" | "ref" | "unknown"
    value: int | None = None
    atom: int | None = None


@dataclasses.dataclass
class ShapePiece:
    value: ir.Value | None  # the Concat input holding these entries; None: the whole shape tensor
    entries: list[Entry]

    @property
    def rewritable(self) -> bool:
        return all(e.kind == "lit" for e in self.entries)


@dataclasses.dataclass
class Site:
    """A node whose attributes or shape inputs must be recomputed when channels are removed."""

    node: ir.Node
    kind: str
    info: dict[str, Any]


@dataclasses.dataclass
class WeightUse:
    """A constant multiplied with an activation: how its axes relate to the activation's channels."""

    node: ir.Node
    weight: ir.Value
    role: str  # "matmul" | "gemm" | "conv" | "embedding" | "norm"
    in_axis: int | None  # weight axis contracted with the data's channel axis
    out_axis: int | None  # weight axis that becomes the output channels
    data: ir.Value | None = None
    data_axis: int | None = None


@dataclasses.dataclass
class Member:
    value: ir.Value
    axis: int
    role: str

    def __str__(self) -> str:
        return f"{self.value.name}[axis {self.axis}] ({self.role})"


@dataclasses.dataclass
class ChannelGroup:
    id: int
    leaf: int
    size: int
    kind: str
    frozen: list[str]
    members: list[Member]

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.size > 1


@dataclasses.dataclass
class ChannelGroups:
    """The analysis result: groups, the atom structure, layouts, and what the rewrite must touch."""

    model: ir.Model
    atoms: Atoms
    layouts: dict[ir.Value, list[int] | None]
    groups: list[ChannelGroup]
    weight_uses: list[WeightUse]
    sites: list[Site]
    graph: nx.MultiGraph
    unknown_ops: dict[str, int]
    problems: list[str]

    def group_of(self, leaf: int) -> ChannelGroup | None:
        leaf = self.atoms.find(leaf)
        return next((g for g in self.groups if g.leaf == leaf), None)

    def layout(self, value: ir.Value) -> list[int] | None:
        return self.layouts.get(value)

    def kept_mask(self, value: ir.Value, axis: int, keep: dict[int, np.ndarray]) -> np.ndarray | None:
        lay = self.layouts.get(value)
        if lay is None:
            return None
        return self.atoms.kept_positions(lay[axis], keep)

    def by_kind(self) -> dict[str, list[ChannelGroup]]:
        out: dict[str, list[ChannelGroup]] = {}
        for g in self.groups:
            out.setdefault(g.kind, []).append(g)
        return out

    def describe(self, max_members: int = 6) -> str:
        prunable = [g for g in self.groups if g.prunable]
        lines = [f"channel groups: {len(self.groups)} with weights, {len(prunable)} prunable, "
                 f"{len(self.groups) - len(prunable)} frozen"]
        for kind in KIND_ORDER:
            gs = [g for g in self.groups if g.kind == kind]
            if gs:
                lines.append(f"  {kind}: {sum(g.prunable for g in gs)} prunable of {len(gs)} ({KIND_HELP[kind]})")
        if self.unknown_ops:
            lines.append("  unknown ops (their channels are frozen): "
                         + ", ".join(f"{k} x{v}" for k, v in sorted(self.unknown_ops.items())))
        for p in self.problems[:5]:
            lines.append(f"  note: {p}")
        for g in self.groups:
            state = "prunable" if g.prunable else "frozen: " + "; ".join(g.frozen[:2]) + (" ..." if len(g.frozen) > 2 else "")
            lines.append(f"group {g.id} [{g.kind}] size {g.size}: {state}")
            params = [m for m in g.members]
            shown = ", ".join(str(m) for m in params[:max_members])
            more = f", ... (+{len(params) - max_members})" if len(params) > max_members else ""
            lines.append(f"    members: {shown}{more}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- helpers

def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's content when it is a constant (initializer, Constant node, ConstantOfShape of constants)."""
    if value is None:
        return None
    if value.const_value is not None:
        try:
            return value.const_value.numpy()
        except Exception:
            return None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Constant":
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            a = node.attributes.get(key)
            if a is not None:
                v = a.value
                if key == "value":
                    return v.numpy()
                return np.asarray(v, dtype=np.float32 if "float" in key else np.int64)
        return None
    if node.op_type == "ConstantOfShape":
        shape = _constant(node.inputs[0])
        if shape is None:
            return None
        fill = node.attributes.get("value")
        scalar = fill.value.numpy().reshape(-1)[:1] if fill is not None else np.zeros(1, np.float32)
        return np.broadcast_to(scalar.reshape(()), tuple(int(s) for s in shape))
    return None


def is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None:
        return True
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Constant":
        return True
    return node.op_type == "ConstantOfShape" and _constant(node.inputs[0]) is not None


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    return _constant(value)


def _inferred_shapes(model: ir.Model) -> dict[str, tuple | None]:
    """Shapes from ONNX shape inference (data propagation on), falling back to the IR's own annotations."""
    shapes: dict[str, tuple | None] = {}
    for v in _all_values(model.graph):
        if v.shape is not None:
            shapes[v.name] = tuple(d if isinstance(d, int) else None for d in v.shape)
    try:
        proto = ir.serde.serialize_model(model)
        for init in proto.graph.initializer:
            n = math.prod(init.dims) if init.dims else 1
            if n > 64 or init.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                init.ClearField("raw_data")
                for f in ("float_data", "int32_data", "int64_data", "double_data"):
                    init.ClearField(f)
                init.data_location = onnx.TensorProto.DEFAULT
                del init.external_data[:]
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    except Exception as exc:  # inference is a help, not a requirement
        log.debug("shape inference failed: %s", exc)
    return shapes


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


# ---------------------------------------------------------------------------------------------- the builder

class Builder:
    """Walks the graph once in topological order, applying the rule of each node."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.atoms = Atoms()
        self.layouts: dict[ir.Value, list[int] | None] = {}
        self.inferred = _inferred_shapes(model)
        self.nx = nx.MultiGraph()
        self.weight_uses: list[WeightUse] = []
        self.sites: list[Site] = []
        self.unknown_ops: dict[str, int] = {}
        self.problems: list[str] = []
        self.failed: set[ir.Node] = set()
        self._entries: dict[ir.Value, list[Entry] | None] = {}
        self.shape_nodes: list[ir.Node] = []
        self.not_channels: set[tuple[ir.Value, int]] = set()  # constant axes that are not channels (kernels)
        self.node: ir.Node | None = None
        self.opset = next((v for k, v in model.opset_imports.items() if k in ("", "ai.onnx")), 18)

    # -- atoms and layouts -------------------------------------------------------------------------
    def new(self, size: int | None, frozen: str | None = None) -> int:
        origin = f"{self.node.op_type} '{self.node.name}'" if self.node is not None else ""
        return self.atoms.new(size, frozen, origin)

    def L(self, value: ir.Value | None) -> list[int]:
        if value is None:
            raise RuleError("a required input is missing")
        if value in self.layouts:
            lay = self.layouts[value]
            if lay is None:
                raise RuleError(f"the rank of '{value.name}' is unknown")
            return lay
        arr = _constant(value) if is_constant(value) else None
        if arr is not None:
            lay = [self.atoms.new(int(s), origin=f"constant '{value.name}'") for s in arr.shape]
            self.layouts[value] = lay
            return lay
        raise RuleError(f"'{value.name}' has no known layout")

    def rank(self, value: ir.Value) -> int:
        return len(self.L(value))

    def set(self, value: ir.Value | None, atoms: list[int]) -> None:
        if value is not None:
            self.layouts[value] = [self.atoms.find(a) for a in atoms]

    def size(self, atom: int) -> int | None:
        return self.atoms.size(atom)

    def same(self, a: int, b: int, why: str = "") -> bool:
        """Unify two atoms; on conflict freeze both (with the reason) instead of failing the analysis."""
        try:
            self.atoms.unify(a, b)
            return True
        except Unresolvable as exc:
            reason = f"{self.where()}: {why or 'index structures disagree'} ({exc})"
            self.atoms.freeze(a, reason)
            self.atoms.freeze(b, reason)
            return False

    def couple(self, x: ir.Value, ax: int, y: ir.Value, ay: int, mapping: str = "identity") -> None:
        """Record an edge between two channel spaces and unify their atoms (for identity mappings)."""
        lx, ly = self.L(x), self.L(y)
        self.edge(x, ax, y, ay, mapping)
        self.same(lx[ax], ly[ay], mapping)

    def edge(self, x: ir.Value, ax: int, y: ir.Value, ay: int, mapping: str) -> None:
        n = len(self.layouts.get(x) or ()) or 1
        m = len(self.layouts.get(y) or ()) or 1
        self.nx.add_edge((x.name, ax % n), (y.name, ay % m), op=self.node.op_type if self.node else "",
                         node=self.node.name if self.node else "", mapping=mapping)

    def freeze_value(self, value: ir.Value | None, reason: str) -> None:
        if value is None:
            return
        try:
            lay = self.L(value)
        except RuleError:
            return
        for a in lay:
            self.atoms.freeze(a, reason)

    def tag(self, atom: int, tag: str) -> None:
        for leaf in self.atoms.leaves(atom):
            self.atoms.tag(leaf, tag)

    def where(self) -> str:
        return f"{self.node.op_type} '{self.node.name}'" if self.node is not None else "graph"

    # -- shape tensors -------------------------------------------------------------------------------
    def entries(self, value: ir.Value | None) -> list[Entry] | None:
        """Elements of a 1-D (or scalar) int shape tensor: literals, axis sizes (refs) or unknowns."""
        if value is None:
            return None
        if value in self._entries:
            return self._entries[value]
        out = self._compute_entries(value)
        self._entries[value] = out
        return out

    def _compute_entries(self, value: ir.Value) -> list[Entry] | None:
        arr = _constant(value)
        if arr is not None:
            if arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer):
                return None
            return [Entry("lit", int(x)) for x in arr.reshape(-1)]
        node = value.producer()
        unknown = self._unknown_entries(value)
        if node is None or node.domain not in ("", "ai.onnx"):
            return unknown
        op = node.op_type
        if op == "Shape":
            lay = self.layouts.get(node.inputs[0])
            if lay is None:
                return unknown
            r = len(lay)
            start, end = _attr(node, "start", 0), _attr(node, "end", r)
            start, end = _clamp_index(start, r), _clamp_index(end, r)
            return [Entry("ref", atom=self.atoms.find(a)) for a in lay[start:end]]
        if op == "Concat":
            parts = [self.entries(i) for i in node.inputs]
            if any(p is None for p in parts):
                return unknown
            return [e for p in parts for e in p]
        if op in ("Squeeze", "Unsqueeze", "Cast", "Identity", "Reshape", "Flatten"):
            inner = self.entries(node.inputs[0])
            n = self._static_numel(value)
            if inner is not None and (n is None or n == len(inner)):
                return inner
            return unknown
        if op == "Gather":
            inner = self.entries(node.inputs[0])
            idx = _constant(node.inputs[1])
            if inner is None or idx is None:
                return unknown
            try:
                return [inner[int(i)] for i in idx.reshape(-1)]
            except IndexError:
                return unknown
        if op == "Slice":
            inner = self.entries(node.inputs[0])
            bounds = _slice_bounds(node, self.opset)
            if inner is None or bounds is None:
                return unknown
            starts, ends, axes, steps = bounds
            if list(axes) not in ([0], [-1]):
                return unknown
            return inner[int(starts[0]):int(ends[0]):int(steps[0])]
        return unknown

    def _static_numel(self, value: ir.Value) -> int | None:
        shape = self.inferred.get(value.name)
        if shape is None or any(d is None for d in shape):
            return None
        return int(math.prod(shape))

    def _unknown_entries(self, value: ir.Value) -> list[Entry] | None:
        n = self._static_numel(value)
        return None if n is None else [Entry("unknown")] * n

    def pieces(self, value: ir.Value) -> list[ShapePiece]:
        """How a shape tensor is assembled: whole (all literal) or the inputs of its Concat."""
        entries = self.entries(value) or []
        if all(e.kind == "lit" for e in entries):
            return [ShapePiece(None, entries)]
        node = value.producer()
        if node is not None and node.op_type == "Concat" and node.domain in ("", "ai.onnx"):
            return [ShapePiece(i, self.entries(i) or []) for i in node.inputs]
        return [ShapePiece(value, entries)]

    def shape_site(self, node: ir.Node, index: int, out: ir.Value, first_axis: int) -> None:
        """Record a shape input whose size literals follow the output's axes from `first_axis` on; freeze the
        axes whose literal cannot be rewritten."""
        shape = node.inputs[index]
        pieces = self.pieces(shape)
        out_lay = self.L(out)
        j = first_axis
        for piece in pieces:
            for e in piece.entries:
                if e.kind == "lit" and not piece.rewritable and 0 <= j < len(out_lay) and e.value not in (0, -1, 1):
                    self.atoms.freeze(out_lay[j], f"{self.where()}: its shape literal {e.value} is not a constant "
                                                  "that can be rewritten")
                j += 1
        self.sites.append(Site(node, "shape", {"index": index, "out": out, "first_axis": first_axis,
                                               "pieces": pieces}))

    # -- the walk ------------------------------------------------------------------------------------
    def run(self) -> None:
        for v in self.graph.inputs:
            if v.const_value is not None:
                continue  # an initializer listed as an input (old opsets): a constant
            shape = self.inferred.get(v.name)
            if shape is None:
                self.layouts[v] = None
                continue
            self.layouts[v] = [self.atoms.new(d, f"model input '{v.name}'", f"input '{v.name}'") for d in shape]
        for node in self.graph:
            self.node = node
            self.apply(node)
        self.node = None
        for v in self.graph.outputs:
            self.freeze_value(v, f"model output '{v.name}'")
        self._check_shape_reads()

    def apply(self, node: ir.Node) -> None:
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        has_subgraph = any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
        if rule is None or has_subgraph:
            local = (node.domain, node.op_type, node.overload) in self.model.functions
            what = f"function {node.op_type}" if local else f"unknown op {node.domain + '::' if node.domain not in ('', 'ai.onnx') else ''}{node.op_type}"
            self.unknown(node, what)
            return
        try:
            rule(self, node)
        except RuleError as exc:
            self.unknown(node, f"{node.op_type} not understood ({exc})")
            return
        for out in node.outputs:
            if out is not None and out.name and out not in self.layouts:
                self.unknown(node, f"{node.op_type} output '{out.name}' not described")
                return
        self._check_sizes(node)

    def unknown(self, node: ir.Node, reason: str) -> None:
        key = reason.split(" (")[0]
        self.unknown_ops[key] = self.unknown_ops.get(key, 0) + 1
        self.failed.add(node)
        full = f"{reason} at '{node.name}'"
        for v in node.inputs:
            self.freeze_value(v, full)
        for attr in node.attributes.values():  # values captured by subgraphs
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (attr.value if attr.type == ir.AttributeType.GRAPHS else [])
            for g in graphs:
                for inner in ir.traversal.RecursiveGraphIterator(g):
                    for v in inner.inputs:
                        if v is not None and v in self.layouts:
                            self.freeze_value(v, full)
        for out in node.outputs:
            shape = self.inferred.get(out.name) if out is not None else None
            if out is None:
                continue
            self.layouts[out] = None if shape is None else [self.atoms.new(d, full) for d in shape]

    def _check_sizes(self, node: ir.Node) -> None:
        """Defensive: a rule's output sizes must agree with ONNX shape inference where both are static."""
        for out in node.outputs:
            lay = self.layouts.get(out) if out is not None else None
            shape = self.inferred.get(out.name) if out is not None else None
            if lay is None or shape is None:
                continue
            bad = len(lay) != len(shape) or any(d is not None and self.size(a) is not None and self.size(a) != d
                                                for a, d in zip(lay, shape))
            if bad:
                msg = (f"{self.where()}: analysis sizes {[self.size(a) for a in lay]} disagree with shape inference "
                       f"{list(shape)} for '{out.name}'")
                self.problems.append(msg)
                for a in lay:
                    self.atoms.freeze(a, msg)

    def _check_shape_reads(self) -> None:
        """Sizes read by Shape may only flow into shape inputs we rewrite or that follow the data."""
        passthrough = {"Concat", "Gather", "Slice", "Squeeze", "Unsqueeze", "Cast", "Identity"}
        terminals = {("Reshape", 1), ("Expand", 1), ("ConstantOfShape", 0)}
        for shape_node in self.shape_nodes:
            bad = None
            stack, seen = [shape_node.outputs[0]], set()
            while stack and bad is None:
                v = stack.pop()
                if v in seen:
                    continue
                seen.add(v)
                if v.is_graph_output():
                    bad = "a model output"
                for user, idx in v.uses():
                    if (user.op_type, idx) in terminals and user not in self.failed:
                        continue
                    if user.op_type in passthrough and idx == 0 or (user.op_type == "Concat"):
                        stack.extend(user.outputs)
                    elif user.op_type == "Reshape" and idx == 0:
                        stack.extend(user.outputs)
                    else:
                        bad = f"{user.op_type} '{user.name}'"
                        break
            if bad is not None:
                lay = self.layouts.get(shape_node.inputs[0]) or []
                r = len(lay)
                start = _clamp_index(_attr(shape_node, "start", 0), r)
                end = _clamp_index(_attr(shape_node, "end", r), r)
                for a in lay[start:end]:
                    if self.size(a) is not None:
                        self.atoms.freeze(a, f"its size is read by Shape '{shape_node.name}' and used by {bad}")

    # -- results -------------------------------------------------------------------------------------
    def result(self) -> ChannelGroups:
        self.problems.extend(self.atoms.finalize())
        members: dict[int, list[Member]] = {}
        order: dict[int, int] = {}
        roles: dict[tuple[ir.Value, int], str] = {}
        for use in self.weight_uses:
            if use.out_axis is not None:
                roles.setdefault((use.weight, use.out_axis), f"{use.role} out")
            if use.in_axis is not None:
                roles.setdefault((use.weight, use.in_axis), f"{use.role} in")
        for value, lay in self.layouts.items():
            if lay is None or not is_constant(value):
                continue
            for axis, atom in enumerate(lay):
                if (value, axis) in self.not_channels:
                    continue
                pos = self.atoms.positions(atom)
                if pos is None:
                    continue
                for leaf in pos:
                    role = roles.get((value, axis)) or ("vector" if len(lay) == 1 else "constant")
                    members.setdefault(leaf, []).append(Member(value, axis, role))
                    order.setdefault(leaf, len(order))
        groups = []
        for leaf in sorted(members, key=order.get):
            size = self.atoms.size(leaf)
            if size is None or size <= 1:
                continue
            tags = self.atoms.tags.get(leaf, set())
            kind = _kind(tags)
            frozen = list(self.atoms.frozen.get(leaf, []))
            mem = sorted(members[leaf], key=lambda m: (not m.role.startswith(("matmul", "gemm", "conv", "embedding", "norm")),))
            groups.append(ChannelGroup(len(groups), leaf, size, kind, frozen, mem))
        return ChannelGroups(self.model, self.atoms, self.layouts, groups, self.weight_uses, self.sites, self.nx,
                             self.unknown_ops, self.problems)


def _kind(tags: set[str]) -> str:
    if "heads" in tags:
        return "heads"
    if "head_group" in tags:
        return "head_group"
    if "head_dim" in tags:
        return "head_dim"
    if "conv_groups" in tags:
        return "conv_groups"
    if "channels" in tags:
        return "channels"
    if "norm" in tags or "embedding" in tags:
        return "hidden"
    if "in_features" in tags and "out_features" in tags:
        return "ffn"
    return "other"


def _clamp_index(i: int, n: int) -> int:
    i = int(i)
    if i < 0:
        i += n
    return max(0, min(n, i))


def _slice_bounds(node: ir.Node, opset: int):
    """(starts, ends, axes, steps) as int arrays when constant, else None."""
    if len(node.inputs) >= 3 or opset >= 10 and "starts" not in node.attributes:
        starts, ends = _constant(node.inputs[1]) if len(node.inputs) > 1 else None, _constant(node.inputs[2]) if len(node.inputs) > 2 else None
        if starts is None or ends is None:
            return None
        axes = _constant(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else np.arange(len(starts))
        steps = _constant(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.ones(len(starts), np.int64)
        if axes is None or steps is None:
            return None
        return starts.reshape(-1), ends.reshape(-1), axes.reshape(-1), steps.reshape(-1)
    starts, ends = _attr(node, "starts"), _attr(node, "ends")
    if starts is None or ends is None:
        return None
    axes = _attr(node, "axes", list(range(len(starts))))
    return np.asarray(starts), np.asarray(ends), np.asarray(axes), np.ones(len(starts), np.int64)


def _axes_arg(b: Builder, node: ir.Node, rank: int, input_index: int = 1, attr: str = "axes") -> list[int] | None:
    """Axes from an attribute (old opsets) or a constant input; None when absent."""
    if attr in node.attributes:
        axes = list(_attr(node, attr))
    elif len(node.inputs) > input_index and node.inputs[input_index] is not None:
        arr = _constant(node.inputs[input_index])
        if arr is None:
            raise RuleError("axes are not constant")
        axes = [int(a) for a in arr.reshape(-1)]
    else:
        return None
    return [a % rank if rank else 0 for a in axes]


# ---------------------------------------------------------------------------------------------- rules

RULES: dict[str, Callable[[Builder, ir.Node], None]] = {}


def rule(*ops: str):
    def deco(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return deco


UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
         "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Floor",
         "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh",
         "Atanh", "Not", "IsNaN", "IsInf", "ThresholdedRelu", "Identity", "Cast", "Shrink", "BitwiseNot",
         "LRN", "Softmax", "LogSoftmax", "Hardmax")


@rule(*UNARY)
def _unary(b: Builder, node: ir.Node) -> None:
    """Every output position depends on the same position of the input (LRN and Softmax: on a window or the
    whole axis, which a pruned axis simply shortens)."""
    x = node.inputs[0]
    lay = b.L(x)
    for out in node.outputs[:1]:
        b.set(out, lay)
        for k in range(len(lay)):
            b.edge(x, k, out, k, node.op_type.lower() if node.op_type in ("LRN", "Softmax", "LogSoftmax", "Hardmax") else "identity")


@rule("CastLike")
def _cast_like(b: Builder, node: ir.Node) -> None:
    b.set(node.outputs[0], b.L(node.inputs[0]))


@rule("Dropout")
def _dropout(b: Builder, node: ir.Node) -> None:
    lay = b.L(node.inputs[0])
    for out in node.outputs:
        if out is not None:
            b.set(out, lay)


def broadcast(b: Builder, inputs: list[ir.Value | None], what: str = "broadcast") -> list[int]:
    """Numpy broadcasting: right-aligned axes of size other than 1 are the same index space."""
    present = [v for v in inputs if v is not None]
    lays = [b.L(v) for v in present]
    r = max((len(lay) for lay in lays), default=0)
    out: list[int] = []
    for k in range(r):
        cands = [(v, lay[len(lay) - r + k], len(lay) - r + k) for v, lay in zip(present, lays) if len(lay) - r + k >= 0]
        non1 = [(v, a, ax) for v, a, ax in cands if b.atoms.mono(a) != ONE]
        if not non1:
            out.append(cands[0][1])
            continue
        v0, a0, ax0 = non1[0]
        for v, a, ax in non1[1:]:
            b.edge(v0, ax0, v, ax, what)
            b.same(a0, a, what)
        out.append(b.atoms.find(a0))
    return out


BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Equal", "Less", "LessOrEqual", "Greater",
          "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "Where", "BitShift", "BitwiseAnd", "BitwiseOr",
          "BitwiseXor")


@rule(*BINARY)
def _binary(b: Builder, node: ir.Node) -> None:
    lay = broadcast(b, list(node.inputs))
    b.set(node.outputs[0], lay)
    for v in node.inputs:
        if v is not None:
            lv = b.L(v)
            for k in range(len(lv)):
                if b.atoms.mono(lv[k]) != ONE:
                    b.edge(v, k, node.outputs[0], len(lay) - len(lv) + k, "broadcast")


@rule("Clip")
def _clip(b: Builder, node: ir.Node) -> None:
    lay = broadcast(b, list(node.inputs))
    b.set(node.outputs[0], lay)


@rule("Constant")
def _constant_rule(b: Builder, node: ir.Node) -> None:
    b.L(node.outputs[0])


@rule("ConstantOfShape")
def _constant_of_shape(b: Builder, node: ir.Node) -> None:
    entries = b.entries(node.inputs[0])
    if entries is None:
        raise RuleError("its shape is computed by unsupported ops")
    lay = []
    for e in entries:
        if e.kind == "lit":
            lay.append(b.new(e.value))
        elif e.kind == "ref":
            lay.append(e.atom)
        else:
            lay.append(b.new(None, f"{b.where()}: size computed by unsupported ops"))
    b.set(node.outputs[0], lay)
    b.shape_site(node, 0, node.outputs[0], 0)


@rule("Shape")
def _shape(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.layouts.get(x)
    if lay is None:
        raise RuleError(f"the rank of '{x.name}' is unknown")
    r = len(lay)
    n = _clamp_index(_attr(node, "end", r), r) - _clamp_index(_attr(node, "start", 0), r)
    b.set(node.outputs[0], [b.new(max(n, 0), "a shape vector")])
    b.shape_nodes.append(node)


@rule("Size")
def _size(b: Builder, node: ir.Node) -> None:
    b.freeze_value(node.inputs[0], f"{b.where()}: reads the element count")
    b.set(node.outputs[0], [])


@rule("Range", "RandomNormal", "RandomUniform", "NonZero", "RandomNormalLike", "RandomUniformLike", "EyeLike", "Multinomial")
def _source(b: Builder, node: ir.Node) -> None:
    """Outputs whose sizes come from data or attributes: fresh, frozen index spaces."""
    if node.op_type.endswith("Like"):
        b.freeze_value(node.inputs[0], f"{b.where()}: its shape is copied")
    for out in node.outputs:
        shape = b.inferred.get(out.name)
        if shape is None:
            raise RuleError("output rank unknown")
        b.set(out, [b.new(d, f"{b.where()}: data-dependent") for d in shape])


@rule("Transpose")
def _transpose(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    perm = _attr(node, "perm", list(reversed(range(len(lay)))))
    b.set(node.outputs[0], [lay[p] for p in perm])
    for k, p in enumerate(perm):
        b.edge(x, p, node.outputs[0], k, "transpose")


@rule("Unsqueeze")
def _unsqueeze(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    if "axes" in node.attributes:
        raw = list(_attr(node, "axes"))
    else:
        arr = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if arr is None:
            raise RuleError("axes are not constant")
        raw = [int(a) for a in arr.reshape(-1)]
    r = len(lay) + len(raw)
    axes = {a % r for a in raw}
    it = iter(lay)
    b.set(node.outputs[0], [b.new(1) if k in axes else next(it) for k in range(r)])


@rule("Squeeze")
def _squeeze(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    axes = _axes_arg(b, node, len(lay))
    if axes is None:
        axes = [k for k, a in enumerate(lay) if b.size(a) == 1]
        if any(b.size(a) is None for a in lay):
            raise RuleError("squeezing unspecified axes of dynamic size")
    b.set(node.outputs[0], [a for k, a in enumerate(lay) if k not in axes])


@rule("Flatten")
def _flatten(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    axis = _attr(node, "axis", 1) % (len(lay) + 1) if lay else 0
    out = [b.atoms.make_product(lay[:axis]), b.atoms.make_product(lay[axis:])]
    b.set(node.outputs[0], out)
    for k in range(len(lay)):
        b.edge(x, k, node.outputs[0], 0 if k < axis else 1, "flatten (product)")


@rule("Reshape")
def _reshape(b: Builder, node: ir.Node) -> None:
    x, shape = node.inputs[0], node.inputs[1]
    lay = b.L(x)
    entries = b.entries(shape)
    if entries is None or any(e.kind == "unknown" for e in entries):
        raise RuleError("its target shape is computed by unsupported ops")
    allowzero = _attr(node, "allowzero", 0)
    specs: list[tuple] = []
    for j, e in enumerate(entries):
        if e.kind == "ref":
            specs.append(("atom", e.atom))
        elif e.value == 0 and not allowzero:
            if j >= len(lay):
                raise RuleError("0 entry beyond the input rank")
            specs.append(("atom", lay[j]))
        elif e.value == -1:
            specs.append(("infer",))
        else:
            specs.append(("lit", e.value))
    out = reshape_layout(b, x, lay, specs, node.outputs[0])
    b.set(node.outputs[0], out)
    b.shape_site(node, 1, node.outputs[0], 0)


def reshape_layout(b: Builder, x: ir.Value, lay: list[int], specs: list[tuple], y: ir.Value) -> list[int]:
    """Align input and output axes into groups of equal size products and unify each group's products."""
    atoms = b.atoms
    total = ONE
    for a in lay:
        total = mono_mul(total, atoms.mono(a))
    known = ONE
    for s in specs:
        if s[0] == "atom":
            known = mono_mul(known, atoms.mono(s[1]))
        elif s[0] == "lit":
            known = mono_mul(known, (s[1], ()))
    out_monos = []
    for s in specs:
        if s[0] == "atom":
            out_monos.append(atoms.mono(s[1]))
        elif s[0] == "lit":
            out_monos.append((s[1], ()))
        else:
            q = mono_div(total, known)
            if q is None:
                raise RuleError("cannot infer the -1 dimension")
            out_monos.append(q)
    out: list[int | None] = [None] * len(specs)
    i = j = 0
    n_in, n_out = len(lay), len(specs)
    while i < n_in or j < n_out:
        if i < n_in and atoms.mono(lay[i]) == ONE:
            i += 1
            continue
        if j < n_out and out_monos[j] == ONE:
            out[j] = specs[j][1] if specs[j][0] == "atom" else b.new(1)
            j += 1
            continue
        if i >= n_in or j >= n_out:
            raise RuleError("input and output sizes do not align")
        gi, gj = [i], [j]
        pi, pj = atoms.mono(lay[i]), out_monos[j]
        if _same_dynamic(b, pi, pj):  # two names for one dynamic size (batch of input_ids and of the mask)
            pi, pj = atoms.mono(lay[i]), atoms.mono(specs[j][1]) if specs[j][0] == "atom" else pj
        i, j = i + 1, j + 1
        while pi != pj:
            if mono_div(pj, pi) is not None and i < n_in:
                pi = mono_mul(pi, atoms.mono(lay[i]))
                gi.append(i)
                i += 1
            elif mono_div(pi, pj) is not None and j < n_out:
                pj = mono_mul(pj, out_monos[j])
                gj.append(j)
                j += 1
            elif pi[1] == pj[1] and pi[0] < pj[0] and i < n_in:
                pi = mono_mul(pi, atoms.mono(lay[i]))
                gi.append(i)
                i += 1
            elif pi[1] == pj[1] and pj[0] < pi[0] and j < n_out:
                pj = mono_mul(pj, out_monos[j])
                gj.append(j)
                j += 1
            else:
                raise RuleError("input and output sizes do not align")
        in_part = atoms.make_product([lay[k] for k in gi])
        if len(gj) == 1 and specs[gj[0]][0] == "infer":
            out[gj[0]] = in_part
        else:
            for k in gj:
                if specs[k][0] == "atom":
                    out[k] = specs[k][1]
                elif specs[k][0] == "lit":
                    out[k] = b.new(specs[k][1])
                elif out_monos[k][1]:
                    out[k] = _infer_dynamic(b, out_monos[k], k == gj[0], k == gj[-1], [lay[i] for i in gi])
                else:
                    out[k] = b.new(out_monos[k][0])
            b.same(in_part, atoms.make_product([out[k] for k in gj]), "reshape")
        mapping = "reshape " + ("split" if len(gj) > len(gi) else "merge" if len(gi) > len(gj) else "identity")
        for a in gi:
            for c in gj:
                b.edge(x, a, y, c, mapping)
    while i < n_in:  # trailing size-1 input axes
        i += 1
    return [atoms.find(a) for a in out]


def _infer_dynamic(b: Builder, mono, first: bool, last: bool, group: list[int]) -> int:
    """The atom of a -1 output axis whose size involves one dynamic size (torch's multi-head attention reshapes
    [seq, batch, hidden] to [seq, -1, head_dim], -1 = batch x heads): the dynamic leaf itself, or its product with
    a new static factor, ordered as the dynamic leaf sits in the input axes it comes from (first or last)."""
    coef, syms = mono
    if len(syms) != 1:
        raise RuleError("a -1 dimension spans several dynamic sizes")
    leaf = b.atoms.find(syms[0])
    if coef == 1:
        return leaf
    flat = [b.atoms.find(f) for a in group for f in b.atoms.product_factors(a)]
    if first and flat and flat[0] == leaf:
        return b.atoms.make_product([leaf, b.new(coef)])
    if last and flat and flat[-1] == leaf:
        return b.atoms.make_product([b.new(coef), leaf])
    raise RuleError("a -1 dimension shares a dynamic group")


def _same_dynamic(b: Builder, pi, pj) -> bool:
    """When two sizes differ only in one dynamic symbol each, unify those dynamic leaves (they must be equal
    for the reshape to be valid as aligned); returns whether anything was unified."""
    if pi == pj or pi[0] != pj[0] or len(pi[1]) != len(pj[1]):
        return False
    only_i = list(pi[1])
    only_j = list(pj[1])
    for s in pi[1]:
        if s in only_j:
            only_i.remove(s)
            only_j.remove(s)
    if len(only_i) == 1 and len(only_j) == 1:
        return b.same(only_i[0], only_j[0], "dynamic size")
    return False


@rule("Expand")
def _expand(b: Builder, node: ir.Node) -> None:
    x, shape = node.inputs[0], node.inputs[1]
    lay = b.L(x)
    entries = b.entries(shape)
    if entries is None:
        raise RuleError("its target shape is unknown")
    r = max(len(lay), len(entries))
    out = []
    for k in range(r):
        ix, ie = k - (r - len(lay)), k - (r - len(entries))
        a = lay[ix] if ix >= 0 else None
        e = entries[ie] if ie >= 0 else None
        a_is_1 = a is None or b.atoms.mono(a) == ONE
        if e is None or (e.kind == "lit" and e.value == 1):
            out.append(a if a is not None else b.new(1))
        elif a_is_1:
            if e.kind == "lit":
                out.append(b.new(e.value))
            elif e.kind == "ref":
                out.append(e.atom)
            else:
                out.append(b.new(None, f"{b.where()}: broadcast to a size computed by unsupported ops"))
        else:
            if e.kind == "ref":
                b.same(a, e.atom, "expand")
            elif e.kind == "unknown":
                b.atoms.freeze(a, f"{b.where()}: target size computed by unsupported ops")
            out.append(a)
            b.edge(x, ix, node.outputs[0], k, "identity")
    b.set(node.outputs[0], out)
    b.shape_site(node, 1, node.outputs[0], r - len(entries))


@rule("Tile")
def _tile(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    reps = _constant(node.inputs[1])
    if reps is None:
        raise RuleError("repeats are not constant")
    out = []
    for a, rep in zip(lay, reps.reshape(-1)):
        if int(rep) == 1:
            out.append(a)
        else:
            b.atoms.freeze(a, f"{b.where()}: tiled")
            s = b.size(a)
            out.append(b.new(None if s is None else s * int(rep), f"{b.where()}: tiled"))
    b.set(node.outputs[0], out)


@rule("Pad")
def _pad(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    r = len(lay)
    pads = _constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else np.asarray(_attr(node, "pads", []))
    if pads is None:
        raise RuleError("pads are not constant")
    pads = [int(p) for p in pads.reshape(-1)]
    axes = _axes_arg(b, node, r, 3, "__none__") if len(node.inputs) > 3 else None
    axes = axes if axes is not None else list(range(r))
    before, after = dict(zip(axes, pads[:len(axes)])), dict(zip(axes, pads[len(axes):]))
    out = []
    for k, a in enumerate(lay):
        if before.get(k, 0) == 0 and after.get(k, 0) == 0:
            out.append(a)
            b.edge(x, k, node.outputs[0], k, "identity")
        else:
            b.atoms.freeze(a, f"{b.where()}: padded axis")
            s = b.size(a)
            out.append(b.new(None if s is None else s + before.get(k, 0) + after.get(k, 0), f"{b.where()}: padded axis"))
    b.set(node.outputs[0], out)


def _spatial_op(b: Builder, node: ir.Node, channel_axes: int = 2) -> None:
    """N and C pass through; the remaining (spatial) axes are new, frozen index spaces."""
    x = node.inputs[0]
    lay = b.L(x)
    shape = b.inferred.get(node.outputs[0].name)
    out = list(lay[:channel_axes])
    for k in range(channel_axes, len(lay)):
        d = shape[k] if shape is not None and len(shape) == len(lay) else None
        out.append(b.new(d, f"{b.where()}: spatial axis"))
    b.set(node.outputs[0], out)
    for k in range(min(channel_axes, len(lay))):
        b.edge(x, k, node.outputs[0], k, "identity")


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxUnpool")
def _pool(b: Builder, node: ir.Node) -> None:
    _spatial_op(b, node)
    if len(node.outputs) > 1 and node.outputs[1] is not None:  # MaxPool indices are flat positions
        b.freeze_value(node.inputs[0], f"{b.where()}: returns flat indices")
        b.set(node.outputs[1], b.L(node.outputs[0]))


@rule("Resize", "Upsample")
def _resize(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    shape = b.inferred.get(node.outputs[0].name)
    sizes = _constant(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    out = []
    for k, a in enumerate(lay):
        d = shape[k] if shape is not None and len(shape) == len(lay) else None
        if d is not None and d == b.size(a) and sizes is None:
            out.append(a)
            b.edge(x, k, node.outputs[0], k, "identity")
        else:
            b.atoms.freeze(a, f"{b.where()}: resized axis")
            out.append(b.new(d, f"{b.where()}: resized axis"))
    b.set(node.outputs[0], out)


@rule("Conv", "ConvTranspose")
def _conv(b: Builder, node: ir.Node) -> None:
    """Conv W [O, C/g, k...], ConvTranspose W [C, O/g, k...]. With g groups, input channels are
    groups x channels-per-group and so are output channels: the group index is shared by both."""
    x, w = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    xl, wl = b.L(x), b.L(w)
    group = int(_attr(node, "group", 1))
    y = node.outputs[0]
    transpose = node.op_type == "ConvTranspose"
    in_axis, out_axis = (0, 1) if transpose else (1, 0)  # weight axes of input and output channels
    c_in = xl[1]
    if group == 1:
        b.couple(x, 1, w, in_axis, "conv input channels")
        out_ch = wl[out_axis]
    else:
        g = b.new(group)
        cin, per_out = b.size(c_in), b.size(wl[out_axis])
        if cin is None or cin % group or per_out is None:
            raise RuleError("input channels not divisible by groups")
        if transpose:  # W axis 0 holds all input channels, axis 1 the outputs of one group
            b.same(wl[0], b.atoms.make_product([g, b.new(cin // group)]), "grouped conv input")
            b.same(c_in, wl[0], "conv input channels")
            out_ch = b.atoms.make_product([g, wl[1]])
        else:  # W axis 1 holds the inputs of one group, axis 0 all output channels
            b.same(c_in, b.atoms.make_product([g, wl[1]]), "grouped conv input")
            if per_out % group:
                raise RuleError("output channels not divisible by groups")
            b.same(wl[0], b.atoms.make_product([g, b.new(per_out // group)]), "grouped conv output")
            out_ch = wl[0]
        b.edge(x, 1, w, in_axis, "grouped conv input channels")
        b.sites.append(Site(node, "group", {"atom": g}))
        if cin // group > 1:  # not depthwise: whole groups are a kind of their own
            b.tag(g, "conv_groups")
    if bias is not None:
        b.edge(bias, 0, y, 1, "conv bias")
        b.same(b.L(bias)[0], out_ch, "conv bias")
    shape = b.inferred.get(y.name)
    out = [xl[0], out_ch]
    for k in range(2, len(xl)):
        d = shape[k] if shape is not None and len(shape) == len(xl) else None
        out.append(b.new(d, f"{b.where()}: spatial axis"))
    b.set(y, out)
    b.edge(x, 0, y, 0, "identity")
    b.edge(w, out_axis, y, 1, "conv output channels")
    for a in (out_ch, c_in, wl[in_axis]):
        b.tag(a, "channels")
    for k in range(2, len(wl)):
        b.atoms.freeze(wl[k], f"{b.where()}: kernel axis")
        b.not_channels.add((w, k))
    if is_constant(w):
        b.weight_uses.append(WeightUse(node, w, "conv", in_axis, out_axis, x, 1))


@rule("BatchNormalization", "InstanceNormalization")
def _batchnorm(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    for p in node.inputs[1:]:
        if p is not None:
            b.couple(x, 1, p, 0, "per-channel parameter")
    b.set(node.outputs[0], lay)
    for out in node.outputs[1:]:
        if out is not None:
            b.set(out, [lay[1]])
    b.tag(lay[1], "channels")
    if is_constant(node.inputs[1]):
        b.weight_uses.append(WeightUse(node, node.inputs[1], "norm", None, 0, x, 1))


@rule("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
def _layernorm(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    axis = _attr(node, "axis", -1) % len(lay)
    for p in node.inputs[1:]:
        if p is not None:
            pl = b.L(p)
            for k in range(len(pl)):
                xa = len(lay) - len(pl) + k
                if xa < axis and b.atoms.mono(pl[k]) != ONE:
                    raise RuleError("parameters broadcast over unnormalized axes")
                if b.atoms.mono(pl[k]) != ONE:
                    b.couple(x, xa, p, k, "norm parameter")
    b.set(node.outputs[0], lay)
    for out in node.outputs[1:]:
        if out is not None:
            b.set(out, lay[:axis] + [b.new(1) for _ in lay[axis:]])
    for a in lay[axis:]:
        b.tag(a, "norm")
    if node.op_type != "LayerNormalization":
        b.sites.append(Site(node, "rmsnorm", {"atoms": lay[axis:]}))
    if len(node.inputs) > 1 and is_constant(node.inputs[1]):
        b.weight_uses.append(WeightUse(node, node.inputs[1], "norm", None, len(b.L(node.inputs[1])) - 1, x, -1))


@rule("GroupNormalization")
def _groupnorm(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    groups = int(_attr(node, "num_groups"))
    c = b.size(lay[1])
    if c is None or c % groups:
        raise RuleError("channels not divisible by groups")
    g = b.new(groups)
    b.same(lay[1], b.atoms.make_product([g, b.new(c // groups)]), "group norm")
    for p in node.inputs[1:3]:
        pl = b.L(p)
        if b.size(pl[0]) == groups and groups != c:
            b.same(pl[0], g, "group norm parameter (per group)")
        else:
            b.couple(x, 1, p, 0, "group norm parameter")
    b.set(node.outputs[0], lay)
    b.sites.append(Site(node, "groupnorm", {"atom": g}))
    b.tag(lay[1], "channels")


@rule("MatMul")
def _matmul(b: Builder, node: ir.Node) -> None:
    a_v, b_v = node.inputs[0], node.inputs[1]
    al, bl = b.L(a_v), b.L(b_v)
    y = node.outputs[0]
    if len(al) == 0 or len(bl) == 0:
        raise RuleError("scalar operand")
    a2 = al if len(al) > 1 else [b.new(1)] + al
    b2 = bl if len(bl) > 1 else bl + [b.new(1)]
    b.same(a2[-1], b2[-2], "matmul contracted axis")
    b.edge(a_v, len(al) - 1, b_v, max(len(bl) - 2, 0), "matmul contracted")
    batch_a, batch_b = a2[:-2], b2[:-2]
    r = max(len(batch_a), len(batch_b))
    batch = []
    for k in range(r):
        ia, ib = k - (r - len(batch_a)), k - (r - len(batch_b))
        xa = batch_a[ia] if ia >= 0 else None
        xb = batch_b[ib] if ib >= 0 else None
        if xa is not None and xb is not None and b.atoms.mono(xa) != ONE and b.atoms.mono(xb) != ONE:
            b.same(xa, xb, "matmul batch axis")
            b.edge(a_v, ia, b_v, ib, "identity")
            batch.append(xa)
        elif xa is not None and (xb is None or b.atoms.mono(xa) != ONE):
            batch.append(xa)
        else:
            batch.append(xb)
    out = batch + ([a2[-2]] if len(al) > 1 else []) + ([b2[-1]] if len(bl) > 1 else [])
    b.set(y, out)
    a_const, b_const = is_constant(a_v), is_constant(b_v)
    if b_const and len(bl) == 2:
        b.weight_uses.append(WeightUse(node, b_v, "matmul", 0, 1, a_v, -1))
        b.tag(bl[0], "in_features")
        b.tag(bl[1], "out_features")
    elif a_const and len(al) == 2:
        b.weight_uses.append(WeightUse(node, a_v, "matmul", 1, 0, b_v, -2))
        b.tag(al[1], "in_features")
        b.tag(al[0], "out_features")
    elif not a_const and not b_const and len(al) >= 3 and len(bl) >= 3:
        _tag_attention(b, batch, a2[-1])
        if not _is_scores(b, a_v):
            pass
        else:
            b.tag(b2[-1], "head_dim")


def _is_scores(b: Builder, v: ir.Value) -> bool:
    """Whether `v` is (derived from) attention probabilities: produced through Softmax."""
    seen = 0
    while v is not None and seen < 6:
        node = v.producer()
        if node is None:
            return False
        if node.op_type == "Softmax":
            return True
        v = node.inputs[0] if node.inputs else None
        seen += 1
    return False


def _tag_attention(b: Builder, batch: list[int], contracted: int) -> None:
    """Batch axes of an activation x activation product are heads; leading static leaf = heads."""
    for a in batch:
        leaves = [leaf for leaf in b.atoms.leaves(a) if b.atoms.size(leaf) not in (None, 1)]
        for k, leaf in enumerate(leaves):
            b.atoms.tag(leaf, "heads" if k == 0 else "head_group")
    if b.atoms.size(contracted) is not None:
        b.tag(contracted, "head_dim")


@rule("Gemm")
def _gemm(b: Builder, node: ir.Node) -> None:
    a_v, b_v = node.inputs[0], node.inputs[1]
    c_v = node.inputs[2] if len(node.inputs) > 2 else None
    al, bl = b.L(a_v), b.L(b_v)
    if len(al) != 2 or len(bl) != 2:
        raise RuleError("operands are not matrices")
    ta, tb = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
    m, ka = (al[1], al[0]) if ta else (al[0], al[1])
    kb, n = (bl[1], bl[0]) if tb else (bl[0], bl[1])
    b.same(ka, kb, "gemm contracted axis")
    b.edge(a_v, 0 if ta else 1, b_v, 1 if tb else 0, "gemm contracted")
    y = node.outputs[0]
    b.set(y, [m, n])
    if c_v is not None:
        cl = b.L(c_v)
        out = broadcast(b, [y, c_v], "gemm bias")
        b.set(y, out)
    if is_constant(b_v):
        b.weight_uses.append(WeightUse(node, b_v, "gemm", 1 if tb else 0, 0 if tb else 1, a_v, 0 if ta else 1))
        b.tag(kb, "in_features")
        b.tag(n, "out_features")
    elif is_constant(a_v):
        b.weight_uses.append(WeightUse(node, a_v, "gemm", 0 if ta else 1, 1 if ta else 0, b_v, 1 if tb else 0))


@rule("Einsum")
def _einsum(b: Builder, node: ir.Node) -> None:
    eq = _attr(node, "equation").replace(" ", "")
    if "..." in eq or "->" not in eq:
        raise RuleError("ellipsis or implicit output")
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    letters: dict[str, tuple[ir.Value, int, int]] = {}
    for v, term in zip(node.inputs, terms):
        lay = b.L(v)
        if len(lay) != len(term):
            raise RuleError("equation does not match ranks")
        for k, ch in enumerate(term):
            if ch in letters:
                v0, k0, a0 = letters[ch]
                if b.atoms.mono(a0) != ONE and b.atoms.mono(lay[k]) != ONE:
                    b.edge(v0, k0, v, k, f"einsum {ch}")
                    b.same(a0, lay[k], f"einsum {ch}")
                elif b.atoms.mono(a0) == ONE:
                    letters[ch] = (v, k, lay[k])
            else:
                letters[ch] = (v, k, lay[k])
    b.set(node.outputs[0], [letters[ch][2] for ch in rhs])


@rule("Attention")
def _attention(b: Builder, node: ir.Node) -> None:
    """ONNX Attention (opset 23): query heads grouped over key/value heads (q head i uses kv head i // g)."""
    q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
    ql, kl, vl = b.L(q), b.L(k), b.L(v)
    if len(ql) == 4:
        qh, kvh = b.size(ql[1]), b.size(kl[1])
        if qh is None or kvh is None or qh % kvh:
            raise RuleError("head counts unknown")
        kv = kl[1]
        b.same(vl[1], kv, "attention value heads")
        grp = b.new(qh // kvh)
        b.same(ql[1], b.atoms.make_product([kv, grp]), "grouped-query heads")
        b.same(ql[3], kl[3], "attention query/key head dim")
        hd_qk, hd_v = ql[3], vl[3]
        b.same(ql[0], kl[0], "batch")
        b.same(kl[2], vl[2], "key/value sequence")
        out = [ql[0], ql[1], ql[2], hd_v]
        heads_atom = ql[1]
    elif len(ql) == 3:
        qh, kvh = int(_attr(node, "q_num_heads", 0)), int(_attr(node, "kv_num_heads", 0))
        if not qh or not kvh or qh % kvh:
            raise RuleError("q_num_heads/kv_num_heads missing")
        nq, nk, nv = b.size(ql[2]), b.size(kl[2]), b.size(vl[2])
        if None in (nq, nk, nv) or nq % qh or nk % kvh or nv % kvh:
            raise RuleError("hidden sizes unknown")
        kv, grp = b.new(kvh), b.new(qh // kvh)
        hd_qk, hd_v = b.new(nq // qh), b.new(nv // kvh)
        b.same(ql[2], b.atoms.make_product([kv, grp, hd_qk]), "attention query heads x head dim")
        b.same(kl[2], b.atoms.make_product([kv, hd_qk]), "attention key heads x head dim")
        b.same(vl[2], b.atoms.make_product([kv, hd_v]), "attention value heads x head dim")
        b.same(ql[0], kl[0], "batch")
        b.same(kl[1], vl[1], "key/value sequence")
        out = [ql[0], ql[1], b.atoms.make_product([kv, grp, hd_v])]
        heads_atom = b.atoms.make_product([kv, grp])
    else:
        raise RuleError("inputs are neither 3-D nor 4-D")
    b.set(node.outputs[0], out)
    for idx in (4, 5):  # past key / value [B, kvh, P, hd]
        if len(node.inputs) > idx and node.inputs[idx] is not None:
            pl = b.L(node.inputs[idx])
            b.same(pl[1], kv, "past heads")
            b.same(pl[3], hd_qk if idx == 4 else hd_v, "past head dim")
    if len(node.inputs) > 3 and node.inputs[3] is not None:  # mask broadcast to [B, qh, S, T]
        ml = b.L(node.inputs[3])
        if len(ml) >= 3 and b.atoms.mono(ml[-3]) != ONE:
            b.same(ml[-3], heads_atom, "mask heads")
    for idx, hd in ((1, hd_qk), (2, hd_v)):  # present key / value
        if len(node.outputs) > idx and node.outputs[idx] is not None:
            shape = b.inferred.get(node.outputs[idx].name)
            b.set(node.outputs[idx], [ql[0], kv, b.new(shape[2] if shape and len(shape) == 4 else None, f"{b.where()}: cache length"), hd])
    if len(node.outputs) > 3 and node.outputs[3] is not None:
        shape = b.inferred.get(node.outputs[3].name)
        b.set(node.outputs[3], [ql[0], heads_atom, b.new(None, "scores"), b.new(None, "scores")])
    for a, t in ((kv, "heads"), (grp, "head_group")):
        for leaf in b.atoms.leaves(a):
            if b.atoms.size(leaf) not in (None, 1):
                b.atoms.tag(leaf, t)
    b.tag(hd_qk, "head_dim")
    b.tag(hd_v, "head_dim")
    b.sites.append(Site(node, "attention", {"q": q, "kv": kv, "grp": grp, "hd": hd_qk, "rank": len(ql)}))


REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


@rule(*REDUCE)
def _reduce(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    r = len(lay)
    axes = _axes_arg(b, node, r)
    if axes is None:
        if _attr(node, "noop_with_empty_axes", 0):
            b.set(node.outputs[0], lay)
            return
        axes = list(range(r))
    keep = _attr(node, "keepdims", 1)
    out = []
    for k, a in enumerate(lay):
        if k in axes:
            if keep:
                out.append(b.new(1))
        else:
            out.append(a)
            b.edge(x, k, node.outputs[0], len(out) - 1, "identity")
    b.set(node.outputs[0], out)
    if node.op_type == "ReduceMean" and r - 1 in axes:
        for k in axes:
            if b.size(lay[k]) is not None:
                b.tag(lay[k], "norm")
        if _is_square(x):
            b.sites.append(Site(node, "mean_of_squares", {"atoms": [lay[k] for k in axes]}))


def _is_square(v: ir.Value) -> bool:
    """x*x or x**2 of a value that is not centred by a mean (that would be a LayerNorm variance)."""
    node = v.producer()
    if node is None:
        return False
    if node.op_type == "Pow":
        e = _constant(node.inputs[1])
        base = node.inputs[0]
        if e is None or e.size != 1 or float(e.reshape(-1)[0]) != 2.0:
            return False
    elif node.op_type == "Mul" and node.inputs[0] is node.inputs[1]:
        base = node.inputs[0]
    else:
        return False
    p = base.producer()
    if p is not None and p.op_type == "Sub" and p.inputs[1] is not None and p.inputs[1].producer() is not None \
            and p.inputs[1].producer().op_type == "ReduceMean":
        return False
    return True


@rule("ArgMax", "ArgMin")
def _argmax(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    axis = _attr(node, "axis", 0) % len(lay)
    b.atoms.freeze(lay[axis], f"{b.where()}: returns positions along this axis")
    out = [b.new(1) if k == axis else a for k, a in enumerate(lay)] if _attr(node, "keepdims", 1) else [a for k, a in enumerate(lay) if k != axis]
    b.set(node.outputs[0], out)


@rule("Trilu")
def _trilu(b: Builder, node: ir.Node) -> None:
    """Zeroes by (row, column) position: the last two axes are frozen, the others pass through."""
    lay = b.L(node.inputs[0])
    for a in lay[-2:]:
        b.atoms.freeze(a, f"{b.where()}: masks by position")
    b.set(node.outputs[0], lay)


@rule("TopK", "CumSum", "ReverseSequence", "Compress", "Unique", "OneHot", "SpaceToDepth", "DepthToSpace",
      "Col2Im", "CenterCropPad", "Det", "Loop", "If", "Scan")
def _positional(b: Builder, node: ir.Node) -> None:
    raise RuleError("its result depends on positions")


@rule("QuantizeLinear", "DequantizeLinear")
def _qdq(b: Builder, node: ir.Node) -> None:
    x = node.inputs[0]
    lay = b.L(x)
    scale = b.L(node.inputs[1])
    if len(scale) == 1 and b.atoms.mono(scale[0]) != ONE:
        if int(_attr(node, "block_size", 0)):
            raise RuleError("blocked quantization")
        axis = _attr(node, "axis", 1) % len(lay)
        b.couple(x, axis, node.inputs[1], 0, "per-channel scale")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b.couple(x, axis, node.inputs[2], 0, "per-channel zero point")
    elif len(scale) > 1:
        raise RuleError("blocked quantization")
    b.set(node.outputs[0], lay)


@register_analysis("channel_groups")
def channel_groups(model: ir.Model, ctx: Any = None) -> ChannelGroups:
    """Coupled channel groups of `model`: what can be pruned together, what is frozen and why."""
    builder = Builder(model)
    builder.run()
    return builder.result()


# Rule families in their own modules (they register into RULES on import; they import this module's helpers).
from modelsurgeon.analyses import channel_index_rules  # noqa: E402,F401  Concat, Split, Slice, Gather, ScatterND
