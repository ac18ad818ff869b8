"""Least-squares refit of the layers whose inputs lost channels (`prune(reconstruct=true)`).

`Refitter` refits each such layer, in graph order, on the calibration data: its input in the pruned model (every
earlier layer already refit) is mapped onto its output in the original model. `SegmentRunner` runs both models
forward segment by segment, so each batch's live values at the current layer are all that is held; that live set
grows with the calibration set, so the refit uses the first calibration samples whose live values fit a memory
budget (`live_bytes_per_sample` measures a sample's share on the first batch) and says when it left any out.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from modelsurgeon.analyses.channel_deps import ChannelGroups, WeightUse, constant_array, is_constant
from modelsurgeon.channel_surgery import PrunePlan
from modelsurgeon.stats import human_bytes

log = logging.getLogger("modelsurgeon")

MAX_GRAM_ROWS = 8192  # rows of activations per batch and layer that enter a least-squares Gram matrix


def refit_candidates(groups: ChannelGroups, leaves: set[int]) -> list[WeightUse]:
    """Layers whose weight's input axis contains a pruned group: where activations matter."""
    out = []
    for use in groups.weight_uses:
        if use.in_axis is None or use.data is None or use.role not in ("matmul", "gemm", "conv"):
            continue
        lay = groups.layouts.get(use.weight)
        if lay is None:
            continue
        if leaves & set((groups.atoms.positions(lay[use.in_axis]) or {})):
            out.append(use)
    return out


def conv_patches(x: np.ndarray, node: ir.Node, w_shape: tuple[int, ...]) -> np.ndarray:
    """im2col of an NC(H)(W) input for an ungrouped Conv: [rows, C * prod(kernel)], (c, k...) order."""
    spatial = x.ndim - 2
    kernel = tuple(w_shape[2:])
    attrs = {k: a.value for k, a in node.attributes.items()}
    strides = tuple(attrs.get("strides", (1,) * spatial))
    dil = tuple(attrs.get("dilations", (1,) * spatial))
    pads = tuple(attrs.get("pads", (0,) * (2 * spatial)))
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for k in range(spatial):
            n = x.shape[2 + k]
            out = -(-n // strides[k])
            total = max(0, (out - 1) * strides[k] + (kernel[k] - 1) * dil[k] + 1 - n)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else big)
            pads_e.append(big if auto == "SAME_UPPER" else small)
        pads = tuple(pads_b + pads_e)
    if all(k == 1 for k in kernel) and all(s == 1 for s in strides) and not any(pads):
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[k], pads[k + spatial]) for k in range(spatial)])
    window = tuple((kernel[k] - 1) * dil[k] + 1 for k in range(spatial))
    view = np.lib.stride_tricks.sliding_window_view(xp, window, axis=tuple(range(2, 2 + spatial)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, strides[k]) for k in range(spatial)) \
        + tuple(slice(None, None, dil[k]) for k in range(spatial))
    view = view[index]  # [N, C, out..., k...]
    n, c = view.shape[:2]
    out_dims = view.shape[2:2 + spatial]
    view = np.moveaxis(view, 1, 1 + spatial)  # [N, out..., C, k...]
    return view.reshape(n * math.prod(out_dims), c * math.prod(kernel))


def _rows(use: WeightUse, x: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
    if use.role == "conv":
        return conv_patches(x, use.node, w_shape)
    if use.role == "gemm" and use.data_axis == 0:
        return x.T
    return x.reshape(-1, x.shape[-1])


def _group_count(node: ir.Node) -> int:
    a = node.attributes.get("group")
    return 1 if a is None else int(a.value)


# ------------------------------------------------------------------------------------------ reconstruction

def _bias_of(use: WeightUse) -> ir.Value | None:
    """The constant bias added to the layer's output (Conv B, Gemm C, MatMul followed by Add of a vector)."""
    node = use.node
    if use.role == "conv":
        b = node.inputs[2] if len(node.inputs) > 2 else None
    elif use.role == "gemm":
        b = node.inputs[2] if len(node.inputs) > 2 else None
        if b is not None and (len(b.shape or ()) != 1):
            b = None
    else:
        users = list(node.outputs[0].uses())
        b = None
        if len(users) == 1 and users[0][0].op_type == "Add":
            add = users[0][0]
            other = add.inputs[1 - users[0][1]]
            arr = constant_array(other) if is_constant(other) else None
            if arr is not None and arr.ndim == 1:
                b = other
    if b is None or not is_constant(b) or len(list(b.uses())) != 1:
        return None
    return b


def _solve_spd(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve normal equations (symmetric positive semi-definite): Cholesky, least squares if singular."""
    import scipy.linalg

    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(lhs, check_finite=False), rhs, check_finite=False)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


class Refitter:
    """Least-squares refits of the layers whose inputs lost channels, one layer at a time in graph order.

    Each layer y = x W (+ b) is refit as argmin ||x' W' + b' - (x W + b)||^2 + lam ||W' - W_kept||^2, where x is
    the layer's input in the original model and x' its (fewer-channel) input in the pruned model with every
    earlier layer already refit, on the same calibration samples: the fit absorbs the removed channels and
    everything pruned upstream, without correcting the same error twice (fitting all layers at once on
    unrefit inputs does, and diverges on deep residual nets). Both models run once over the calibration data,
    segment by segment (`SegmentRunner`), so the cost is about two forward passes plus the solves.
    """

    def __init__(self, model: ir.Model, groups: ChannelGroups, plan: PrunePlan, damp: float):
        self.plan, self.damp = plan, damp
        self.skipped: list[str] = []
        users: dict[ir.Value, int] = {}
        for u in groups.weight_uses:
            if u.role in ("matmul", "gemm", "conv"):
                users[u.weight] = users.get(u.weight, 0) + 1
        order = {node: i for i, node in enumerate(model.graph)}
        self.layers: list[WeightUse] = []
        self.original: dict[ir.Node, tuple[np.ndarray, ir.Value | None, np.ndarray | None]] = {}
        for u in sorted(refit_candidates(groups, set(plan.keep)), key=lambda u: order.get(u.node, -1)):
            if plan.axis_masks(u.weight)[u.in_axis] is None or u.node not in order:
                continue
            why = None
            if u.role == "conv" and _group_count(u.node) != 1:
                why = "grouped convolution"
            elif users.get(u.weight, 0) > 1 or len(list(u.weight.uses())) > 1:
                why = "weight shared by several layers"
            if why:
                self.skipped.append(f"{u.node.name}: {why}, not refit")
                continue
            bias = _bias_of(u)
            self.layers.append(u)
            self.original[u.node] = (np.array(constant_array(u.weight), dtype=np.float64), bias,
                                     None if bias is None else np.array(constant_array(bias), dtype=np.float64).reshape(-1))
        # positions in the original node order, and a copy of the original model (the targets)
        self.original_index = {u.node: order[u.node] for u in self.layers}
        self._original = model.clone() if self.layers else None  # shares the (never mutated) weight tensors

    def _matrix(self, u: WeightUse, w: np.ndarray) -> np.ndarray:
        """The weight as [inputs, outputs] (conv inputs ordered channel, then kernel position)."""
        if u.role == "conv":
            return np.moveaxis(w, 0, -1).reshape(w.shape[1] * math.prod(w.shape[2:]), w.shape[0])
        return w if u.in_axis == 0 else w.T

    def _row_mask(self, u: WeightUse) -> np.ndarray:
        mask = self.plan.axis_masks(u.weight)[u.in_axis]
        if u.role == "conv":
            return np.repeat(mask, math.prod(self.original[u.node][0].shape[2:]))
        return mask

    def run(self, model: ir.Model, calib, ctx, memory_bytes: float) -> dict[str, Any]:
        """Refit every layer on the first calibration samples whose live activations (both models) fit
        `memory_bytes`; notes say how many samples that was."""
        from modelsurgeon.capture import batch_size_for
        from modelsurgeon.channel_surgery import _Editor

        if not self.layers:
            return {"layers_refit": 0}
        editor = _Editor(model)
        index = {node: i for i, node in enumerate(model.graph)}
        stops = [(self.original_index[u.node], index[u.node]) for u in self.layers]
        batch_size = batch_size_for(model, 8)
        total = calib.num_samples
        notes: dict[str, Any] = {"refit_samples": total}
        if total > batch_size:  # one batch is used whatever the budget: no need to measure
            per_sample = live_bytes_per_sample((self._original, model), stops, calib)
            fit = max(batch_size, int(memory_bytes // max(per_sample, 1)) // batch_size * batch_size)
            if fit < total:
                notes["refit_samples"] = fit
                notes["refit_note"] = (f"refit on the first {fit} of {total} calibration samples: each keeps "
                                       f"{human_bytes(round(per_sample))} of activations live in the two models, "
                                       f"and refit_memory={memory_bytes / 2**30:g} GiB holds {fit}")
                log.warning("prune: %s", notes["refit_note"])
        batches = list(calib.batches(batch_size, limit=notes["refit_samples"]))
        original = SegmentRunner(self._original, batches)
        pruned = SegmentRunner(model, batches)
        rng = np.random.default_rng(0)
        for u in ctx.progress_bar(self.layers, desc="prune: refitting", total=len(self.layers)):
            xs = original.advance(self.original_index[u.node], u.data.name)
            xps = pruned.advance(index[u.node], u.data.name)
            a: dict[str, Any] = {}
            w_now_shape = constant_array(u.weight).shape
            for xo, xpo in zip(xs, xps):
                x = _rows(u, np.asarray(xo, np.float32), self.original[u.node][0].shape)
                xp = _rows(u, np.asarray(xpo, np.float32), w_now_shape)
                if len(x) > MAX_GRAM_ROWS:
                    pick = rng.choice(len(x), MAX_GRAM_ROWS, replace=False)
                    x, xp = x[pick], xp[pick]
                a["g"] = a.get("g", 0) + (xp.T @ xp).astype(np.float64)
                a["c"] = a.get("c", 0) + (xp.T @ x).astype(np.float64)
                a["sp"] = a.get("sp", 0) + xp.sum(axis=0, dtype=np.float64)
                a["s"] = a.get("s", 0) + x.sum(axis=0, dtype=np.float64)
                a["n"] = a.get("n", 0) + len(x)
            w_new, b_new = self._solve(u, a)
            editor.set_constant(u.weight, w_new)
            if b_new is not None:
                editor.set_constant(self.original[u.node][1], b_new)
        return {"layers_refit": len(self.layers), **notes}

    def _solve(self, u: WeightUse, a: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        w, bias_v, bias = self.original[u.node]
        mat = self._matrix(u, w)
        kept = np.nonzero(self._row_mask(u))[0]
        g, c, n = a["g"], a["c"], a["n"]
        lam = max(self.damp * float(np.mean(np.diag(g))), 1e-12)
        rhs = c @ mat + lam * mat[kept]  # ridge toward the original weights
        lhs = g + lam * np.eye(len(kept))
        if bias is not None:
            sp, s = a["sp"], a["s"]
            lhs = np.block([[lhs, sp[:, None]], [sp[None, :], np.array([[float(n)]])]])
            rhs = np.vstack([rhs + np.outer(sp, bias), (s @ mat + n * bias)[None, :]])
        sol = _solve_spd(lhs, rhs)
        new_mat = sol[:len(kept)]
        if u.role == "conv":
            c_kept = len(kept) // math.prod(w.shape[2:])
            new_w = np.moveaxis(new_mat.reshape(c_kept, *w.shape[2:], w.shape[0]), -1, 0)
        else:
            new_w = new_mat if u.in_axis == 0 else new_mat.T
        w_out = self.plan.prune_array(u.weight, new_w, skip_axes=(u.in_axis,)).astype(constant_array(u.weight).dtype)
        if bias is None:
            return w_out, None
        arr = constant_array(bias_v)
        b = sol[len(kept)]
        out_mask = self.plan.axis_masks(bias_v)[-1]
        if out_mask is not None:
            b = b[out_mask]
        return w_out, b.reshape(arr.shape).astype(arr.dtype)


class SegmentRunner:
    """Runs a model's nodes in consecutive segments over fixed batches, keeping each batch's live values.

    `advance(stop, name)` executes nodes [position, stop) of the graph (one ONNX Runtime session over just
    those nodes, built when asked, so constants changed since the last call are used) and returns the value
    `name` for every batch. Values no later node or output needs are dropped, so memory stays at the live set.
    """

    def __init__(self, model: ir.Model, batches: list[dict[str, np.ndarray]]):
        self.model = model
        self.nodes = list(model.graph)
        graph_inputs = {v.name for v in model.graph.inputs}
        self.state = [{k: v for k, v in feeds.items() if k in graph_inputs} for feeds in batches]
        self.pos = 0
        self.last_use: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for v in _node_inputs(node):
                self.last_use[v.name] = i
        for v in model.graph.outputs:
            self.last_use[v.name] = len(self.nodes)

    def live_after(self, stop: int) -> set[str]:
        """Names a batch's state holds once advanced to `stop` (besides the value asked for)."""
        graph_inputs = {v.name for v in self.model.graph.inputs}
        produced = graph_inputs | {v.name for n in self.nodes[:stop] for v in n.outputs if v is not None and v.name}
        return {k for k in produced if self.last_use.get(k, -1) >= stop}

    def advance(self, stop: int, name: str) -> list[np.ndarray]:
        if stop > self.pos:
            self._run(self.nodes[self.pos:stop], stop, name)
            self.pos = stop
        return [s[name] for s in self.state]

    def _run(self, nodes: list[ir.Node], stop: int, want: str) -> None:
        import onnx

        from modelsurgeon.runtime.session import make_session

        produced = {v.name for n in nodes for v in n.outputs if v is not None and v.name}
        live = self.state[0]
        inputs, inits, seen = [], [], set()
        base_dir = None  # where initializers still read from the input's data file are
        for n in nodes:
            for v in _node_inputs(n):
                if v.name in produced or v.name in seen:
                    continue
                seen.add(v.name)
                if v.name in live:
                    arr = live[v.name]
                    inputs.append(onnx.helper.make_tensor_value_info(
                        v.name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), [None] * arr.ndim))
                elif v.const_value is not None:
                    inits.append(ir.serde.serialize_tensor(v.const_value))  # external data stays a reference
                    inits[-1].name = v.name
                    if isinstance(v.const_value, ir.ExternalTensor):
                        base_dir = str(v.const_value.base_dir)
                else:
                    raise RuntimeError(f"segment input '{v.name}' is neither computed nor constant")
        keep = [v for n in nodes for v in n.outputs if v is not None and v.name
                and (self.last_use.get(v.name, -1) >= stop or v.name == want)]
        outputs = [onnx.helper.make_empty_tensor_value_info(v.name) if v.dtype is None else
                   onnx.helper.make_tensor_value_info(v.name, int(v.dtype), None) for v in keep]
        graph = onnx.helper.make_graph([ir.serde.serialize_node(n) for n in nodes], "segment", inputs, outputs, inits)
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(k, v) for k, v in
                                                              self.model.opset_imports.items()])
        proto.ir_version = self.model.ir_version or 8
        for f in self.model.functions.values():
            proto.functions.append(ir.serde.serialize_function(f))
        session = make_session(proto, base_dir=base_dir)
        in_names = [i.name for i in session.get_inputs()]
        out_names = [v.name for v in keep]
        for st in self.state:
            results = session.run(out_names, {k: st[k] for k in in_names})
            st.update(zip(out_names, results))
            for k in [k for k in st if self.last_use.get(k, -1) < stop and k != want]:
                del st[k]


def _node_inputs(node: ir.Node):
    """Values a node reads, including those its subgraphs capture from outside."""
    for v in node.inputs:
        if v is not None and v.name:
            yield v
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
        for g in graphs:
            inner = {v.name for n in ir.traversal.RecursiveGraphIterator(g) for v in n.outputs}
            inner |= {v.name for v in g.inputs} | set(g.initializers)
            for n in ir.traversal.RecursiveGraphIterator(g):
                for v in n.inputs:
                    if v is not None and v.name and v.name not in inner:
                        yield v


def live_bytes_per_sample(models: tuple[ir.Model, ir.Model], stops: list[tuple[int, int]], calib) -> float:
    """Bytes per calibration sample that two `SegmentRunner`s over `models`, advanced together through `stops`
    (a position in each), hold at most: the live values at each stop, measured on the first batch."""
    from modelsurgeon.capture import ActivationCapture, batch_size_for

    most = 0.0
    sizes = []
    for k, model in enumerate(models):
        feeds = next(calib.batches(batch_size_for(model, 1)))
        runner = SegmentRunner(model, [feeds])
        live = [runner.live_after(s[k]) for s in stops]
        state = runner.state[0]
        computed = sorted(set().union(*live) - set(state))
        arrays = dict(state)
        if computed:
            arrays.update(ActivationCapture(model, computed).run(state))
        samples = max((len(a) for a in feeds.values() if np.ndim(a)), default=1)
        sizes.append([sum(_nbytes(arrays[n]) for n in names) / samples for names in live])
    for i in range(len(stops)):
        most = max(most, sum(s[i] for s in sizes))
    return most


def _nbytes(value) -> int:
    """Bytes of a value ONNX Runtime returned: an array, or a list of them (a sequence)."""
    return sum(_nbytes(v) for v in value) if isinstance(value, list) else np.asarray(value).nbytes
