"""canonicalize: put every exporter's transformer in the one form the block finder and structural passes read.

Runs `modelsurgeon.canonical.canonicalize` (see there): no-op Casts removed (TorchScript, Optimum), com.microsoft
skip norms split into Add + (Simplified)LayerNormalization (ONNX Runtime GenAI, ORT's fusions), GenAI's tied table
stored as torch stores a tie. Exact: the model computes the same function with the same operations.

Every pass that reads the "blocks" analysis declares `requires = ("canonicalize",)`, so the pipeline runs this
first (once); the analysis itself only reads the graph. ONNX Runtime fuses the split norms back when it loads the
model, so the split costs nothing at run time.
"""

from __future__ import annotations

from modelsurgeon.canonical import canonicalize
from modelsurgeon.pass_api import Pass, PassResult, Stage, register_pass


@register_pass
class CanonicalizePass(Pass):
    name = "canonicalize"
    summary = ("exact: drop no-op Casts, split com.microsoft skip norms into Add + norm, store a GenAI tied table as "
               "torch does (the form structural passes read; they run it first)")
    stage = Stage.CLEANUP  # exact and order-free, like the cleanups
    exact = True

    def run(self, model, ctx):
        rewritten = canonicalize(model)
        return PassResult(model, rewritten > 0, notes={"nodes_rewritten": rewritten} if rewritten else {})
