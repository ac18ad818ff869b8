"""`prune`: dependency-aware structured pruning of ONNX graphs.

Changes: removes whole channels (attention heads, FFN units, convolution channels, the residual width) from
every tensor that carries them, as the `channel_groups` analysis couples them: weights, biases, BatchNorm
statistics, norm scales, Reshape/Expand shape literals, Slice bounds, Split sizes, Conv groups and head counts
(see `modelsurgeon.channel_surgery`).

How much: `heads=`, `ffn=`, `channels=`, `hidden=` remove that fraction of every group of their kind. `ratio=` is a
fraction of the model's MACs: one channel fraction r for every kind not set explicitly is solved for (bisection
on `MacModel`, the analysis's own MAC count under a plan), so that the plan removes about `ratio` of the MACs;
a CNN whose every conv loses r of its inputs and outputs loses about 1 - (1 - r)^2 of its MACs, so
`ratio=0.3` prunes about 16% of each group there. The notes give `macs_removed` and `macs_requested`, and a
`warning` (also logged) when they differ by more than 5 points: frozen channels (an op the analysis does not
know) or coarse rounding. Counts are rounded to `multiple` per convolution channel axis: the width of a grouped
convolution's groups only as far as groups x width stays a multiple (`rounding_step`).

Each group keeps the indices with the highest importance:

- `magnitude`: L2 (or L1, `norm=1`) norms of the weight slices of each index, each member tensor normalized to
  mean 1, summed over the group;
- `activation`: Wanda-style, |W| slices of the layers that consume the channel times the L2 norm of their
  input activation on the calibration data (magnitude where no consuming layer is known).

`reconstruct=true` refits every layer whose inputs lost channels (MatMul/Gemm with a constant weight, ungrouped
Conv), in dependency order, by least squares: its input in the pruned model (upstream layers already refit)
is mapped onto its output in the original model on the calibration data, bias included when the layer has
one, damped toward the original weights (see `Refitter`).

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
from modelsurgeon.analyses.channel_macs import MacModel, product_cofactor
from modelsurgeon.calibration import require_finite
from modelsurgeon.channel_surgery import PrunePlan, apply_plan
from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Option, Pass, PassResult, Stage, register_pass

log = logging.getLogger("modelsurgeon")

KINDS = ("heads", "ffn", "channels", "hidden")
ROUNDED_KINDS = ("ffn", "channels", "hidden")  # `multiple` applies to these (not to head counts)
MAX_GRAM_ROWS = 8192  # rows of activations per batch and layer that enter a least-squares Gram matrix


def _ratio_check(v: float | None) -> str | None:
    if v is not None and not 0.0 <= v < 1.0:
        return "must be in [0, 1): the fraction to remove"
    return None


@register_pass
class PrunePass(Pass):
    name = "prune"
    summary = "structured pruning of heads, FFN units, conv channels or the hidden width, dependency-aware"
    options = {
        "ratio": Option((float, type(None)), None, "fraction of the MACs removed, by pruning every kind not set below "
                        "(one channel fraction for all, solved for)", check=_ratio_check),
        "heads": Option((float, type(None)), None, "fraction of attention heads removed", check=_ratio_check),
        "ffn": Option((float, type(None)), None, "fraction of FFN hidden units removed", check=_ratio_check),
        "channels": Option((float, type(None)), None, "fraction of convolution channels removed", check=_ratio_check),
        "hidden": Option((float, type(None)), None, "fraction of the residual width removed", check=_ratio_check),
        "multiple": Option(int, 8, "keep channel counts a multiple of this (not head counts); 8 keeps ORT's blocked CPU kernels fast",
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
        """Channel fractions of the kinds set explicitly (`heads=`, `ffn=`, ...)."""
        return {k: self.config[k] for k in KINDS if self.config[k] is not None}

    def run(self, model: ir.Model, ctx) -> PassResult:
        groups: ChannelGroups = ctx.analysis("channel_groups")
        c = self.config
        explicit = self.ratios()
        target = c["ratio"]  # a fraction of the MACs, reached by the kinds not set explicitly
        solved = [k for k in KINDS if k not in explicit] if target else []
        kinds = {k for k, r in explicit.items() if r > 0} | set(solved)
        targets = [g for g in groups.groups if g.kind in kinds]
        blocked = [g for g in groups.groups if g.kind == "other" and g.frozen and _blocked_by_op(g)]
        skipped = [f"{_label(g)}: {g.frozen[0]}" for g in targets + blocked if not g.prunable]
        candidates = [g for g in targets if g.prunable]
        steps = {g.leaf: rounding_step(groups, g, c["multiple"]) if g.kind in ROUNDED_KINDS else 1
                 for g in candidates}
        notes: dict[str, Any] = {"groups_pruned": 0, "groups_frozen": len(skipped)}
        if not candidates:
            return PassResult(model, False, notes, skipped)
        calib = ctx.require_calibration(self.name) if self.needs_calibration else None
        stats = None
        if c["importance"] == "activation":
            stats = collect_statistics(model, groups, candidates, calib, ctx)
        order: dict[int, np.ndarray] = {}
        for g in ctx.progress_bar(candidates, desc="prune: ranking channels", total=len(candidates)):
            score = importance(groups, g, c["importance"], c["norm"], stats)
            order[g.leaf] = np.lexsort((np.arange(len(score)), -score))  # most important first

        def plan_for(r: float) -> dict[int, int]:
            counts = {}
            for g in candidates:
                ratio = explicit.get(g.kind, r)
                k = keep_count(g.size, ratio, steps[g.leaf])
                if k < g.size:
                    counts[g.leaf] = k
            return counts

        macs = MacModel(groups)
        if solved and target > 0:
            channel_ratio = solve_channel_ratio(lambda r: macs.removed(_masks(plan_for(r), order)), target)
            notes["channel_ratio"] = round(channel_ratio, 4)
        else:
            channel_ratio = 0.0
        counts = plan_for(channel_ratio)
        notes["groups_pruned"] = len(counts)
        if macs.base:
            achieved = macs.removed(_masks(counts, order))
            notes["macs_removed"] = round(achieved, 4)
            if solved and target > 0:
                notes["macs_requested"] = target
                if abs(achieved - target) > MAC_TOLERANCE:
                    why = ("frozen channels leave too little to prune, or `multiple` rounds small groups coarsely"
                           if achieved < target else "channel counts round coarsely (see `multiple`)")
                    warning = (f"removes {achieved:.1%} of the MACs where {target:.1%} was asked ({why}; "
                               "`modelsurgeon inspect MODEL --groups` shows what is frozen)")
                    notes["warning"] = warning
                    log.warning("prune: %s", warning)
        if not counts:
            return PassResult(model, False, notes, skipped)
        chosen = [g for g in candidates if g.leaf in counts]
        keep = _masks(counts, order)
        plan = PrunePlan(groups, keep)
        refit = None
        if c["reconstruct"]:
            refit = Refitter(model, groups, plan, c["damp"])  # reads the original model: before surgery
            skipped.extend(refit.skipped)
        removed: dict[str, list[int]] = {}
        for g in chosen:
            before_after = removed.setdefault(g.kind, [0, 0])
            before_after[0] += g.size
            before_after[1] += counts[g.leaf]
        notes.update(apply_plan(model, plan))
        if refit is not None:
            notes.update(refit.run(model, calib, ctx))
        for kind, (before, after) in removed.items():
            notes[f"{kind}_kept"] = f"{after}/{before}"
        return PassResult(model, True, notes, skipped)


MAC_TOLERANCE = 0.05  # prune warns when the MACs it removes differ from `ratio` by more than this
MAX_CHANNEL_RATIO = 0.95  # the most of any group that `ratio` removes while chasing its MAC target


def _masks(counts: dict[int, int], order: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    out = {}
    for leaf, k in counts.items():
        mask = np.zeros(len(order[leaf]), dtype=bool)
        mask[order[leaf][:k]] = True
        out[leaf] = mask
    return out


def solve_channel_ratio(removed, target: float, iterations: int = 24) -> float:
    """The channel fraction r (the same for every group) whose plan removes the fraction `target` of the MACs.

    `removed(r)` is non-decreasing in r (each group keeps a prefix of one fixed ranking, shorter as r grows), so
    bisection finds the smallest r that reaches the target; the result is that r or the largest one below it,
    whichever lands closer. r stays within [0, max(target, min(2 target, MAX_CHANNEL_RATIO))]: a model with much
    frozen falls short of the target (and prune says so) instead of losing almost all of what it can prune."""
    cap = max(target, min(2 * target, MAX_CHANNEL_RATIO))
    lo, hi = 0.0, cap
    if removed(hi) < target:
        return hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if removed(mid) >= target:
            hi = mid
        else:
            lo = mid
    return lo if abs(removed(lo) - target) < abs(removed(hi) - target) else hi


def rounding_step(groups: ChannelGroups, g: ChannelGroup, multiple: int) -> int:
    """The step a group's kept count is rounded to so that every convolution's channel count stays a multiple of
    `multiple`: a leaf that is the channels-per-group of a grouped convolution (RegNet's group width 16 in 25
    groups) repeats once per group in the channel axis, so its count need only be a multiple of
    multiple / gcd(multiple, groups); rounding the width itself to `multiple` would cut 16 down to 8."""
    if multiple <= 1:
        return 1
    cof = 0
    for use in groups.weight_uses:
        if use.role != "conv" or use.data is None:
            continue
        lay = groups.layouts.get(use.data)
        if lay is not None and len(lay) > 1:
            cof = max(cof, product_cofactor(groups.atoms, lay[1], g.leaf))
    return multiple // math.gcd(multiple, cof) if cof > 1 else multiple


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


def collect_statistics(model: ir.Model, groups: ChannelGroups, chosen: list[ChannelGroup], calib, ctx) -> dict:
    """Per-channel input energy of the layers fed by the chosen groups (for `importance=activation`)."""
    from modelsurgeon.capture import ActivationCapture, batch_size_for

    uses = _refit_candidates(groups, {g.leaf for g in chosen})
    stats: dict[str, Any] = {"sumsq": {}}
    by_name = {u.data.name: u for u in uses}
    if not by_name:
        return stats
    cap = ActivationCapture(model, list(by_name))
    for batch in cap.iterate(calib, batch_size_for(model, 4), progress=ctx.progress_bar, desc="prune: calibrating"):
        for name, x in batch.items():
            u = by_name[name]
            x32 = np.asarray(x, dtype=np.float32)
            axis = u.data_axis % x32.ndim
            other = tuple(k for k in range(x32.ndim) if k != axis)
            stats["sumsq"][u.data] = stats["sumsq"].get(u.data, 0) + np.square(x32, dtype=np.float64).sum(axis=other)
    for value, sumsq in stats["sumsq"].items():
        require_finite(sumsq, value.name, "prune")
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
        for u in sorted(_refit_candidates(groups, set(plan.keep)), key=lambda u: order.get(u.node, -1)):
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

    def run(self, model: ir.Model, calib, ctx) -> dict[str, Any]:
        from modelsurgeon.capture import batch_size_for
        from modelsurgeon.channel_surgery import _Editor

        if not self.layers:
            return {"layers_refit": 0}
        editor = _Editor(model)
        batches = list(calib.batches(batch_size_for(model, 8)))
        original = SegmentRunner(self._original, batches)
        pruned = SegmentRunner(model, batches)
        index = {node: i for i, node in enumerate(model.graph)}
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
        return {"layers_refit": len(self.layers)}

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
