"""Verification of a pass's result: ONNX checker, shape inference, and an ORT run against a reference.

`Verifier` runs the original model once on sample inputs (symbolic dimensions bound small) and then
compares every later model's outputs with it: max abs error, relative L2 error and cosine per output.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from modelsurgeon import ort_schemas
from modelsurgeon.runtime.detached_weights import detach_weights


def structural_problems(model: ir.Model) -> list[str]:
    """Problems the ONNX checker and strict shape inference find (empty when the model is well formed).

    Large weights are detached (not copied) and checked as typed graph inputs instead: the checker looks at
    structure, not weight values, and refuses data files it cannot read as plain files. ONNX Runtime's own
    operators (com.microsoft contrib ops, SimplifiedLayerNormalization) are checked against ONNX Runtime's
    schemas (`ort_schemas`); an op neither knows is refused in the ONNX domains and skipped in others."""
    ort_schemas.register()
    proto = detach_weights(model).proto
    _weights_as_inputs(proto)
    return _problems(proto, proto)


def _weights_as_inputs(proto: onnx.ModelProto) -> None:
    inputs = {i.name for i in proto.graph.input}
    kept = []
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) > 1024:
            if t.name not in inputs:
                proto.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            kept.append(t)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)


def _problems(checkable, proto: onnx.ModelProto) -> list[str]:
    problems = []
    try:
        onnx.checker.check_model(checkable)
    except Exception as exc:
        problems.append(f"ONNX checker: {_checker_message(str(exc))}")
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=False)
    except Exception as exc:
        problems.append(f"shape inference: {str(exc).strip().splitlines()[0][:300]}")
    return problems


def _checker_message(text: str) -> str:
    """The checker's first line, with the node it names in its context ("Bad node spec for node. Name: n OpType: T")."""
    first = text.strip().splitlines()[0] if text.strip() else "failed"
    node = re.search(r"Bad node spec for node\. Name: *(\S*) +OpType: *(\S+)", text)
    if node:
        first = f"{first.rstrip('.')} (node '{node.group(1)}', {node.group(2)})" if node.group(1) else \
            f"{first.rstrip('.')} ({node.group(2)} node)"
    return first


@dataclasses.dataclass
class OutputError:
    max_abs: float
    rel_l2: float
    cosine: float

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def compare_arrays(ref: np.ndarray, got: np.ndarray) -> OutputError:
    r = np.asarray(ref, dtype=np.float64).ravel()
    g = np.asarray(got, dtype=np.float64).ravel()
    if r.size == 0:
        return OutputError(0.0, 0.0, 1.0)
    diff = g - r
    max_abs = float(np.max(np.abs(diff)))
    rn, gn = float(np.linalg.norm(r)), float(np.linalg.norm(g))
    rel = float(np.linalg.norm(diff) / rn) if rn > 0 else float(np.linalg.norm(diff))
    cos = float(r @ g / (rn * gn)) if rn > 0 and gn > 0 else (1.0 if rn == gn else 0.0)
    return OutputError(max_abs, rel, cos)


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, OutputError]:
    return {name: compare_arrays(ref[name], got[name]) for name in ref if name in got}


def worst(errors: dict[str, OutputError]) -> OutputError | None:
    if not errors:
        return None
    return OutputError(max(e.max_abs for e in errors.values()), max(e.rel_l2 for e in errors.values()),
                       min(e.cosine for e in errors.values()))


# model.meta: names of graph outputs a pass removed on purpose (drop-blocks: the removed blocks' KV-cache outputs),
# which verification no longer expects
REMOVED_OUTPUTS = "modelsurgeon.removed_outputs"
EXACT_REL_L2 = 1e-4  # an exact pass may move float32 outputs by at most this (relative L2)
EXACT_EPS = 4  # ... and outputs computed in a coarser float type by this many of its machine epsilons


def compute_dtype(model: ir.Model, outputs: dict[str, np.ndarray]) -> np.dtype:
    """The float type the model computes in: the coarser of its float outputs' type and the type holding most of
    its float weights (an fp16 model with float32 inputs and outputs still rounds every product to fp16)."""
    floats = [np.dtype(v.dtype) for v in outputs.values() if np.issubdtype(v.dtype, np.floating)]
    sizes: dict[np.dtype, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or value.dtype is None or not value.dtype.is_floating_point():
            continue
        try:
            dtype = np.dtype(value.dtype.numpy())
        except TypeError:  # bfloat16 and float8 have no numpy type here
            dtype = np.dtype(np.float16)
        sizes[dtype] = sizes.get(dtype, 0) + tensor.size
    if sizes:
        floats.append(max(sizes, key=sizes.get))
    return max(floats, key=lambda t: np.finfo(t).eps) if floats else np.dtype(np.float32)


def exact_bound(model: ir.Model, outputs: dict[str, np.ndarray]) -> float:
    """How far (relative L2) an exact pass may move the outputs of `model`: 1e-4 for a model computing in float32,
    `EXACT_EPS` machine epsilons of a coarser type (3.9e-3 for float16).

    An exact rewrite (folding norms into weights, reordering a sum) computes the same function with different
    round-offs: each rounding moves a value by up to half an epsilon, and they add up through the layers. 1e-4 is
    about 800 float32 epsilons, so any real change of the function (errors of 1e-2 and more) exceeds it; in float16
    one rounding alone is 4.9e-4 (GPT-2 in fp16 moves by 4.3e-4 when fold-norms scales its weights), so the bound
    there is counted in the type's own epsilons instead."""
    eps = float(np.finfo(compute_dtype(model, outputs)).eps)
    return max(EXACT_REL_L2, EXACT_EPS * eps)


class Verifier:
    """Holds sample inputs and the original model's outputs; checks later models against them."""

    def __init__(self, reference: ir.Model, feeds: dict[str, np.ndarray], providers: list[str] | None = None):
        self.feeds = feeds
        self.providers = providers
        self.reference = self.run(reference)
        self.output_shapes = {k: v.shape for k, v in self.reference.items()}

    def run(self, model: ir.Model) -> dict[str, np.ndarray]:
        from modelsurgeon.runtime.session import run_model

        return run_model(model, self.feeds, providers=self.providers, accuracy_level=0, prepack=False)  # runs once

    def check(self, model: ir.Model, *, run: bool = True, previous: dict[str, np.ndarray] | None = None,
              inherited: set[str] = frozenset()) -> dict[str, Any]:
        """Structural checks, then an ORT run; returns problems, outputs and errors against the reference.

        Structural problems in `inherited` (the input model's own) are not counted."""
        problems = [x for x in structural_problems(model) if x not in inherited]
        result: dict[str, Any] = {"problems": problems, "outputs": None, "errors": {}, "step_errors": {}}
        if not run or result["problems"]:
            return result
        try:
            outputs = self.run(model)
        except Exception as exc:
            result["problems"].append(f"ONNX Runtime: {str(exc).strip().splitlines()[0][:300]}")
            return result
        removed = set(model.meta.get(REMOVED_OUTPUTS, ()))  # a pass took them out on purpose (drop-blocks' KV cache)
        missing = [k for k in self.reference if k not in outputs and k not in removed]
        if missing:
            result["problems"].append(f"output '{missing[0]}' disappeared")
            return result
        for k, shape in self.output_shapes.items():
            if k in outputs and outputs[k].shape != shape:
                result["problems"].append(f"output '{k}' changed shape from {shape} to {outputs[k].shape}")
        if not np.all([np.all(np.isfinite(v)) for v in outputs.values() if np.issubdtype(v.dtype, np.floating)]):
            result["problems"].append("outputs contain NaN or Inf")
        result["outputs"] = outputs
        result["errors"] = compare_outputs(self.reference, outputs)
        if previous is not None:
            result["step_errors"] = compare_outputs(previous, outputs)
        return result
