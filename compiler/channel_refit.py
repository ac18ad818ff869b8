"""Least-squares refit of the layers whose inputs lost channels (`prune(reconstruct=true)`).

`Refitter` refits each such layer, in graph order, on the calibration data: its input in the pruned model (every
earlier layer already refit) is mapped onto its output in the original model, both models run in step by
`modelsurgeon.segment_runner.PairedRunner` (on the first calibration samples that fit its memory budget).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from modelsurgeon.analyses.channel_deps import ChannelGroups, WeightUse, constant_array, is_constant
from modelsurgeon.channel_surgery import PrunePlan
from modelsurgeon.segment_runner import PairedRunner

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
    segment by segment (`PairedRunner`), so the cost is about two forward passes plus the solves.
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
        from modelsurgeon.channel_surgery import _Editor

        if not self.layers:
            return {"layers_refit": 0}
        editor = _Editor(model)
        index = {node: i for i, node in enumerate(model.graph)}
        stops = [(self.original_index[u.node], index[u.node]) for u in self.layers]
        runner = PairedRunner(self._original, model, stops, calib, memory_bytes, who="prune")
        rng = np.random.default_rng(0)
        for i, u in enumerate(ctx.progress_bar(self.layers, desc="prune: refitting", total=len(self.layers))):
            a: dict[str, Any] = {}
            w_now_shape = constant_array(u.weight).shape
            for xo, xpo in runner.advance(i, u.data.name):
                x = _rows(u, np.asarray(xo, np.float32), self.original[u.node][0].shape)
                xp = _rows(u, np.asarray(xpo, np.float32), w_now_shape)
                if len(x) > MAX_GRAM_ROWS:
                    pick = rng.choice(len(x), MAX_GRAM_ROWS, replace=False)
                    x, xp = x[pick], xp[pick]
                x, xp = x.astype(np.float64), xp.astype(np.float64)  # float32 sums are too coarse for the solve
                a["g"] = a.get("g", 0) + xp.T @ xp
                a["c"] = a.get("c", 0) + xp.T @ x
                a["sp"] = a.get("sp", 0) + xp.sum(axis=0, dtype=np.float64)
                a["s"] = a.get("s", 0) + x.sum(axis=0, dtype=np.float64)
                a["n"] = a.get("n", 0) + len(x)
            w_new, b_new = self._solve(u, a)
            editor.set_constant(u.weight, w_new)
            if b_new is not None:
                editor.set_constant(self.original[u.node][1], b_new)
        return {"layers_refit": len(self.layers), **runner.notes}

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
