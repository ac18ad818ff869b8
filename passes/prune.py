"""`prune`: dependency-aware structured pruning of ONNX graphs.

Changes: removes whole channels (attention heads, FFN units, convolution channels, the residual width) from
every tensor that carries them, as the `channel_groups` analysis couples them: weights, biases, BatchNorm
statistics, norm scales, Reshape/Expand shape literals, Slice bounds, Split sizes, Conv groups and head counts
(see `modelsurgeon.channel_surgery`). Each group keeps the indices with the highest importance:

- `magnitude`: L2 (or L1, `norm=1`) norms of the weight slices of each index, each member tensor normalized to
  mean 1, summed over the group;
- `activation`: Wanda-style, |W| slices of the layers that consume the channel times the L2 norm of their
  input activation on the calibration data (magnitude where no consuming layer is known).

`reconstruct=true` refits every layer whose inputs lost channels (MatMul/Gemm with a constant weight, ungrouped
Conv) by least squares on calibration activations of the original model, bias included when the layer has
one, so its output is preserved as well as possible.

Preserves: model input and output shapes (their channels are frozen), everything in frozen groups, and the
outputs exactly when no channel is removed (ratio 0). Lossy otherwise.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from modelsurgeon.analyses.channel_deps import ChannelGroup, ChannelGroups, WeightUse, constant_array, is_constant
from modelsurgeon.channel_surgery import PrunePlan, apply_plan
from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Option, Pass, PassResult, Stage, register_pass

log = logging.getLogger("modelsurgeon")

KINDS = ("heads", "ffn", "channels", "hidden")
ROUNDED_KINDS = ("ffn", "channels", "hidden")  # `multiple` applies to these (not to head counts)
MAX_GRAM_ROWS = 8192  # rows of activations per batch and layer that enter a least-squares Gram matrix


def _ratio_check(v: float | None) -> str | None:
    if v is not None and not 0.0 <= v < 1.0:
        return "must be in [0, 1): the fraction of each group's channels to remove"
    return None


@register_pass
class PrunePass(Pass):
    name = "prune"
    summary = "structured pruning of heads, FFN units, conv channels or the hidden width, dependency-aware"
    options = {
        "ratio": Option((float, type(None)), None, "fraction of channels removed from every kind not set below",
                        check=_ratio_check),
        "heads": Option((float, type(None)), None, "fraction of attention heads removed", check=_ratio_check),
        "ffn": Option((float, type(None)), None, "fraction of FFN hidden units removed", check=_ratio_check),
        "channels": Option((float, type(None)), None, "fraction of convolution channels removed", check=_ratio_check),
        "hidden": Option((float, type(None)), None, "fraction of the residual width removed", check=_ratio_check),
        "multiple": Option(int, 1, "keep channel counts a multiple of this (not head counts)",
                           check=lambda v: None if v >= 1 else "must be >= 1"),
        "importance": Option(str, "magnitude", "how channels are ranked", choices=("magnitude", "activation")),
        "norm": Option(int, 2, "weight norm for importance (1 or 2)", choices=(1, 2)),
        "reconstruct": Option(bool, False, "refit layers fed by pruned channels by least squares on calibration data"),
        "damp": Option(float, 0.01, "least-squares damping, relative to the mean activation energy",
                       check=lambda v: None if v >= 0 else "must be >= 0"),
    }
    analyses = ("channel_groups",)
    stage = Stage.STRUCTURE

    def validate(self) -> None:
        c = self.config
        if c["ratio"] is None and all(c[k] is None for k in KINDS):
            raise UserError("prune: say how much to remove, e.g. prune(ratio=0.3) or prune(heads=0.25,ffn=0.3)")
        self.needs_calibration = c["importance"] == "activation" or c["reconstruct"]

    def ratios(self) -> dict[str, float]:
        c = self.config
        return {k: (c[k] if c[k] is not None else c["ratio"]) for k in KINDS
                if (c[k] if c[k] is not None else c["ratio"]) is not None}

    def run(self, model: ir.Model, ctx) -> PassResult:
        groups: ChannelGroups = ctx.analysis("channel_groups")
        ratios = self.ratios()
        targets = [g for g in groups.groups if ratios.get(g.kind, 0.0) > 0.0]
        blocked = [g for g in groups.groups if g.kind == "other" and g.frozen and _blocked_by_op(g)]
        skipped = [f"{_label(g)}: {g.frozen[0]}" for g in targets + blocked if not g.prunable]
        counts = {g.leaf: keep_count(g.size, ratios[g.kind], self.config["multiple"] if g.kind in ROUNDED_KINDS else 1)
                  for g in targets if g.prunable}
        counts = {leaf: k for leaf, k in counts.items() if k < groups.atoms.size(leaf)}
        notes: dict[str, Any] = {"groups_pruned": len(counts), "groups_frozen": len(skipped)}
        if not counts:
            return PassResult(model, False, notes, skipped)
        chosen = [g for g in targets if g.leaf in counts]
        stats = None
        if self.needs_calibration:
            calib = ctx.require_calibration(self.name)
            stats = collect_statistics(model, groups, chosen, calib, ctx, gram=self.config["reconstruct"],
                                       counts=counts)
        keep: dict[int, np.ndarray] = {}
        for g in ctx.progress_bar(chosen, desc="prune: ranking channels", total=len(chosen)):
            score = importance(groups, g, self.config["importance"], self.config["norm"], stats)
            keep[g.leaf] = top_k_mask(score, counts[g.leaf])
        plan = PrunePlan(groups, keep)
        overrides: dict[ir.Value, np.ndarray] = {}
        if self.config["reconstruct"]:
            overrides, refit_notes, refit_skipped = refit_consumers(groups, plan, stats, self.config["damp"])
            notes.update(refit_notes)
            skipped.extend(refit_skipped)
        removed: dict[str, list[int]] = {}
        for g in chosen:
            before_after = removed.setdefault(g.kind, [0, 0])
            before_after[0] += g.size
            before_after[1] += counts[g.leaf]
        apply_stats = apply_plan(model, plan, overrides)
        notes.update(apply_stats)
        for kind, (before, after) in removed.items():
            notes[f"{kind}_kept"] = f"{after}/{before}"
        return PassResult(model, True, notes, skipped)


def _blocked_by_op(g: ChannelGroup) -> bool:
    """Frozen because the analysis does not know an op on the way (worth telling the user)."""
    return any(("unknown op" in r or "not understood" in r or "function " in r) for r in g.frozen)


def _label(g: ChannelGroup) -> str:
    first = g.members[0] if g.members else None
    where = f" {first.value.name}" if first is not None else ""
    return f"group {g.id} [{g.kind}]{where}"


def keep_count(size: int, ratio: float, multiple: int = 1) -> int:
    """Channels kept: size - round(ratio * size), rounded to `multiple` where possible; never zero."""
    keep = size - int(round(ratio * size))
    if multiple > 1 and size >= multiple:
        keep = int(round(keep / multiple)) * multiple
        keep = max(multiple, min(keep, size))
    return max(1, min(keep, size))


def top_k_mask(score: np.ndarray, k: int) -> np.ndarray:
    """Keep the k highest scores (ties broken by lower index)."""
    order = np.lexsort((np.arange(len(score)), -score))
    mask = np.zeros(len(score), dtype=bool)
    mask[order[:k]] = True
    return mask


# ------------------------------------------------------------------------------------------ importance

def position_norms(array: np.ndarray, axis: int, p: int) -> np.ndarray:
    """|slice|_p of every position along `axis` (fast for broadcast constants such as ConstantOfShape)."""
    axis = axis % array.ndim
    if array.size and all(s == 0 for s in array.strides):
        v = abs(float(array.reshape(-1)[0]))
        per = array.size // array.shape[axis]
        return np.full(array.shape[axis], v * per if p == 1 else v * math.sqrt(per))
    a = np.abs(np.asarray(array, dtype=np.float64))
    other = tuple(k for k in range(a.ndim) if k != axis)
    if p == 1:
        return a.sum(axis=other) if other else a
    return np.sqrt((a * a).sum(axis=other)) if other else a


def _scatter(groups: ChannelGroups, value: ir.Value, axis: int, leaf: int, per_position: np.ndarray, size: int) -> np.ndarray:
    """Sum a per-position vector of one tensor axis onto the indices of `leaf`."""
    atom = groups.layouts[value][axis]
    out = np.zeros(size)
    for idx in (groups.atoms.positions(atom) or {}).get(leaf, []):
        valid = idx >= 0
        out += np.bincount(idx[valid], weights=per_position[valid], minlength=size)[:size]
    return out


def importance(groups: ChannelGroups, g: ChannelGroup, method: str, p: int, stats: dict | None) -> np.ndarray:
    """A score per index of the group (higher is more important)."""
    if method == "activation" and stats is not None:
        score = np.zeros(g.size)
        used = 0
        for use in groups.weight_uses:
            if use.in_axis is None or use.data is None or use.data not in stats["sumsq"]:
                continue
            lay = groups.layouts.get(use.weight)
            if lay is None or g.leaf not in (groups.atoms.positions(lay[use.in_axis]) or {}):
                continue
            w = constant_array(use.weight)
            act = np.sqrt(stats["sumsq"][use.data])
            if w is None or act.shape[0] != w.shape[use.in_axis]:
                continue
            per = position_norms(w, use.in_axis, p) * act
            contrib = _scatter(groups, use.weight, use.in_axis, g.leaf, per, g.size)
            mean = contrib.mean()
            score += contrib / mean if mean > 0 else contrib
            used += 1
        if used:
            return score
    score = np.zeros(g.size)
    for m in g.members:
        if not m.role.startswith(("matmul", "gemm", "conv", "embedding", "norm")):
            continue
        arr = constant_array(m.value)
        if arr is None or arr.ndim == 0:
            continue
        per = position_norms(arr, m.axis, p)
        contrib = _scatter(groups, m.value, m.axis, g.leaf, per, g.size)
        mean = contrib.mean()
        score += contrib / mean if mean > 0 else contrib
    return score


# ------------------------------------------------------------------------------------------ calibration statistics

def _refit_candidates(groups: ChannelGroups, leaves: set[int]) -> list[WeightUse]:
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


def collect_statistics(model: ir.Model, groups: ChannelGroups, chosen: list[ChannelGroup], calib, ctx, *,
                       gram: bool, counts: dict[int, int]) -> dict:
    """Per-channel input energy (and Gram matrices for refits) of the layers fed by the chosen groups."""
    from modelsurgeon.capture import ActivationCapture, batch_size_for

    leaves = {g.leaf for g in chosen}
    uses = [u for u in _refit_candidates(groups, leaves) if not (u.role == "conv" and _group_count(u.node) != 1)]
    names = list(dict.fromkeys(u.data.name for u in uses))
    stats: dict[str, Any] = {"sumsq": {}, "gram": {}, "sum": {}, "rows": {}}
    if not names:
        return stats
    by_name: dict[str, list[WeightUse]] = {}
    for u in uses:
        by_name.setdefault(u.data.name, []).append(u)
    cap = ActivationCapture(model, names)
    rng = np.random.default_rng(0)
    bs = batch_size_for(model, 4)
    for batch in cap.iterate(calib, bs, progress=ctx.progress_bar, desc="prune: calibrating"):
        for name, x in batch.items():
            for u in by_name[name]:
                x64 = np.asarray(x, dtype=np.float64)
                axis = u.data_axis % x64.ndim
                other = tuple(k for k in range(x64.ndim) if k != axis)
                ss = (x64 * x64).sum(axis=other)
                stats["sumsq"][u.data] = stats["sumsq"].get(u.data, 0) + ss
                if gram:
                    w = constant_array(u.weight)
                    rows = _rows(u, x64, w.shape)
                    if len(rows) > MAX_GRAM_ROWS:
                        rows = rows[rng.choice(len(rows), MAX_GRAM_ROWS, replace=False)]
                    key = u.node
                    stats["gram"][key] = stats["gram"].get(key, 0) + rows.T @ rows
                    stats["sum"][key] = stats["sum"].get(key, 0) + rows.sum(axis=0)
                    stats["rows"][key] = stats["rows"].get(key, 0) + len(rows)
    return stats


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


def refit_consumers(groups: ChannelGroups, plan: PrunePlan, stats: dict, damp: float):
    """Least-squares refits of layers whose inputs lost channels: new weight (and bias) arrays, already pruned."""
    overrides: dict[ir.Value, np.ndarray] = {}
    skipped: list[str] = []
    refit = 0
    weight_users: dict[ir.Value, int] = {}
    for u in groups.weight_uses:
        if u.role in ("matmul", "gemm", "conv"):
            weight_users[u.weight] = weight_users.get(u.weight, 0) + 1
    for use in groups.weight_uses:
        if use.node not in stats.get("gram", {}):
            continue
        masks = plan.axis_masks(use.weight)
        in_mask = masks[use.in_axis]
        if in_mask is None:
            continue
        if weight_users.get(use.weight, 0) > 1 or len(list(use.weight.uses())) > 1:
            skipped.append(f"{use.node.name}: weight shared by several layers, not refit")
            continue
        w = np.asarray(constant_array(use.weight), dtype=np.float64)
        # weight as a matrix [inputs, outputs]
        if use.role == "conv":
            k = math.prod(w.shape[2:])
            mat = np.moveaxis(w, 0, -1).reshape(w.shape[1] * k, w.shape[0])
            row_mask = np.repeat(in_mask, k)
        elif use.in_axis == 0:
            mat, row_mask = w, in_mask
        else:
            mat, row_mask = w.T, in_mask
        gram = stats["gram"][use.node]
        ssum = stats["sum"][use.node]
        n = stats["rows"][use.node]
        bias_v = _bias_of(use)
        bias = np.asarray(constant_array(bias_v), dtype=np.float64).reshape(-1) if bias_v is not None else None
        kept = np.nonzero(row_mask)[0]
        g_kk = gram[np.ix_(kept, kept)]
        rhs = gram[kept] @ mat
        lam = damp * float(np.mean(np.diag(g_kk))) if len(kept) else 0.0
        if bias is not None:
            s_k = ssum[kept]
            lhs = np.block([[g_kk + lam * np.eye(len(kept)), s_k[:, None]], [s_k[None, :], np.array([[n]])]])
            rhs = np.vstack([rhs + np.outer(s_k, bias), (ssum @ mat + n * bias)[None, :]])
        else:
            lhs = g_kk + lam * np.eye(len(kept))
        sol = _solve_spd(lhs, rhs)
        new_mat = sol[:len(kept)]
        if use.role == "conv":
            k_shape = w.shape[2:]
            new_w = np.moveaxis(new_mat.reshape(int(in_mask.sum()), *k_shape, w.shape[0]), -1, 0)
        elif use.in_axis == 0:
            new_w = new_mat
        else:
            new_w = new_mat.T
        dtype = constant_array(use.weight).dtype
        overrides[use.weight] = plan.prune_array(use.weight, new_w, skip_axes=(use.in_axis,)).astype(dtype)
        if bias is not None:
            new_b = sol[len(kept)]
            b_dtype = constant_array(bias_v).dtype
            overrides[bias_v] = plan.prune_array(bias_v, new_b.reshape(constant_array(bias_v).shape)).astype(b_dtype)
        refit += 1
    return overrides, {"layers_refit": refit}, skipped
