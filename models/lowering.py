"""Lowering the zoo's torch modules to ONNX: the exporter's optimizer, readable weight names, BatchNorm kept or not.

`torch.onnx.export(dynamo=True)` folds `Transpose(weight)` of every Linear into a new initializer with a
generated name (`val_15`); `name_folded_weights` gives such initializers back a name derived from the
parameter they were folded from: `layers.0.self_attn.q_proj.weight.T` holds `q_proj.weight` transposed
([in, out], the MatMul's B). Identical copies get the parameter's own name when it is free. Only names change.

`lower(..., keep_batchnorm=True)` runs the exporter's default optimization minus its BatchNorm fusion, so
Conv -> BatchNormalization pairs stay in the graph (for passes that handle or fold BatchNorm themselves).
"""

from __future__ import annotations

import ast
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


def lower(module: Any, example_inputs: tuple, *, opset: int, input_names: Sequence[str], output_names: Sequence[str],
          dynamic_shapes: Any, keep_batchnorm: bool = False) -> ir.Model:
    """`modelsurgeon.from_torch` plus readable names for folded weights (and optionally unfused BatchNorm)."""
    from modelsurgeon.model_io import from_torch

    model = from_torch(module, example_inputs, opset=opset, input_names=input_names, output_names=output_names,
                       dynamic_shapes=dynamic_shapes, optimize=not keep_batchnorm)
    if keep_batchnorm:
        optimize_keeping_batchnorm(model)
    name_folded_weights(model, {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()})
    return model


def optimize_keeping_batchnorm(model: ir.Model) -> None:
    """onnxscript's `optimize_ir` (what the exporter runs) without the BatchNorm-into-Conv/Gemm fusion rules."""
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    fusions = set(_fuse_batchnorm.rules.rules)
    rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if r not in fusions]
    passes = ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([_constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=8192,
                                                                   output_size_limit=262144),
                               rewriter.RewritePass(rules), common.RemoveUnusedNodesPass(),
                               common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()],
                              steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )
    passes(model)


def name_folded_weights(model: ir.Model, parameters: dict[str, np.ndarray]) -> int:
    """Rename initializers folded from exactly one parameter: `<param>.T` if transposed, `<param>` if a copy.

    The array is compared with the parameter before renaming, so a name never lies. Returns how many changed.
    """
    graph = model.graph
    io_names = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    renamed = 0
    for value in list(graph.initializers.values()):
        sources = value.metadata_props.get(FOLDED_FROM)
        if not sources or value.name in parameters or value.name in io_names or value.const_value is None:
            continue
        try:
            sources = ast.literal_eval(sources)
        except (ValueError, SyntaxError):
            continue
        if len(sources) != 1 or sources[0] not in parameters:
            continue
        source = parameters[sources[0]]
        array = value.const_value.numpy()
        if array.ndim == 2 and array.shape == source.shape[::-1] and np.array_equal(array, source.T):
            new_name = f"{sources[0]}.T"
        elif array.shape == source.shape and np.array_equal(array, source):
            new_name = sources[0]
        else:
            continue
        if new_name in graph.initializers:
            continue
        graph.initializers.pop(value.name)
        value.name = new_name
        graph.register_initializer(value)
        renamed += 1
    return renamed
