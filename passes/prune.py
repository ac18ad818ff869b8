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
one, damped toward the original weights (see `modelsurgeon.channel_refit`). The refit holds every calibration
sample's activations at the current layer in both models; past `refit_memory` GiB it uses the first samples that
fit, and its notes (`refit_samples`, `refit_note`) and a warning say so.

Preserves: model input and output shapes (their channels are frozen), everything in frozen groups, and the
outputs exactly when no channel is removed (ratio 0). Lossy otherwise.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from modelsurgeon.analyses.channel_deps import ChannelGroup, ChannelGroups, constant_array
from modelsurgeon.analyses.channel_macs import MacModel, product_cofactor
from modelsurgeon.calibration import require_finite
from modelsurgeon.channel_refit import Refitter, refit_candidates
from modelsurgeon.channel_surgery import PrunePlan, apply_plan
from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Option, Pass, PassResult, Stage, register_pass

log = logging.getLogger("modelsurgeon")

KINDS = ("heads", "ffn", "channels", "hidden")
ROUNDED_KINDS = ("ffn", "channels", "hidden")  # `multiple` applies to these (not to head counts)


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
        "refit_memory": Option(float, 8.0, "GiB of activations the refit may hold (both models); it refits on the "
                               "first calibration samples that fit", check=lambda v: None if v > 0 else "must be > 0"),
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
            notes.update(refit.run(model, calib, ctx, c["refit_memory"] * 2**30))
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

def collect_statistics(model: ir.Model, groups: ChannelGroups, chosen: list[ChannelGroup], calib, ctx) -> dict:
    """Per-channel input energy of the layers fed by the chosen groups (for `importance=activation`)."""
    from modelsurgeon.capture import ActivationCapture, batch_size_for

    uses = refit_candidates(groups, {g.leaf for g in chosen})
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
