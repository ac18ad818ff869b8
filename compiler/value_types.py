"""Every value gets a type: shape inference (ONNX Runtime's operators included), then an ONNX Runtime run.

Graphs from exporters other than torch's (built with `onnx.helper`, Optimum, ONNX Runtime GenAI's builder)
often declare no `value_info`, so their intermediate values have no element type. Passes copy a value's
type onto the values they create (an untyped one cannot be serialized), and activation capture hands
intermediate values to ONNX Runtime as graph inputs and outputs, which must be typed. `complete_types`, which
the pass manager calls after loading and after each pass, gives them one:

1. onnx shape inference, with ONNX Runtime's contrib schemas registered (`ort_schemas`), on the weightless
   protobuf: element types and, where inferable, shapes (symbolic dimensions included);
2. values still without an element type (outputs of an op whose schema neither onnx nor ONNX Runtime's table
   can type, e.g. a custom op without a function) get one from a single ONNX Runtime run on sample inputs (the
   first calibration sample, else inputs made from the signature) that exposes them as outputs: the element
   type and rank it produced, with unknown dimensions.

Only missing facts are filled in: a type or shape declared by the exporter or set by a pass is never replaced.
The shapes filled in here are marked (`value.meta[INFERRED]`) and inferred again on every call, so a pass that
changes dimensions (prune, slice) never leaves behind a stale shape it did not know it had to update (without
this module those values had no shape at all).

What it can't do: values inside subgraphs (If/Loop bodies) are typed by shape inference only; the ORT run gives
a rank, never dimensions; a model ONNX Runtime cannot run keeps its remaining untyped values (listed in the
result), and the verification run says why it does not run.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator

import numpy as np
import onnx
import onnx_ir as ir

from modelsurgeon import ort_schemas

log = logging.getLogger("modelsurgeon")

SAMPLE_SEQ = 16  # sequence length of the synthesized inputs of the typing run
INFERRED = "modelsurgeon.inferred_shape"  # value.meta key: the shape was filled in here (refreshed on every call)


@dataclasses.dataclass
class TypingResult:
    """What `complete_types` changed: values typed or shaped by shape inference (counting refreshed shapes only
    when they changed), values typed by the ORT run, and values still without an element type."""

    inferred: int = 0
    observed: int = 0
    untyped: list[str] = dataclasses.field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.inferred or self.observed)


def _values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs


def incomplete(model: ir.Model) -> list[ir.Value]:
    """Named values (graph inputs and node outputs, subgraphs included) lacking an element type or a shape."""
    return [v for v in _values(model.graph) if v.name and (_untyped(v) or (v.shape is None and not _is_tensor_seq(v)))]


def _untyped(value: ir.Value) -> bool:
    return value.type is None or (isinstance(value.type, ir.TensorType) and value.dtype in (None, ir.DataType.UNDEFINED))


def _is_tensor_seq(value: ir.Value) -> bool:  # sequences and optionals have no shape of their own
    return value.type is not None and not isinstance(value.type, ir.TensorType)


def complete_types(model: ir.Model, ctx: Any = None) -> TypingResult:
    """Give every value of `model` an element type, and a shape where shape inference finds one (in place).

    `ctx` (a PassContext, optional) supplies calibration samples and providers for the ORT run of step 2."""
    result = TypingResult()
    previous = {}
    for value in _values(model.graph):
        if value.meta.get(INFERRED):
            previous[id(value)] = value.shape
            value.shape = None
            del value.meta[INFERRED]
    missing = incomplete(model)
    if not missing:
        return result
    result.inferred = _from_shape_inference(model, missing, previous)
    result.inferred += sum(1 for v in missing if v.shape is None and previous.get(id(v)) is not None)  # lost
    untyped = [v for v in missing if _untyped(v)]
    if untyped:
        result.observed = _from_a_run(model, untyped, ctx)
        result.untyped = [v.name for v in untyped if _untyped(v)]
    if result.modified or result.untyped:
        log.debug("value types: %d from shape inference, %d from an ONNX Runtime run, %d still untyped",
                  result.inferred, result.observed, len(result.untyped))
    return result


# ------------------------------------------------------------------------------------------------------------
# 1. shape inference


def _from_shape_inference(model: ir.Model, missing: list[ir.Value], previous: dict[int, ir.Shape | None]) -> int:
    from modelsurgeon.runtime.detached_weights import detach_weights

    ort_schemas.register()
    try:
        proto = onnx.shape_inference.infer_shapes(detach_weights(model).proto, check_type=False, strict_mode=False,
                                                  data_prop=True)
    except Exception as exc:  # a graph onnx cannot infer at all: the ORT run types what it can
        log.debug("shape inference failed: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 0
    infos = _value_infos(proto.graph)
    changed = 0
    for value in missing:
        info = infos.get(value.name)
        if info is None or not info.type.WhichOneof("value"):
            continue
        typed = False
        if _untyped(value):
            inferred = ir.serde.deserialize_type_proto_for_type(info.type)
            if inferred is not None and not (isinstance(inferred, ir.TensorType) and inferred.dtype == ir.DataType.UNDEFINED):
                value.type = inferred
                typed = True
        if value.shape is None and info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            value.shape = ir.serde.deserialize_type_proto_for_shape(info.type)
            value.meta[INFERRED] = True
            typed = typed or id(value) not in previous or previous[id(value)] != value.shape
        changed += typed
    return changed


def _value_infos(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    """value_info, inputs and outputs of `graph` and its subgraphs, by name (names are unique in a model)."""
    infos: dict[str, onnx.ValueInfoProto] = {}
    stack = [graph]
    while stack:
        g = stack.pop()
        for info in [*g.input, *g.value_info, *g.output]:
            infos.setdefault(info.name, info)
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)
    return infos


# ------------------------------------------------------------------------------------------------------------
# 2. an ONNX Runtime run


def _from_a_run(model: ir.Model, untyped: list[ir.Value], ctx: Any) -> int:
    from modelsurgeon.capture import ActivationCapture

    main = {id(v) for v in _values_of_main_graph(model)}
    wanted = [v for v in untyped if id(v) in main and not v.is_graph_input()]
    if not wanted:
        return 0
    try:
        feeds = _sample_feeds(model, ctx)
        arrays = ActivationCapture(model, [v.name for v in wanted],
                                   providers=getattr(ctx, "providers", None)).run(feeds)
    except Exception as exc:  # ORT cannot run the model: the verification run says why
        log.debug("typing run failed: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 0
    changed = 0
    for value in wanted:
        array = arrays.get(value.name)
        if not isinstance(array, np.ndarray):
            continue
        value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        if value.shape is None:
            value.shape = ir.Shape([None] * array.ndim)  # rank only: no dimension to go stale, so not refreshed
        changed += 1
    return changed


def _values_of_main_graph(model: ir.Model) -> Iterator[ir.Value]:
    for node in model.graph:
        yield from node.outputs


def _sample_feeds(model: ir.Model, ctx: Any) -> dict[str, np.ndarray]:
    from modelsurgeon import calibration as calib_mod

    data = getattr(ctx, "calibration", None)
    if data is not None and data.num_samples:
        return data.head(1)
    return calib_mod.synthesize(model, num_samples=1, seq_len=SAMPLE_SEQ, seed=getattr(ctx, "seed", 0)).arrays
