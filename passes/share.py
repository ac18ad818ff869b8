"""share: parameter sharing across consecutive transformer blocks (in the spirit of FoldGPT).

`share(groups=2)` forms groups of 2 consecutive blocks (`groups="0-3;8-9"` names them explicitly); in each
group every block's projections (q, k, v or qkv, o, up, gate, down) read the weight initializers of one
representative block, so the saved model stores them once. Each block keeps its own norm weights and
biases. The representative is the block that minimizes the group's output error on calibration data: the
sum over the other blocks' projections of ‖X_b (W_b − W_rep − correction)‖² / ‖X_b W_b‖², with X_b each
block's own input activations.

`correct=lowrank(r)` adds to every block that reads borrowed weights a rank-r path x·A_b·B_b fitted to
W_b − W_rep in the whitened input space of that block (the SVD-LLM / EoRA math of `lowrank_math`), so the
correction cancels as much of the output error as rank r allows; it costs r (K + N) parameters per layer.

Exact sharing: identical initializers (same dtype, shape and bytes) are stored once at the end, whatever
the groups. Graph inputs and outputs are unchanged; with one block per group the model is unchanged.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir

from modelsurgeon import lowrank_math as lm
from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Option, Pass, PassResult, register_pass

_CORRECT = re.compile(r"^\s*(?:none|lowrank\(\s*(?:r\s*=|rank\s*=)?\s*(\d+)\s*\))\s*$")
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


def _check_groups(v) -> str | None:
    if isinstance(v, int):
        return None if v >= 1 else "must be a group size >= 1 or ranges such as '0-3;4-7'"
    try:
        parse_ranges(v)
    except ValueError as exc:
        return str(exc)
    return None


def parse_ranges(text: str) -> list[list[int]]:
    """'0-3;5-6' -> [[0, 1, 2, 3], [5, 6]] (inclusive ranges of block indices, ';' or '+' between groups)."""
    groups = []
    for part in re.split(r"[;+]", text.strip().strip("'\"")):
        if not part.strip():
            continue
        m = _RANGE.match(part)
        if not m:
            raise ValueError(f"'{part.strip()}' is not a block range such as 0-3")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"range {lo}-{hi} runs backwards")
        groups.append(list(range(lo, hi + 1)))
    if not groups:
        raise ValueError("no block ranges given; e.g. groups=2 or groups='0-1;2-3'")
    return groups


def _correction_rank(text: str) -> int:
    m = _CORRECT.match(text)
    if not m:
        raise UserError(f"share: correct={text!r}: use correct=lowrank(R), e.g. correct=lowrank(16), or none")
    return int(m.group(1)) if m.group(1) else 0


@dataclasses.dataclass
class _Site:
    """One projection of one block: weight [K, N] (float64) and its input covariance."""

    block: int
    role: str
    lin: object           # blocks.Linear
    w: np.ndarray
    cov: np.ndarray | None = None


def _holder(lin) -> tuple[ir.Node, int]:
    """The node and input index that read the stored weight."""
    return (lin.transpose_node, 0) if lin.transpose_node is not None else (lin.node, 1)


def _layout(lin) -> tuple:
    holder, idx = _holder(lin)
    w = lin.weight.const_value
    return (holder.op_type, lin.transposed, tuple(w.shape), w.dtype)


def _whitened_error(delta: np.ndarray, site: "_Site", rank: int, damp: float,
                    whiteners: dict[str, lm.EigenWhitener]) -> tuple[float, tuple | None]:
    """‖X (Δ − A B)‖² for the best rank-`rank` A B (0: no correction) on the site's inputs, and the factors."""
    cov = site.cov
    if rank <= 0:
        return float(np.einsum("kn,kn->", delta, cov @ delta)), None
    key = site.lin.input.name
    if key not in whiteners:  # one eigen-decomposition per distinct input (q, k, v share theirs)
        whiteners[key] = lm.EigenWhitener.from_cov(cov, damp)
    a, b = lm.eora_correction(delta, np.zeros_like(delta), None, rank, whitener=whiteners[key])
    rest = delta - a @ b
    return float(np.einsum("kn,kn->", rest, cov @ rest)), (a, b)


@register_pass
class SharePass(Pass):
    name = "share"
    requires = ("canonicalize",)  # the block finder reads the canonical form
    summary = "share projection weights across consecutive blocks (representative chosen on calibration data)"
    analyses = ("blocks",)
    needs_calibration = True
    options = {
        "groups": Option((int, str), 2, "group size (consecutive blocks), or block ranges such as '0-3;4-7'",
                         check=_check_groups),
        "correct": Option(str, "none", "per-block low-rank correction of the borrowed weights: lowrank(R) or none"),
        "damp": Option(float, 1e-4, "damping of the input covariances, relative to their mean diagonal",
                       check=lambda v: None if 0 <= v < 1 else "must lie in [0, 1)"),
    }

    def validate(self) -> None:
        self.rank = _correction_rank(self.config["correct"])

    def _groups(self, count: int) -> list[list[int]]:
        g = self.config["groups"]
        if isinstance(g, int):
            return [list(range(i, min(i + g, count))) for i in range(0, count, g)]
        groups = parse_ranges(g)
        seen: set[int] = set()
        for grp in groups:
            if grp[-1] >= count:
                raise UserError(f"share: groups={g!r} names block {grp[-1]}, but the model has {count} blocks (0-{count - 1})")
            if seen & set(grp):
                raise UserError(f"share: groups={g!r}: block {sorted(seen & set(grp))[0]} is in two groups")
            seen |= set(grp)
        return groups

    def run(self, model: ir.Model, ctx) -> PassResult:
        with lm.blas_threads(1):
            return self._run(model, ctx)

    def _run(self, model: ir.Model, ctx) -> PassResult:
        from modelsurgeon.passes.cleanup import deduplicate_initializers, remove_unused
        from modelsurgeon.passes.drop_blocks import found_blocks
        from modelsurgeon.passes.lowrank import Namer, add_lowrank_branch, input_statistics

        from modelsurgeon.analyses.blocks import require_float_linears

        tb = found_blocks(ctx, self.name)
        require_float_linears(tb, self.name)
        blocks = tb.blocks
        groups = [grp for grp in self._groups(len(blocks)) if len(grp) > 1]
        skipped: list[str] = []
        params_before = _initializer_elements(model)

        # Which projections each group can share: present in every block, same storage layout.
        plan: list[tuple[list[int], list[str]]] = []
        for grp in groups:
            roles = []
            for role in blocks[grp[0]].linears():
                lins = [blocks[i].linears().get(role) for i in grp]
                if any(lin is None for lin in lins):
                    skipped.append(f"blocks {grp[0]}-{grp[-1]} {role}: not present in every block of the group")
                elif len({_layout(lin) for lin in lins}) != 1:
                    skipped.append(f"blocks {grp[0]}-{grp[-1]} {role}: weights differ in shape, type or layout")
                elif self.rank and lm.factor_params(lins[0].in_features, lins[0].out_features, self.rank) >= \
                        lins[0].in_features * lins[0].out_features:
                    skipped.append(f"blocks {grp[0]}-{grp[-1]} {role}: a rank-{self.rank} correction would hold as many "
                                   f"parameters as the [{lins[0].in_features}x{lins[0].out_features}] weight; kept per block")
                else:
                    roles.append(role)
            if roles:
                plan.append((grp, roles))
        if not plan:
            modified = deduplicate_initializers(model)
            return PassResult(model, modified, notes={"groups": []}, skipped=skipped)

        sites = {(i, role): _Site(i, role, blocks[i].linears()[role], blocks[i].linears()[role].weight_matrix().astype(np.float64))
                 for grp, roles in plan for i in grp for role in roles}
        ctx.require_calibration(self.name)
        stats = input_statistics(model, ctx, [_Input(site.lin.input) for site in sites.values()],
                                 desc="share: calibrating")
        for site in sites.values():
            site.cov = stats[site.lin.input.name].cov

        namer = Namer(model.graph)
        damp = self.config["damp"]
        whiteners: dict[str, lm.EigenWhitener] = {}
        group_notes, corrections, added = [], 0, 0
        for grp, roles in ctx.progress_bar(plan, desc="share: choosing representatives", total=len(plan)):
            best = None
            for rep in grp:
                err, factors = 0.0, {}
                for i in grp:
                    if i == rep:
                        continue
                    for role in roles:
                        site, src = sites[(i, role)], sites[(rep, role)]
                        e, f = _whitened_error(site.w - src.w, site, self.rank, damp, whiteners)
                        total = float(np.einsum("kn,kn->", site.w, site.cov @ site.w))
                        err += e / total if total > 0 else 0.0
                        factors[(i, role)] = f
                if best is None or err < best[1]:
                    best = (rep, err, factors)
            rep, err, factors = best
            for i in grp:
                if i == rep:
                    continue
                for role in roles:
                    site, src = sites[(i, role)], sites[(rep, role)]
                    holder, idx = _holder(site.lin)
                    holder.replace_input_with(idx, src.lin.weight)
                    f = factors[(i, role)]
                    if f is not None:
                        a, b = f
                        add_lowrank_branch(model.graph, site.lin.node, a, b, dtype=site.lin.weight.const_value.dtype.numpy(),
                                           bits=32, label=f"{site.lin.node.name or role}.share", namer=namer)
                        corrections += 1
                        added += a.size + b.size
            group_notes.append({"blocks": f"{grp[0]}-{grp[-1]}", "representative": rep, "shared": roles,
                                "rel_error_sum": round(err, 6)})
        remove_unused(model)
        merged = deduplicate_initializers(model)
        remove_unused(model)
        notes = {
            "groups": group_notes,
            "parameters_removed": int(params_before - _initializer_elements(model)),
            "corrections": corrections,
            "correction_parameters": int(added),
            "identical_initializers_merged": bool(merged),
        }
        return PassResult(model, True, notes=notes, skipped=skipped)


@dataclasses.dataclass
class _Input:
    """Adapter for `lowrank.input_statistics`: a layer input read row-wise."""

    input: ir.Value
    trans_a: bool = False


def _initializer_elements(model: ir.Model) -> int:
    return int(sum(np.prod(v.const_value.shape, dtype=np.int64) for v in model.graph.initializers.values()
                   if v.const_value is not None))
