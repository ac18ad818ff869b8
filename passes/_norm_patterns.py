"""RMS norms onnxscript's `rms_normalization` rules do not match, rewritten to `SimplifiedLayerNormalization`.

onnxscript matches `Mul(Mul(x, Reciprocal(Sqrt(ReduceMean(Pow(x, 2)) + eps))), scale)`, the form torch's dynamo
exporter writes. Forms it misses reach `fuse`:

- the norm divides, `x / Sqrt(...)` (hand-written graphs, and the norms `fold_norms` writes), or multiplies by
  `1 / Sqrt(...)` (TorchScript's `rsqrt`, so every Optimum export: SmolLM2's 61 norms stayed decomposed);
- the norm has no scale: `slice` and `fold_norms` fold the gains into the next layers, so cleanup removes the Mul by
  ones and leaves the bare normalization (SmolLM2 after `slice`: 61 norms of 5 nodes each, all left decomposed).

`_Unscaled` rewrites either normalization to `SimplifiedLayerNormalization(x, ones)`; `_ScaledAfter` then takes a
constant scale Mul that follows into the norm's scale. Both compute what they replace (the same float operations, the
gain 1 exactly), and onnxscript's skip rule then fuses a residual Add before them like any other RMS norm.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def rules():
    from onnxscript.rewriter import _ir_utils, pattern

    float_types = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}

    class _Unscaled(pattern.RewriteRuleClassBase):
        def __init__(self, name: str, form: str, x_first: bool = True):
            super().__init__(name)
            self._form, self._x_first = form, x_first

        def pattern(self, op, x, epsilon):
            square = op.Pow(x, 2.0)  # axes as an input (opset 18+) or an attribute (before)
            mean_square = pattern.OrValue([op.ReduceMean(square, [-1], keepdims=1),
                                           op.ReduceMean(square, axes=[-1], keepdims=1)])
            rms = op.Sqrt(op.Add(mean_square, epsilon))
            if self._form == "divide":
                return op.Div(x, rms)
            inverse = op.Reciprocal(rms) if self._form == "reciprocal" else op.Div(1.0, rms)
            return op.Mul(x, inverse) if self._x_first else op.Mul(inverse, x)

        def check(self, context, x, epsilon, **_):
            result = pattern.MatchResult()
            if not isinstance(_ir_utils.get_singleton_value(epsilon), float):
                return result.fail("epsilon is not a float scalar", epsilon)
            if x.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):  # the normalization runs in x's type
                return result.fail("x is not float or double", x)
            if x.shape is None or x.shape.rank() == 0 or not isinstance(x.shape[-1], int):
                return result.fail("x's last axis is not static", x)
            return result

        def rewrite(self, op, x, epsilon, **_):
            ones = op.initializer(ir.tensor(np.ones(x.shape[-1], ir.DataType(x.dtype).numpy())),
                                  name=f"{x.name}_rms_unit_scale")
            return op.SimplifiedLayerNormalization(x, ones, axis=-1, epsilon=_ir_utils.get_singleton_value(epsilon),
                                                   stash_type=int(x.dtype))

    class _ScaledAfter(pattern.RewriteRuleClassBase):
        def __init__(self, name: str, scale_first: bool):
            super().__init__(name)
            self._scale_first = scale_first

        def pattern(self, op, x, unit, scale):
            normalized = op.SimplifiedLayerNormalization(x, unit, _allow_other_attributes=True, _outputs=["normalized"])
            return op.Mul(scale, normalized) if self._scale_first else op.Mul(normalized, scale)

        def check(self, context, x, unit, scale, normalized, **_):
            result = pattern.MatchResult()
            u, s = unit.const_value, scale.const_value
            if u is None or s is None or scale.dtype not in float_types or scale.dtype != normalized.dtype:
                return result.fail("the scales are not constants of the norm's type", scale)
            if len(normalized.uses()) != 1 or normalized.is_graph_output():
                return result.fail("the norm's output has other readers", normalized)
            if s.numpy().ndim != 1 or s.numpy().shape != u.numpy().shape or not np.all(u.numpy() == 1):
                return result.fail("not a unit-scale norm followed by a per-channel scale", scale)
            return result

        def rewrite(self, op, x, unit, scale, normalized, **_):
            producer = normalized.producer()
            attrs = {k: a.value for k, a in producer.attributes.items()}
            return op.SimplifiedLayerNormalization(x, scale, **attrs)

    return pattern.RewriteRuleSet([_Unscaled.rule("RmsNormDivide", form="divide"),
                                   *[_Unscaled.rule(f"RmsNorm_{form}_{order}", form=form, x_first=order == "x_first")
                                     for form in ("reciprocal", "one_over") for order in ("x_first", "x_last")],
                                   _ScaledAfter.rule("RmsNormScaleAfter", scale_first=False),
                                   _ScaledAfter.rule("RmsNormScaleBefore", scale_first=True)])
