"""Layer-by-layer calibration: run a model forward in segments, as far as the next layer's input, and no further.

Passes that quantize or prune layer by layer (GPTQ, AWQ, ...) need each layer's input activations computed
by the model *as already rewritten* up to that layer. Re-running the whole model for every layer costs one
forward pass per layer; `LayerwiseRunner` instead keeps, per calibration batch, the values on the frontier
between what has been computed and what has not, and for each request runs (through `ActivationCapture`)
only the nodes between that frontier and the requested values. A whole calibration costs about one forward
pass of the model plus one small ORT session per request, and memory is bounded by the frontier.

Rules that keep the cache right while the graph is rewritten between requests:
- a node whose outputs are not all cached is (re)computed when something needs it, from cached values, so
  rewriting a layer that has not been computed yet (replacing its node, keeping its output name) is safe;
- a rewrite that changes already computed values must say so: `rescale(names, factor)` when it scaled them
  exactly along the last axis (e.g. AWQ folding 1/s into the producer), `forget(names)` otherwise;
- cached values are dropped once every consumer has been computed.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from modelsurgeon.calibration import CalibrationData
from modelsurgeon.capture import ActivationCapture, batch_size_for


def _outer_references(node: ir.Node) -> list[ir.Value]:
    """Values a node's subgraphs (If/Loop/Scan bodies) read from enclosing scopes."""
    refs: list[ir.Value] = []
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for g in graphs:
            inner = {id(v) for v in g.inputs} | {id(v) for v in g.initializers.values()}
            for n in ir.traversal.RecursiveGraphIterator(g):
                inner.update(id(o) for o in n.outputs)
            for n in ir.traversal.RecursiveGraphIterator(g):
                for v in n.inputs:
                    if v is not None and id(v) not in inner:
                        refs.append(v)
    return refs


def _dependencies(node: ir.Node) -> list[ir.Value]:
    deps = [v for v in node.inputs if v is not None]
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        deps.extend(_outer_references(node))
    return deps


def _is_constant(value: ir.Value) -> bool:
    return value.producer() is None and (value.is_initializer() or value.const_value is not None) and not value.is_graph_input()


class LayerwiseRunner:
    """Computes requested intermediate values of `model` on calibration data, incrementally.

    `values(names)` returns one dict per calibration batch holding the requested arrays, computing only what is
    missing. The model may be rewritten between calls (see the module docstring for the rules).
    """

    def __init__(self, model: ir.Model, calibration: CalibrationData, batch_size: int = 8,
                 providers: Sequence[str] | None = None):
        self.model = model
        self.providers = providers
        bs = batch_size_for(model, batch_size)
        inputs = {v.name for v in model.graph.inputs if not v.is_initializer()}
        self.feeds = [{k: np.asarray(v) for k, v in b.items() if k in inputs} for b in calibration.batches(bs)]
        if not self.feeds:
            raise ValueError("calibration data holds no samples")
        self.cache: list[dict[str, np.ndarray]] = [dict(f) for f in self.feeds]
        self._done: set[str] = set()  # computed values dropped from the cache because nothing pending reads them
        self.segments_run = 0
        self.nodes_run = 0

    @property
    def num_batches(self) -> int:
        return len(self.feeds)

    # -- the public interface -------------------------------------------------------------------------

    def values(self, names: Iterable[str]) -> list[dict[str, np.ndarray]]:
        """Arrays of the named values for every calibration batch (computed with the model as it is now)."""
        names = list(dict.fromkeys(names))
        self._ensure(names)
        out = [{n: c[n] for n in names} for c in self.cache]
        self._evict(keep=set(names))
        return out

    def iterate(self, names: Iterable[str], progress: Callable | None = None) -> Iterable[dict[str, np.ndarray]]:
        """Like `values`, one batch at a time (the arrays are computed up front; this only paces consumers)."""
        batches = self.values(names)
        return progress(batches, desc="statistics", total=len(batches)) if progress else iter(batches)

    def rescale(self, names: Iterable[str], factor: np.ndarray) -> None:
        """Cached values `names` were exactly multiplied by `factor` along their last axis by a rewrite."""
        f = np.asarray(factor)
        for cache in self.cache:
            for n in names:
                if n in cache:
                    cache[n] = (cache[n] * f.astype(cache[n].dtype)).astype(cache[n].dtype)

    def forget(self, names: Iterable[str]) -> None:
        """Cached values `names` are no longer valid (they will be recomputed when needed)."""
        for cache, feeds in zip(self.cache, self.feeds):
            for n in names:
                self._done.discard(n)
                if n in cache and n not in feeds:
                    del cache[n]

    # -- internals -------------------------------------------------------------------------------------

    def _cached(self, name: str | None) -> bool:
        return name is not None and name in self.cache[0]

    def _values_by_name(self) -> dict[str, ir.Value]:
        graph = self.model.graph
        table = {v.name: v for v in graph.inputs}
        for node in graph:
            for o in node.outputs:
                if o.name:
                    table[o.name] = o
        return table

    def _ensure(self, names: list[str]) -> None:
        missing = [n for n in names if not self._cached(n)]
        if not missing:
            return
        table = self._values_by_name()
        targets = []
        for n in missing:
            if n not in table:
                raise KeyError(f"no value named '{n}' in the model")
            targets.append(table[n])
        nodes, inputs, initializers = self._segment(targets)
        in_segment = {id(n) for n in nodes}
        keep = list(missing)
        for node in nodes:  # values later nodes will need
            for o in node.outputs:
                if o.name in keep or not o.name:
                    continue
                if any(id(use.node) not in in_segment for use in o.uses()):
                    keep.append(o.name)
        view = ir.GraphView(inputs, [table[n] if n in table else None for n in keep], nodes=nodes,
                            initializers=initializers, opset_imports=self.model.graph.opset_imports, name="segment")
        segment = ir.Model(view, ir_version=self.model.ir_version, functions=list(self.model.functions.values()))
        capture = ActivationCapture(segment, keep, providers=self.providers, accuracy_level=0)
        for cache in self.cache:
            cache.update(capture.run({v.name: cache[v.name] for v in inputs}))
        self.segments_run += 1
        self.nodes_run += len(nodes)

    def _segment(self, targets: list[ir.Value]) -> tuple[list[ir.Node], list[ir.Value], list[ir.Value]]:
        """Nodes (topologically ordered) computing `targets` from cached values, their inputs and initializers."""
        order: list[ir.Node] = []
        seen_nodes: set[int] = set()
        inputs: dict[str, ir.Value] = {}
        initializers: dict[str, ir.Value] = {}
        stack: list[tuple[ir.Node, bool]] = []

        def visit_value(v: ir.Value) -> None:
            if v.name and self._cached(v.name):
                inputs[v.name] = v
            elif _is_constant(v):
                initializers[v.name] = v
            elif v.producer() is None:
                raise KeyError(f"value '{v.name}' has no producer and is not a model input")
            elif id(v.producer()) not in seen_nodes:
                stack.append((v.producer(), False))

        for t in targets:
            visit_value(t)
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in seen_nodes:
                continue
            seen_nodes.add(id(node))
            stack.append((node, True))
            for dep in _dependencies(node):
                visit_value(dep)
        return order, list(inputs.values()), list(initializers.values())

    def _evict(self, keep: set[str]) -> None:
        """Drop cached values whose consumers are all computed (their outputs cached or dropped earlier)."""
        table = self._values_by_name()
        cache0 = self.cache[0]
        drop = []
        for name in cache0:
            if name in keep or name in self.feeds[0]:  # model inputs stay: recomputation may need them
                continue
            v = table.get(name)
            if v is None:  # the value no longer exists (rewritten away)
                drop.append(name)
                continue
            pending = False
            for use in v.uses():
                node = use.node
                if node.graph is not self.model.graph:  # read inside a subgraph: keep it
                    pending = True
                    break
                if not all(o.name in cache0 or o.name in self._done for o in node.outputs):
                    pending = True
                    break
            if not pending:
                drop.append(name)
        for cache in self.cache:
            for name in drop:
                self._done.add(name)
                cache.pop(name, None)
