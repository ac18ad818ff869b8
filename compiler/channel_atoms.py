"""Index spaces ("atoms") and their unification: the algebra under the channel dependency analysis.

An *atom* is an index space of some size. Every axis of every tensor is described by one atom (its layout).
An atom is either a *leaf* or is *defined* as

- the concatenation of other atoms (`concat`: Concat, Split, Slice map offsets), or
- their row-major product (`product`: a Reshape of hidden into heads x head_dim, a grouped Conv's
  groups x channels-per-group, Flatten of channels x height x width).

`unify(a, b)` records that two atoms are the same index space: "pruning index i of one forces index i of the
other". Unifying refines structure where needed (a leaf of 64 unified with `concat(32, 32)` becomes that
concat; a leaf of 64 unified with `product(4, 16)` becomes that product), which is how concat/split offsets
and heads x head_dim mappings come out right without special cases. When two structures cannot be
reconciled (a channel shuffle between groups of different sizes, say), both atoms are frozen with the reason.

Leaves are what a pruner chooses indices of: keeping a subset of each leaf's indices determines, for every
tensor axis, which of its positions survive (`positions`). Sizes are static ints, or dynamic (batch,
sequence): dynamic sizes are carried as monomials over dynamic leaves so that a Reshape that merges batch
with heads and splits them again is still understood. Dynamic leaves are always frozen.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

Mono = tuple[int, tuple[int, ...]]  # coefficient x product of dynamic leaves (sorted root ids)
ONE: Mono = (1, ())


class Unresolvable(Exception):
    """Two index structures cannot be made the same; the caller freezes what was involved."""


def mono_mul(a: Mono, b: Mono) -> Mono:
    return a[0] * b[0], tuple(sorted(a[1] + b[1]))


def mono_div(a: Mono, b: Mono) -> Mono | None:
    """a / b when b divides a, else None."""
    if b[0] == 0 or a[0] % b[0]:
        return None
    rest = list(a[1])
    for s in b[1]:
        if s not in rest:
            return None
        rest.remove(s)
    return a[0] // b[0], tuple(rest)


class Atoms:
    """A union-find of index spaces with concat/product definitions, frozen reasons and tags."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.static: list[int | None] = []  # size of a leaf (None: dynamic)
        self.defn: list[tuple[str, tuple[int, ...]] | None] = []
        self.frozen: dict[int, list[str]] = {}
        self.tags: dict[int, set[str]] = {}
        self.origin: dict[int, str] = {}  # where a leaf was created (for describe)
        self._positions: dict[int, dict[int, np.ndarray]] | None = None

    # ------------------------------------------------------------------ creation and lookup
    def new(self, size: int | None, frozen: str | None = None, origin: str = "") -> int:
        a = len(self.parent)
        self.parent.append(a)
        self.static.append(None if size is None else int(size))
        self.defn.append(None)
        if size is None and frozen is None:
            frozen = "dynamic size"
        if frozen:
            self.frozen[a] = [frozen]
        if origin:
            self.origin[a] = origin
        return a

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def is_leaf(self, a: int) -> bool:
        return self.defn[self.find(a)] is None

    def children(self, a: int) -> tuple[int, ...]:
        d = self.defn[self.find(a)]
        return () if d is None else tuple(self.find(c) for c in d[1])

    def mono(self, a: int) -> Mono:
        a = self.find(a)
        d = self.defn[a]
        if d is None:
            return (self.static[a], ()) if self.static[a] is not None else (1, (a,))
        if d[0] == "product":
            m = ONE
            for c in d[1]:
                m = mono_mul(m, self.mono(c))
            return m
        total = 0
        for c in d[1]:
            mc = self.mono(c)
            if mc[1]:
                raise AssertionError("concat of dynamic atoms")
            total += mc[0]
        return (total, ())

    def size(self, a: int) -> int | None:
        m = self.mono(a)
        return m[0] if not m[1] else None

    def make_concat(self, parts: Iterable[int], origin: str = "") -> int:
        parts = [self.find(p) for p in parts if self.mono(p) != (0, ())]
        if len(parts) == 1:
            return parts[0]
        if any(self.size(p) is None for p in parts):
            return self.new(None, "concatenation of dynamic sizes", origin)
        if not parts:
            return self.new(0, origin=origin)
        a = self.new(0, origin=origin)
        self.defn[a] = ("concat", tuple(parts))
        return a

    def make_product(self, factors: Iterable[int], origin: str = "") -> int:
        factors = [self.find(f) for f in factors if self.mono(f) != ONE]
        if len(factors) == 1:
            return factors[0]
        if not factors:
            return self.new(1, origin=origin)
        a = self.new(0, origin=origin)
        self.defn[a] = ("product", tuple(factors))
        return a

    def freeze(self, a: int, reason: str) -> None:
        reasons = self.frozen.setdefault(self.find(a), [])
        if reason not in reasons:
            reasons.append(reason)

    def tag(self, a: int, tag: str) -> None:
        self.tags.setdefault(self.find(a), set()).add(tag)

    # ------------------------------------------------------------------ structure
    def concat_parts(self, a: int) -> list[int]:
        a = self.find(a)
        d = self.defn[a]
        if d is None or d[0] != "concat":
            return [a]
        out: list[int] = []
        for c in d[1]:
            out.extend(self.concat_parts(c))
        return out

    def product_factors(self, a: int) -> list[int]:
        a = self.find(a)
        d = self.defn[a]
        if d is None or d[0] != "product":
            return [] if self.mono(a) == ONE else [a]
        out: list[int] = []
        for c in d[1]:
            out.extend(self.product_factors(c))
        return out

    def descendants(self, a: int) -> set[int]:
        seen: set[int] = set()
        stack = [self.find(a)]
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            seen.add(x)
            stack.extend(self.children(x))
        return seen

    def leaves(self, a: int) -> list[int]:
        """Leaves under `a` in order (a leaf repeated in a concat appears once per occurrence)."""
        a = self.find(a)
        d = self.defn[a]
        if d is None:
            return [a]
        out: list[int] = []
        for c in d[1]:
            out.extend(self.leaves(c))
        return out

    def segment(self, a: int, start: int, stop: int) -> int:
        """The atom for positions [start, stop) of `a`, refining `a` into a concat if needed."""
        n = self.size(a)
        if n is None:
            raise Unresolvable("slice of a dynamic axis")
        if start == 0 and stop == n:
            return self.find(a)
        parts = self._cut(self.concat_parts(a), sorted({start, stop} - {0, n}))
        if parts is None:
            raise Unresolvable(f"cannot cut positions [{start}, {stop}) out of {self.describe(a)}")
        self._redefine_concat(a, parts)
        out, pos = [], 0
        for p in parts:
            if start <= pos < stop:
                out.append(p)
            pos += self.size(p)
        return self.make_concat(out)

    def _redefine_concat(self, a: int, parts: list[int]) -> None:
        a = self.find(a)
        if len(parts) > 1:
            self.defn[a] = ("concat", tuple(parts))

    def _cut(self, parts: list[int], cuts: list[int]) -> list[int] | None:
        """Split concat parts so that every cut position falls on a part boundary."""
        out: list[int] = []
        pos = 0
        for p in parts:
            n = self.size(p)
            if n is None:
                return None
            inner = [c - pos for c in cuts if pos < c < pos + n]
            if inner:
                pieces = self._split(p, inner)
                if pieces is None:
                    return None
                out.extend(pieces)
            else:
                out.append(p)
            pos += n
        return out

    def _split(self, a: int, cuts: list[int]) -> list[int] | None:
        """Pieces of `a` between the cut offsets; redefines `a` as their concat."""
        a = self.find(a)
        n = self.size(a)
        bounds = [0, *cuts, n]
        d = self.defn[a]
        if d is None:
            pieces = [self.new(bounds[i + 1] - bounds[i], origin=self.origin.get(a, "")) for i in range(len(bounds) - 1)]
            for p in pieces:  # a piece of a leaf carries the leaf's tags (frozen ones are pushed down later)
                self.tags[p] = set(self.tags.get(a, ()))
            self.defn[a] = ("concat", tuple(pieces))
            return pieces
        if d[0] == "concat":
            return self._cut(self.concat_parts(a), cuts)
        factors = self.product_factors(a)
        outer, rest = factors[0], factors[1:]
        inner = 1
        for f in rest:
            s = self.size(f)
            if s is None:
                return None
            inner *= s
        if any(c % inner for c in cuts):
            return None
        outer_pieces = self._cut(self.concat_parts(outer), [c // inner for c in cuts])
        if outer_pieces is None:
            return None
        self._redefine_concat(outer, outer_pieces)
        # regroup the outer pieces between cuts, then rebuild products
        pieces, pos, k = [], 0, 1
        group: list[int] = []
        for op in outer_pieces:
            group.append(op)
            pos += self.size(op)
            if pos * inner == bounds[k]:
                pieces.append(self.make_product([self.make_concat(group), *rest]))
                group, k = [], k + 1
        self.defn[a] = ("concat", tuple(pieces))
        return pieces

    # ------------------------------------------------------------------ unification
    def unify(self, a: int, b: int) -> None:
        """Make `a` and `b` the same index space; raises Unresolvable when their structures disagree."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        da, db = self.defn[a], self.defn[b]
        dyn_a = da is None and self.static[a] is None
        dyn_b = db is None and self.static[b] is None
        if dyn_a or dyn_b:  # an unknown size takes the other's structure (dynamic leaves are frozen)
            self._bind(a, b) if dyn_a else self._bind(b, a)
            return
        if self.mono(a) != self.mono(b):
            raise Unresolvable(f"sizes differ: {self.describe(a)} vs {self.describe(b)}")
        if da is None:
            self._bind(a, b)
        elif db is None:
            self._bind(b, a)
        elif da[0] == db[0] == "concat":
            self._unify_concat(a, b)
        elif da[0] == db[0] == "product":
            self._unify_product(a, b)
        else:  # a concat and a product: try to rewrite the product as a concat at the concat's cuts
            c, p = (a, b) if da[0] == "concat" else (b, a)
            cuts, pos = [], 0
            for part in self.concat_parts(c)[:-1]:
                pos += self.size(part)
                cuts.append(pos)
            if self._split(p, cuts) is None:
                raise Unresolvable(f"cannot match {self.describe(c)} with {self.describe(p)}")
            self._unify_concat(a, b)

    def _bind(self, leaf: int, other: int) -> None:
        """The leaf becomes `other` (taking its structure); an occurs check keeps definitions acyclic."""
        if leaf in self.descendants(other):
            raise Unresolvable("an index space would contain itself")
        self._union(leaf, other)

    def _union(self, child: int, root: int) -> None:
        self.parent[child] = root
        if child in self.frozen:
            for r in self.frozen.pop(child):
                self.freeze(root, r)
        if child in self.tags:
            self.tags.setdefault(root, set()).update(self.tags.pop(child))
        if child in self.origin and root not in self.origin:
            self.origin[root] = self.origin[child]

    def _unify_concat(self, a: int, b: int) -> None:
        xs, ys = self.concat_parts(a), self.concat_parts(b)
        cuts: set[int] = set()
        for parts in (xs, ys):
            pos = 0
            for p in parts[:-1]:
                pos += self.size(p)
                cuts.add(pos)
        xs2, ys2 = self._cut(xs, sorted(cuts)), self._cut(ys, sorted(cuts))
        if xs2 is None or ys2 is None or len(xs2) != len(ys2):
            raise Unresolvable(f"cannot match offsets of {self.describe(a)} and {self.describe(b)}")
        self._redefine_concat(a, xs2)
        self._redefine_concat(b, ys2)
        for x, y in zip(xs2, ys2):
            self.unify(x, y)
        a, b = self.find(a), self.find(b)
        if a != b:
            self._union(a, b)

    def _unify_product(self, a: int, b: int) -> None:
        xs, ys = self.product_factors(a), self.product_factors(b)
        i = j = 0
        while i < len(xs) and j < len(ys):
            x, y = self.find(xs[i]), self.find(ys[j])
            mx, my = self.mono(x), self.mono(y)
            if mx == my or (self.defn[x] is None and self.static[x] is None) or (self.defn[y] is None and self.static[y] is None):
                self.unify(x, y)
                i, j = i + 1, j + 1
                continue
            q = mono_div(mx, my)
            if q is not None and self.defn[x] is None and not mx[1]:
                x1, x2 = self.new(my[0], origin=self.origin.get(x, "")), self.new(q[0], origin=self.origin.get(x, ""))
                for p in (x1, x2):
                    self.tags[p] = set(self.tags.get(x, ()))
                self.defn[x] = ("product", (x1, x2))
                self.unify(x1, y)
                xs[i], j = x2, j + 1
                continue
            q = mono_div(my, mx)
            if q is not None and self.defn[y] is None and not my[1]:
                y1, y2 = self.new(mx[0], origin=self.origin.get(y, "")), self.new(q[0], origin=self.origin.get(y, ""))
                for p in (y1, y2):
                    self.tags[p] = set(self.tags.get(y, ()))
                self.defn[y] = ("product", (y1, y2))
                self.unify(x, y1)
                ys[j], i = y2, i + 1
                continue
            raise Unresolvable(f"cannot match factors of {self.describe(a)} and {self.describe(b)}")
        if any(self.mono(x) != ONE for x in xs[i:]) or any(self.mono(y) != ONE for y in ys[j:]):
            raise Unresolvable(f"cannot match factors of {self.describe(a)} and {self.describe(b)}")
        a, b = self.find(a), self.find(b)
        if a != b:
            self._union(a, b)

    # ------------------------------------------------------------------ after the analysis
    def finalize(self) -> list[str]:
        """Push frozen reasons and tags from composite atoms down to their leaves; returns conflicts found."""
        problems: list[str] = []
        roots = sorted({self.find(a) for a in range(len(self.parent))})
        order = self._topological(roots)
        for r in order:  # parents before children
            reasons = self.frozen.get(r)
            tags = self.tags.get(r)
            for c in self.children(r):
                if reasons:
                    for reason in reasons:
                        self.freeze(c, reason)
                if tags:
                    self.tags.setdefault(c, set()).update(tags)
        self._positions = {}
        return problems

    def _topological(self, roots: list[int]) -> list[int]:
        order: list[int] = []
        state: dict[int, int] = {}
        for r in roots:
            stack = [(r, False)]
            while stack:
                x, done = stack.pop()
                if done:
                    state[x] = 2
                    order.append(x)
                    continue
                if state.get(x):
                    continue
                state[x] = 1
                stack.append((x, True))
                for c in self.children(x):
                    if not state.get(c):
                        stack.append((c, False))
        order.reverse()  # children were appended before their parents
        return order

    def positions(self, a: int) -> dict[int, list[np.ndarray]] | None:
        """For each leaf under `a`, one array per occurrence: the leaf's index at every position of `a`
        (-1 where that occurrence does not reach). A leaf occurs twice in `concat(F, F)` (rotary halves) or in
        `product(G, G)` (a channel shuffle tying groups to channels per group): a position survives only if
        every occurrence's index is kept."""
        a = self.find(a)
        if self._positions is None:
            self._positions = {}
        if a in self._positions:
            return self._positions[a]
        n = self.size(a)
        if n is None:
            return None
        d = self.defn[a]
        out: dict[int, list[np.ndarray]] = {}
        if d is None:
            out[a] = [np.arange(n)]
        elif d[0] == "concat":
            pos = 0
            for c in d[1]:
                m = self.size(c)
                for leaf, arrays in self.positions(c).items():
                    for idx in arrays:
                        full = np.full(n, -1, dtype=np.int64)
                        full[pos:pos + m] = idx
                        out.setdefault(leaf, []).append(full)
                pos += m
            for leaf, arrays in out.items():  # occurrences at disjoint positions merge into one array
                if len(arrays) > 1:
                    merged, rest = arrays[0].copy(), []
                    for arr in arrays[1:]:
                        if np.any((merged >= 0) & (arr >= 0)):
                            rest.append(arr)
                        else:
                            merged = np.where(arr >= 0, arr, merged)
                    out[leaf] = [merged, *rest]
        else:
            factors = [self.find(c) for c in d[1]]
            sizes = [self.size(c) for c in factors]
            for k, c in enumerate(factors):
                before, after = math.prod(sizes[:k]), math.prod(sizes[k + 1:])
                for leaf, arrays in self.positions(c).items():
                    for idx in arrays:
                        out.setdefault(leaf, []).append(np.tile(np.repeat(idx, after), before))
        self._positions[a] = out
        return out

    def kept_positions(self, a: int, keep: dict[int, np.ndarray]) -> np.ndarray | None:
        """Boolean mask over the positions of `a` given a boolean keep mask per pruned leaf."""
        pos = self.positions(a)
        if pos is None:
            return None
        mask = np.ones(self.size(a), dtype=bool)
        for leaf, arrays in pos.items():
            k = keep.get(leaf)
            if k is None:
                continue
            for idx in arrays:
                valid = idx >= 0
                mask[valid] &= k[idx[valid]]
        return mask

    # ------------------------------------------------------------------ printing
    def describe(self, a: int, depth: int = 0) -> str:
        a = self.find(a)
        d = self.defn[a]
        if d is None:
            s = self.static[a]
            return f"#{a}({'?' if s is None else s})"
        if depth > 3:
            return f"#{a}[...]"
        sep = " + " if d[0] == "concat" else " x "
        return "(" + sep.join(self.describe(c, depth + 1) for c in d[1]) + ")"
