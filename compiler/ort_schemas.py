"""ONNX Runtime's own operators made known to onnx, so its checker and shape inference handle them.

ONNX Runtime runs operators onnx has never heard of: the com.microsoft contrib ops (MatMulNBits,
GroupQueryAttention, SkipSimplifiedLayerNormalization, ...) and a few it adds to the ONNX domain itself
(SimplifiedLayerNormalization, which ONNX Runtime GenAI's builder emits). Unknown to onnx, the checker refuses
a model with SimplifiedLayerNormalization ("No Op registered ... with domain_version of 22"), and shape
inference leaves every value downstream of a contrib op untyped. `register()` copies ONNX Runtime's schemas
(`get_all_operator_schema`) into onnx's registry once per process, for every (domain, op) onnx lacks: the
checker then validates those nodes (arity, attributes, input types against the type constraints) and shape
inference types their outputs.

What it can't do: ONNX Runtime does not expose its inference functions, so outputs are typed from the
schema alone: an output takes the element type of the first given input under the same type constraint, or
the constraint's only allowed type; an output whose type constraint no input binds (SimplifiedLayerNorm's
optional inv_std_var) stays untyped. Shapes are inferred only for the ops in `_SHAPES` (normalizations,
GELUs, rotary embedding, MatMulNBits, GatherBlockQuantized, the attention ops, int8 matmuls); any other
contrib op's outputs get an element type without a shape. Schemas onnx already has (Attention, RotaryEmbedding
at opset 23) are onnx's, never replaced.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Callable

import onnx
import onnx.defs

log = logging.getLogger("modelsurgeon")

Dims = list  # of int (a fixed size), str (a symbolic one) or None (unknown)

_lock = threading.Lock()
_registered: int | None = None


def register() -> int:
    """Register ONNX Runtime's schemas that onnx lacks (once per process); returns how many were added."""
    global _registered
    with _lock:
        if _registered is None:
            _registered = _register_all()
        return _registered


def _register_all() -> int:
    if not hasattr(onnx.defs, "register_schema") or not hasattr(onnx.defs.OpSchema, "set_type_and_shape_inference_function"):
        log.debug("onnx %s cannot take Python schemas: ONNX Runtime's operators stay unknown to it", onnx.__version__)
        return 0
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:  # a build of ONNX Runtime without the schema table
        return 0
    try:  # onnx's reference evaluator (onnxscript's constant folder) indexes schemas by name alone when first
        importlib.import_module("onnx.reference.op_run")  # imported: it must see onnx's only (com.microsoft has Trilu too)
    except ImportError:
        pass
    known = {(s.domain, s.name) for s in onnx.defs.get_all_schemas_with_history()}
    added = 0
    for ort_schema in sorted(get_all_operator_schema(), key=lambda s: (s.domain, s.name, s.since_version)):
        if (ort_schema.domain, ort_schema.name) in known or ort_schema.deprecated:
            continue
        try:
            onnx.defs.register_schema(_to_onnx(ort_schema))
            added += 1
        except Exception as exc:  # a schema onnx cannot express: that op stays unknown, like before
            log.debug("could not register %s::%s-%d with onnx: %s", ort_schema.domain, ort_schema.name,
                      ort_schema.since_version, exc)
    return added


def _to_onnx(s) -> onnx.defs.OpSchema:
    P = onnx.defs.OpSchema

    def params(formals):
        return [P.FormalParameter(f.name, f.typeStr, param_option=P.FormalParameterOption(int(f.option)),
                                  is_homogeneous=f.isHomogeneous) for f in formals]

    attributes = []
    for name, a in s.attributes.items():
        default = onnx.AttributeProto.FromString(a._default_value) if a._default_value else None
        if default is not None and default.type:
            attributes.append(P.Attribute(name, default))
        else:
            attributes.append(P.Attribute(name, P.AttrType(int(a.type)), required=bool(a.required)))
    schema = P(s.name, s.domain, s.since_version, "", inputs=params(s.inputs), outputs=params(s.outputs),
               type_constraints=[(t.type_param_str, list(t.allowed_type_strs), "") for t in s.type_constraints],
               attributes=attributes)
    schema.set_type_and_shape_inference_function(_inference(s))
    return schema


# ------------------------------------------------------------------------------------------------------------
# inference: element types from the type constraints, shapes from the table below


def _inference(s) -> Callable:
    inputs = [f.typeStr for f in s.inputs]
    variadic_last = bool(s.inputs) and int(s.inputs[-1].option) == int(onnx.defs.OpSchema.FormalParameterOption.Variadic)
    outputs = [f.typeStr for f in s.outputs]
    allowed = {t.type_param_str: list(t.allowed_type_strs) for t in s.type_constraints}
    shape_rule = _SHAPES.get(s.name)

    def formal_of(i: int) -> str | None:
        if i < len(inputs):
            return inputs[i]
        return inputs[-1] if variadic_last else None

    def infer(ctx) -> None:
        try:
            types = [ctx.get_input_type(i) if ctx.has_input(i) else None for i in range(ctx.get_num_inputs())]
            elems = [t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else 0 for t in types]
            dims = [_dims(t) for t in types]
            shapes = shape_rule(dims, _Attrs(ctx), elems) if shape_rule is not None else {}
            for i in range(min(ctx.get_num_outputs(), len(outputs))):
                if not ctx.has_output(i):
                    continue
                elem = _output_elem(outputs[i], allowed, elems, formal_of)
                if elem:
                    ctx.set_output_type(i, _tensor_type(elem, shapes.get(i)))
        except Exception as exc:  # inference is best effort: the ORT run still checks the model
            log.debug("shape inference of %s::%s: %s", s.domain, s.name, exc)

    return infer


def _output_elem(type_str: str, allowed: dict[str, list[str]], elems: list[int], formal_of) -> int:
    for i, elem in enumerate(elems):
        if elem and formal_of(i) == type_str:
            return elem
    choices = allowed.get(type_str, [type_str])
    if len(choices) == 1 and choices[0].startswith("tensor(") and choices[0].endswith(")"):
        return _ELEM_BY_NAME.get(choices[0][len("tensor("):-1], 0)
    return 0


_ELEM_BY_NAME = {onnx.helper.tensor_dtype_to_string(t).split(".")[-1].lower(): t
                 for t in onnx.TensorProto.DataType.values() if t}
_ELEM_BY_NAME.update({"float": onnx.TensorProto.FLOAT, "double": onnx.TensorProto.DOUBLE,
                      "float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16})


def _dims(t: onnx.TypeProto | None) -> Dims | None:
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]


def _tensor_type(elem: int, dims: Dims | None) -> onnx.TypeProto:
    t = onnx.TypeProto()
    t.tensor_type.elem_type = elem
    if dims is not None:
        shape = t.tensor_type.shape
        shape.SetInParent()
        for d in dims:
            dim = shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif isinstance(d, str):
                dim.dim_param = d
    return t


class _Attrs:
    """A node's attributes (and which optional inputs it has) during inference."""

    def __init__(self, ctx):
        self.ctx = ctx

    def has_input(self, i: int) -> bool:
        return i < self.ctx.get_num_inputs() and self.ctx.has_input(i)

    def int(self, name: str, default: int | None = None) -> int | None:
        a = self.ctx.get_attribute(name)
        return a.i if a is not None and a.type == onnx.AttributeProto.INT else default

    def ints(self, name: str) -> list[int]:
        a = self.ctx.get_attribute(name)
        return list(a.ints) if a is not None and a.type == onnx.AttributeProto.INTS else []


def _get(dims: list[Dims | None], i: int) -> Dims | None:
    return dims[i] if i < len(dims) else None


def _mul(*ds) -> int | None:
    out = 1
    for d in ds:
        if not isinstance(d, int):
            return None
        out *= d
    return out


def _like_first(dims, attrs, elems) -> dict[int, Dims]:
    return {0: dims[0]} if dims and dims[0] is not None else {}


def _skip_norm(dims, attrs, elems) -> dict[int, Dims]:  # output and input_skip_bias_sum are shaped like input
    return {0: dims[0], 3: dims[0]} if dims and dims[0] is not None else {}


def _matmul_nbits(dims, attrs, elems) -> dict[int, Dims]:
    a, n = _get(dims, 0), attrs.int("N")
    return {0: a[:-1] + [n]} if a and n is not None else {}


def _matmul_2d_weight(dims, attrs, elems) -> dict[int, Dims]:  # DynamicQuantizeMatMul, MatMulIntegerToFloat
    a, b = _get(dims, 0), _get(dims, 1)
    return {0: a[:-1] + [b[-1]]} if a and b is not None and len(b) == 2 else {}


def _gather_block_quantized(dims, attrs, elems) -> dict[int, Dims]:
    data, idx = _get(dims, 0), _get(dims, 1)
    if data is None or idx is None:
        return {}
    axis = attrs.int("gather_axis", 0) % len(data)
    if axis == len(data) - 1:
        return {}
    out = data[:axis] + idx + data[axis + 1:]
    if elems[0] == onnx.TensorProto.UINT8:  # packed: 8 // bits values per byte along the last axis
        out[-1] = _mul(out[-1], 8 // (attrs.int("bits", 4) or 4))
    return {0: out}


def _heads_out(batch_seq: Dims, hidden) -> Dims:
    return [batch_seq[0], batch_seq[1], hidden]


def _group_query_attention(dims, attrs, elems) -> dict[int, Dims]:
    q = _get(dims, 0)
    heads, kv_heads = attrs.int("num_heads"), attrs.int("kv_num_heads")
    if q is None or len(q) != 3 or not heads or not kv_heads:
        return {}
    packed = not attrs.has_input(1)  # no key: q, k and v packed in the query
    head = q[2] // (heads + 2 * kv_heads) if packed and isinstance(q[2], int) else \
        (q[2] // heads if isinstance(q[2], int) else None)
    out = {0: _heads_out(q, _mul(heads, head))}
    for i in (1, 2):
        out[i] = [q[0], kv_heads, None, head]
    return out


def _multi_head_attention(dims, attrs, elems) -> dict[int, Dims]:
    q, k, v = _get(dims, 0), _get(dims, 1), _get(dims, 2)
    heads = attrs.int("num_heads")
    if q is None or len(q) not in (3, 5):
        return {}
    hidden = None
    if len(q) == 5:  # packed q, k, v: [batch, seq, heads, 3, head]
        hidden = _mul(q[2], q[4])
    elif v is not None and len(v) == 3:
        hidden = v[2]
    elif v is not None and len(v) == 4:  # [batch, heads, kv_seq, head]
        hidden = _mul(v[1], v[3])
    elif v is None and k is not None and len(k) == 5:  # packed k, v: [batch, kv_seq, heads, 2, head]
        hidden = _mul(k[2], k[4])
    out = {0: _heads_out(q, hidden)}
    head = hidden // heads if isinstance(hidden, int) and heads else None
    for i in (1, 2):
        out[i] = [q[0], heads, None, head]
    return out


def _contrib_attention(dims, attrs, elems) -> dict[int, Dims]:
    x, w = _get(dims, 0), _get(dims, 1)
    if x is None or len(x) != 3:
        return {}
    sizes = attrs.ints("qkv_hidden_sizes")
    hidden = sizes[2] if len(sizes) == 3 else (w[1] // 3 if w is not None and len(w) == 2 and isinstance(w[1], int) else None)
    return {0: _heads_out(x, hidden)}


_SHAPES: dict[str, Callable[[list, _Attrs, list], dict[int, Dims]]] = {
    "SimplifiedLayerNormalization": _like_first,
    "SkipSimplifiedLayerNormalization": _skip_norm,
    "SkipLayerNormalization": _skip_norm,
    "RotaryEmbedding": _like_first,
    "FastGelu": _like_first,
    "QuickGelu": _like_first,
    "BiasGelu": _like_first,
    "Gelu": _like_first,
    "MatMulNBits": _matmul_nbits,
    "DynamicQuantizeMatMul": _matmul_2d_weight,
    "MatMulIntegerToFloat": _matmul_2d_weight,
    "GatherBlockQuantized": _gather_block_quantized,
    "GroupQueryAttention": _group_query_attention,
    "MultiHeadAttention": _multi_head_attention,
    "Attention": _contrib_attention,
}
