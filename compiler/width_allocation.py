"""Spread a width budget over the bases of a sliced model by measured sensitivity (slice's `allocate=loss`).

The inputs are what slice can measure cheaply: for each basis j, the increase in loss when j alone is cut to the
uniform width k (every other basis kept whole), the eigenvalues of its PCA (the energy each width keeps), and a
cost model (MACs per token and parameters of the weights whose rows or columns the widths set, shortcut matrices
between neighbouring bases included). The model behind the allocation is that a basis's loss grows in proportion
to the energy it deletes,

    loss_j(w) = a_j * D_j(w),    D_j(w) = 1 - (largest w eigenvalues) / (all of them),

with a_j fitted at the one measured width, a_j = loss_j(k) / D_j(k). Widths then grow greedily from a floor, in
steps of `multiple`, always where the modelled loss falls most per unit of cost, until the budget, what the
uniform slice costs, is spent. The result is no slower and no larger than the uniform slice, but deletes more
where deleting is cheap in loss.

A basis whose measured increase is zero or negative (on SmolLM2-135M slicing a middle block alone lowers the loss
on held-out text a little) gets no more than the floor, except as tie-breaking by energy once the others are
full. The floor, 2k - d, keeps any basis from losing more than twice the asked fraction.
"""

from __future__ import annotations

import numpy as np


def dropped_energy(spectrum: np.ndarray) -> np.ndarray:
    """D[w] = fraction of the energy deleted when the w largest eigenvalues are kept (w = 0 .. d)."""
    vals = np.clip(np.sort(np.asarray(spectrum, np.float64))[::-1], 0.0, None)
    kept = np.concatenate([[0.0], np.cumsum(vals)]) / max(vals.sum(), 1e-300)
    return 1.0 - kept


def width_floor(d: int, k: int, multiple: int) -> int:
    """The narrowest width `allocate_widths` gives a basis: 2k - d (twice the deleted fraction), rounded down to
    `multiple`, and at least `multiple`."""
    floor = 2 * k - d
    return max(min(multiple, d), floor - floor % multiple)


def allocate_widths(loss_increase: list[float], drops: list[np.ndarray], cost, k: int, d: int,
                    multiple: int) -> list[int]:
    """Widths, multiples of `multiple` between `width_floor` and d, that cost no more than uniform width k.

    Per entry j (a basis, or several that share one width): `loss_increase[j]`, the loss increase measured with j
    alone at width k; `drops[j]`, its `dropped_energy` (averaged over the bases that share it). `cost(widths)`
    gives the cost of a whole assignment in one or more resources (e.g. MACs per token and parameters); every
    resource must stay within what the uniform assignment costs. A step goes where the modelled loss falls most
    per unit of added cost (each resource counted as a fraction of its budget)."""
    n = len(loss_increase)
    if len(drops) != n:
        raise ValueError("loss_increase and drops must have one entry each")
    drop = [np.asarray(x, np.float64) for x in drops]
    measured = np.asarray(loss_increase, np.float64)
    tiny = 1e-6 * max(float(np.abs(measured).max()), 1e-12)  # zero/negative: only energy breaks the tie
    slope = np.array([max(m, tiny) / max(dj[k], 1e-12) for m, dj in zip(measured, drop)])
    budget = np.atleast_1d(np.asarray(cost(np.full(n, k)), np.float64))
    widths = np.full(n, width_floor(d, k, multiple), dtype=np.int64)
    spent = np.atleast_1d(np.asarray(cost(widths), np.float64))
    while True:
        best, best_j, best_step, best_cost = -np.inf, -1, 0, None
        for j in range(n):
            step = min(multiple, d - int(widths[j]))
            if step <= 0:
                continue
            widths[j] += step
            after = np.atleast_1d(np.asarray(cost(widths), np.float64))
            widths[j] -= step
            if np.any(after > budget * (1 + 1e-12)):
                continue
            extra = float(np.sum(np.maximum(after - spent, 0.0) / np.maximum(budget, 1e-300)))
            gain = slope[j] * (drop[j][widths[j]] - drop[j][widths[j] + step]) / max(extra, 1e-300)
            if gain > best:
                best, best_j, best_step, best_cost = gain, j, step, after
        if best_j < 0:
            break
        widths[best_j] += best_step
        spent = best_cost
    return [int(w) for w in widths]


def widths_text(widths: list[int]) -> str:
    """Per-block widths in slice's `widths` syntax, equal neighbours merged: [576, 576, 288] -> '0-1:576;2:288'."""
    items, start = [], 0
    for i in range(1, len(widths) + 1):
        if i == len(widths) or widths[i] != widths[start]:
            where = f"{start}-{i - 1}" if i - 1 > start else f"{start}"
            items.append(f"{where}:{widths[start]}")
            start = i
    return ";".join(items)
