"""MACs of a model as a function of which channels a prune keeps, from the channel analysis alone (no ORT run).

`MacModel(groups)` lists the nodes `modelsurgeon.stats` counts (MatMul, Gemm, Conv, ConvTranspose) with, for each,
the index spaces whose sizes multiply into its MACs: the output's axes and the contracted axes (Conv: the weight's
input-channels-per-group and kernel axes; ConvTranspose: the input's axes and the weight's; MatMul: the left
operand's last axis; Gemm: its contracted axis). `macs(keep)` multiplies the *kept* sizes of those index spaces
under keep masks per leaf (`Atoms.kept_positions`), so a prune plan's MAC reduction is known before the rewrite
and can be searched for (prune's `ratio` is a MAC target).

It cannot see what the analysis does not describe: a node whose operands have no layout (an unknown op's output of
unknown rank) is left out of both counts, and dynamic sizes (batch, sequence) count as 1 in both. So the fraction
removed is exact for graphs the analysis understands and static shapes, and an estimate elsewhere; the compile
report's MAC column (measured on an ORT run) is the reference.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from modelsurgeon.analyses.channel_deps import ChannelGroups

MAC_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


class MacModel:
    """MACs of the MAC nodes the analysis describes, before and after a keep plan."""

    def __init__(self, groups: ChannelGroups):
        self.groups = groups
        self.atoms = groups.atoms
        self.terms: list[tuple[ir.Node, list[int]]] = []  # node, the atoms whose sizes multiply into its MACs
        for node in groups.model.graph:
            if node.op_type not in MAC_OPS or node.domain not in ("", "ai.onnx"):
                continue
            factors = self._factors(node)
            if factors is not None:
                self.terms.append((node, factors))
        self.base = sum(self._count(f, None) for _, f in self.terms)

    def _lay(self, value: ir.Value | None) -> list[int] | None:
        return None if value is None else self.groups.layouts.get(value)

    def _factors(self, node: ir.Node) -> list[int] | None:
        op = node.op_type
        y = self._lay(node.outputs[0])
        a = self._lay(node.inputs[0])
        b = self._lay(node.inputs[1]) if len(node.inputs) > 1 else None
        if op == "Conv":
            return None if y is None or b is None else [*y, *b[1:]]
        if op == "ConvTranspose":
            return None if a is None or b is None else [*a, *b[1:]]
        if y is None or a is None or not a:
            return None
        if op == "MatMul":
            return [*y, a[-1]]
        trans_a = node.attributes.get("transA")
        return [*y, a[0] if trans_a is not None and trans_a.value else a[-1]]

    def _count(self, factors: list[int], keep: dict[int, np.ndarray] | None, cache: dict | None = None) -> int:
        total = 1
        for atom in factors:
            n = self.atoms.size(atom)
            if n is None:
                continue  # dynamic (batch, sequence): the same before and after
            if keep:
                key = self.atoms.find(atom)
                if cache is not None and key in cache:
                    n = cache[key]
                else:
                    mask = self.atoms.kept_positions(atom, keep)
                    n = int(mask.sum()) if mask is not None else n
                    if cache is not None:
                        cache[key] = n
            total *= n
        return total

    def macs(self, keep: dict[int, np.ndarray] | None = None) -> int:
        """MACs (dynamic sizes counted as 1) when every leaf in `keep` keeps the indices its mask says."""
        keep = {self.atoms.find(k): v for k, v in (keep or {}).items()}
        cache: dict[int, int] = {}
        return sum(self._count(f, keep, cache) for _, f in self.terms)

    def removed(self, keep: dict[int, np.ndarray] | None) -> float:
        """Fraction of the MACs the plan removes (0 when the model has none the analysis describes)."""
        return 0.0 if not self.base else 1.0 - self.macs(keep) / self.base


def product_cofactor(atoms, atom: int, leaf: int) -> int:
    """How many times each index of `leaf` is repeated in `atom` through products: the size of the other factors of
    every product on the way from `atom` down to `leaf` (RegNet's group width 16 inside 25 groups: 25). The largest
    over the leaf's occurrences; 0 when `leaf` is not under `atom`."""
    atom, leaf = atoms.find(atom), atoms.find(leaf)
    if atom == leaf:
        return 1
    d = atoms.defn[atom]
    if d is None:
        return 0
    children = [atoms.find(c) for c in d[1]]
    best = 0
    for k, c in enumerate(children):
        inner = product_cofactor(atoms, c, leaf)
        if not inner:
            continue
        if d[0] == "product":
            inner *= math.prod(atoms.size(o) or 1 for j, o in enumerate(children) if j != k)
        best = max(best, inner)
    return best
