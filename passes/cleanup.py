"""Cleanup passes: exact rewrites that remove what the model does not need.

- `dce`: removes nodes whose outputs nothing uses, unused functions and opset imports.
- `fold-constants`: folds subgraphs of constants (onnxscript's optimizer). Never folds (De)QuantizeLinear
  or custom-domain ops, so quantized weights stay quantized; keeps large constants unfolded.
- `dedup`: stores identical initializers (same dtype, shape, bytes) once.
- `remove-identity`: removes Identity nodes, keeping graph output names.
- `cleanup`: all of the above, run at the end of every pipeline unless switched off.
Each preserves the model's outputs exactly.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from modelsurgeon.pass_api import Option, Pass, PassResult, Stage, register_pass

_NEVER_FOLD = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"}
# Node metadata: a pass's view of a stored tensor (a Reshape of a weight another node also reads) stays a node, so
# that folding does not write the tensor into the file a second time; ORT folds it in memory at session creation.
KEEP_UNFOLDED = "modelsurgeon.keep_unfolded"


def _run_ir_passes(model: ir.Model, passes) -> bool:
    modified = False
    for p in passes:
        result = p(model)
        model = result.model
        modified |= result.modified
    return modified


def _should_fold(node: ir.Node) -> bool | None:
    if node.op_type in _NEVER_FOLD or node.domain not in ("", "ai.onnx") or KEEP_UNFOLDED in node.metadata_props:
        return False
    return None


def fold_constants(model: ir.Model) -> bool:
    from onnxscript.optimizer._constant_folding import fold_constants as _fold

    return bool(_fold(model, onnx_shape_inference=False, should_fold=_should_fold).modified)


def remove_unused(model: ir.Model) -> bool:
    return _run_ir_passes(model, [common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                                  common.RemoveUnusedOpsetsPass()])


def _make_initializers_contiguous(model: ir.Model) -> None:
    """Store in-memory initializers as C-contiguous arrays: constant folding can leave a transposed view (folding
    Transpose of a weight), which onnx_ir's deduplication cannot hash."""
    import numpy as np

    for graph in model.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if isinstance(t, ir.Tensor) and isinstance(t.raw, np.ndarray) and not t.raw.flags["C_CONTIGUOUS"]:
                value.const_value = ir.Tensor(np.ascontiguousarray(t.raw), dtype=t.dtype, name=t.name)


def deduplicate_initializers(model: ir.Model) -> bool:
    _make_initializers_contiguous(model)
    return _run_ir_passes(model, [common.DeduplicateHashedInitializersPass()])


def remove_identity(model: ir.Model) -> bool:
    return _run_ir_passes(model, [common.IdentityEliminationPass()])


class _CleanupBase(Pass):
    stage = Stage.CLEANUP
    exact = True
    preserves = ()


@register_pass
class DeadCodePass(_CleanupBase):
    name = "dce"
    summary = "remove nodes, functions and opset imports nothing uses"

    def run(self, model, ctx):
        return PassResult(model, remove_unused(model))


@register_pass
class FoldConstantsPass(_CleanupBase):
    name = "fold-constants"
    summary = "fold constant subgraphs (never (de)quantization nodes)"

    def run(self, model, ctx):
        modified = fold_constants(model)
        modified |= remove_unused(model)
        return PassResult(model, modified)


@register_pass
class DedupInitializersPass(_CleanupBase):
    name = "dedup"
    summary = "store identical initializers once"

    def run(self, model, ctx):
        before = len(model.graph.initializers)
        modified = deduplicate_initializers(model)
        return PassResult(model, modified, notes={"initializers_removed": before - len(model.graph.initializers)})


@register_pass
class RemoveIdentityPass(_CleanupBase):
    name = "remove-identity"
    summary = "remove Identity nodes"

    def run(self, model, ctx):
        return PassResult(model, remove_identity(model))


@register_pass
class CleanupPass(_CleanupBase):
    name = "cleanup"
    summary = "dead code, constant folding, identical initializers, identities (runs at the end of every pipeline)"
    options = {"fold": Option(bool, True, "fold constant subgraphs")}

    def run(self, model, ctx):
        before = (len(list(model.graph.all_nodes())), len(model.graph.initializers))
        modified = remove_identity(model)
        if self.config["fold"]:
            modified |= fold_constants(model)
        modified |= deduplicate_initializers(model)
        modified |= remove_unused(model)
        after = (len(list(model.graph.all_nodes())), len(model.graph.initializers))
        return PassResult(model, modified, notes={"nodes_removed": before[0] - after[0],
                                                  "initializers_removed": before[1] - after[1]})
