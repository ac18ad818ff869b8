"""Activation capture: run ONNX Runtime with chosen intermediate values exposed as outputs, in batches.

Passes collect statistics (Hessians, covariances, norms) by iterating `ActivationCapture.iterate`, which
yields one batch of captured arrays at a time, so memory stays bounded by one batch of the chosen values.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from modelsurgeon.calibration import CalibrationData
from modelsurgeon.errors import UserError
from modelsurgeon.runtime.detached_weights import DetachedModel, detach_weights


def _with_outputs(model: ir.Model, names: Sequence[str]) -> DetachedModel:
    """The model's weightless protobuf (weights detached, not copied) with `names` added as outputs."""
    detached = detach_weights(model)
    proto = detached.proto
    existing = {o.name for o in proto.graph.output}
    missing = [n for n in names if n not in existing]
    if not missing:
        return detached
    known: dict[str, onnx.ValueInfoProto] = {vi.name: vi for vi in proto.graph.value_info}
    known.update({vi.name: vi for vi in proto.graph.input})
    if any(n not in known for n in missing):
        try:
            inferred = onnx.shape_inference.infer_shapes(proto)
            known.update({vi.name: vi for vi in inferred.graph.value_info})
        except Exception:
            pass
    values = {v.name: v for v in ir.traversal.RecursiveGraphIterator(model.graph) for v in v.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    values.update(model.graph.initializers)
    for name in missing:
        if name in known:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(known[name])
            proto.graph.output.append(vi)
        elif name in values and values[name].dtype is not None:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, int(values[name].dtype), None))
        elif name in values:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        else:
            raise UserError(f"cannot capture '{name}': no value of that name in the model")
    return detached


class ActivationCapture:
    """An ORT session over a copy of `model` whose outputs are the values named in `names`."""

    def __init__(self, model: ir.Model, names: Sequence[str], providers: Sequence[str] | None = None,
                 accuracy_level: int | None = 0, prepack: bool | None = None):
        from modelsurgeon.runtime.session import make_session

        self.names = list(dict.fromkeys(names))
        self.session = make_session(_with_outputs(model, self.names), providers=providers, accuracy_level=accuracy_level,
                                    prepack=prepack)
        self._inputs = {i.name for i in self.session.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.names, {k: v for k, v in feeds.items() if k in self._inputs})
        return dict(zip(self.names, outs))

    def iterate(self, data: CalibrationData, batch_size: int = 8, progress: Callable | None = None,
                desc: str = "calibrating") -> Iterator[dict[str, np.ndarray]]:
        batches = data.batches(batch_size)
        if progress is not None:
            batches = progress(batches, desc=desc, total=data.num_batches(batch_size))
        for feeds in batches:
            yield self.run(feeds)


def capture(model: ir.Model, names: Sequence[str], data: CalibrationData, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Capture everything at once (concatenated along axis 0): for small models and tests."""
    cap = ActivationCapture(model, names)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in cap.names}
    for out in cap.iterate(data, batch_size):
        for n, a in out.items():
            parts[n].append(a)
    return {n: np.concatenate(p) if p and p[0].ndim else (p[0] if p else np.array([])) for n, p in parts.items()}


ONE_SAMPLE_PER_RUN = "modelsurgeon.one_sample_per_run"  # model.meta: the model runs in ORT at batch 1 only


def batch_size_for(model: ir.Model, wanted: int = 8) -> int:
    """The batch size feeds may use: `wanted`, unless an input fixes its first dimension or the model runs one
    sample at a time (the pass manager found so: `ONE_SAMPLE_PER_RUN`)."""
    if model.meta.get(ONE_SAMPLE_PER_RUN):
        return 1
    for value in model.graph.inputs:
        if value.name in model.graph.initializers or not value.shape or len(value.shape) == 0:
            continue
        d = value.shape[0]
        if isinstance(d, int):
            return d
    return wanted
