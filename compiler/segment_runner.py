"""Running a model forward segment by segment, and a model beside its rewritten copy on the same samples.

Passes that refit layers after a rewrite (`prune(reconstruct=true)`, `lowrank(reconstruct=true)`) need, layer by
layer, the layer's input in the original model and in the rewritten one with every earlier layer already refit.
`SegmentRunner` runs one model's nodes up to the next layer and no further, keeping each batch's live values;
`PairedRunner` runs the original and the rewritten model in step. Both hold every calibration sample's live values,
so `PairedRunner` takes the first samples whose live values fit a memory budget (measured per sample on the first
batch by `live_bytes_per_sample`) and says when it left samples out.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from modelsurgeon.stats import human_bytes

log = logging.getLogger("modelsurgeon")


class PairedRunner:
    """The original model and its rewritten copy, run forward in step over the same calibration samples.

    `stops` are the positions (node indices in the original, in the rewritten model) of the layers to be visited in
    order; `advance(i, name)` runs both models up to stop i and returns, per batch, the value `name` in each. The
    samples are the first ones whose live values in both models fit `memory_bytes` (at least one batch): `notes`
    holds `refit_samples`, and `refit_note` (also logged as a warning naming `who`) when that is fewer than given.
    """

    def __init__(self, original: ir.Model, rewritten: ir.Model, stops: list[tuple[int, int]], calib,
                 memory_bytes: float, who: str, batch_size: int = 8):
        from modelsurgeon.capture import batch_size_for

        self.stops = stops
        batch_size = batch_size_for(rewritten, batch_size)
        total = calib.num_samples
        self.notes: dict[str, Any] = {"refit_samples": total}
        if total > batch_size:  # one batch is used whatever the budget: no need to measure
            per_sample = live_bytes_per_sample((original, rewritten), stops, calib)
            fit = max(batch_size, int(memory_bytes // max(per_sample, 1)) // batch_size * batch_size)
            if fit < total:
                self.notes["refit_samples"] = fit
                self.notes["refit_note"] = (f"refit on the first {fit} of {total} calibration samples: each keeps "
                                            f"{human_bytes(round(per_sample))} of activations live in the two models, "
                                            f"and refit_memory={memory_bytes / 2**30:g} GiB holds {fit}")
                log.warning("%s: %s", who, self.notes["refit_note"])
        batches = list(calib.batches(batch_size, limit=self.notes["refit_samples"]))
        self.original = SegmentRunner(original, batches)
        self.rewritten = SegmentRunner(rewritten, batches)

    def advance(self, i: int, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(original, rewritten) arrays of the value `name` (named alike in both models) at stop i, per batch."""
        at_original, at_rewritten = self.stops[i]
        return list(zip(self.original.advance(at_original, name), self.rewritten.advance(at_rewritten, name)))


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
        session = make_session(proto, base_dir=base_dir, arena=False)  # outputs are kept: no arena to hold them
        in_names = [i.name for i in session.get_inputs()]
        out_names = [v.name for v in keep]
        for st in self.state:
            results = session.run(out_names, {k: st[k] for k in in_names})
            st.update(zip(out_names, results))
            for k in [k for k in st if self.last_use.get(k, -1) < stop and k != want]:
                del st[k]
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the memory of the values just dropped back to the system (glibc keeps freed heap pages otherwise: the
    live values then hold about 1.5x their bytes of resident memory); nothing where the C library is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


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
