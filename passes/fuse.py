"""`fuse`: rewrite decomposed subgraphs into ONNX Runtime's fused com.microsoft operators, exactly.

What fuses, and whose pattern does it:

- RMSNorm -> SimplifiedLayerNormalization, residual Add + RMSNorm -> SkipSimplifiedLayerNormalization,
  Add + LayerNormalization -> SkipLayerNormalization (onnxscript `rms_normalization`, `skip_normalization`; RMS norms
  that divide or have no scale, as `slice` leaves them, by `_norm_patterns`, written here);
- rotary embedding -> com.microsoft RotaryEmbedding with a cos/sin cache (onnxscript `rotary_embedding`,
  `cos_sin_cache`, plus ONE pattern written here, `_MulFreqsCosSinCache`: transformers 4.5x computes the angles as
  `position_ids[..., None].float() * inv_freq` (a Mul) where onnxscript expects `inv_freq @ position_ids` (a MatMul +
  Transpose), so without it the rotary fusion is undone and the attention fusions below it cannot match);
- scaled dot-product attention -> GroupQueryAttention (with a KV cache and an `attention_mask` input),
  MultiHeadAttention or Attention otherwise (onnxscript `sdpa`, `gqa`, `mha*`, `attention`, `sdpa_via_mha`);
- Erf/tanh GELU -> Gelu / FastGelu, bias + GELU -> BiasGelu, MatMul + Transpose/scale -> FusedMatMul (onnxscript);
- sibling projections (q/k/v, gate/up: MatMuls or MatMulNBits reading one activation) -> one product + Split, and a
  GroupQueryAttention over such a q/k/v Split reads the packed product (`_packed_projections`, written here);
- norms' unused statistics outputs (mean, inverse std) are unnamed, so ONNX Runtime does not compute them.

`compile()` appends this pass by default (`--no-fuse`, `compile(fuse=False)` leave it out); a default one that finds
nothing leaves no report row.

This is onnxscript's `optimize_for_ort` sequence (`ort_fusions._core.fuse_xformers`) with two changes: constant
folding never folds (de)quantization or custom-domain nodes (cleanup's rule: 4-bit weights stay 4-bit), and no
metadata is cleared. onnxruntime.transformers' optimizer is not used: it reads and writes protobufs of its own
model types (bert, gpt2, ...) and its fusions overlap these.

The pass runs after every structural and quantizing pass (stage FUSE): the structural analyses read the decomposed
form. MatMulNBits projections do not stop the fusions: the patterns start at the projections' outputs.
What the pass cannot do: GroupQueryAttention needs onnxscript's exact causal-mask pattern over an input named
`attention_mask` (Optimum- and torch-exported KV-cache graphs with other mask arithmetic get MultiHeadAttention, with
the mask and the repeated KV heads kept as they are). Like GenAI's models, a fused GroupQueryAttention reads the
mask's row sums only (left padding is not masked) and ONNX Runtime refuses it a batch of several rows with both a
cache and several new tokens (one-row chunks and single-token decode steps run). Opset-23 exports already carry ONNX's own RMSNormalization,
RotaryEmbedding and Attention, which ONNX Runtime runs natively, so they are left alone.
"""

from __future__ import annotations

import collections
import contextlib
import logging

import onnx_ir as ir
import onnx_ir.passes.common as common

from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Pass, PassResult, Stage, register_pass
from modelsurgeon.passes import _norm_patterns
from modelsurgeon.passes._packed_projections import pack_projections

log = logging.getLogger(__name__)

# Operators a fusion produces (domain, op type): the notes count them before and after.
FUSED_OPS = {
    ("", "SimplifiedLayerNormalization"), ("com.microsoft", "SkipSimplifiedLayerNormalization"),
    ("com.microsoft", "SkipLayerNormalization"), ("com.microsoft", "RotaryEmbedding"),
    ("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "MultiHeadAttention"),
    ("com.microsoft", "Attention"), ("com.microsoft", "Gelu"), ("com.microsoft", "FastGelu"),
    ("com.microsoft", "BiasGelu"), ("com.microsoft", "FusedMatMul"),
}
_FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate ops, inlined back when no later fusion used them


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def fused_op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.all_nodes() if (_domain(n), n.op_type) in FUSED_OPS)


def _mul_freqs_rules():
    """CosSinCache for angles computed as `Cast(Unsqueeze(position_ids, [-1])) * inv_freq` (transformers >= 4.5x
    exported by torch's dynamo exporter), rewritten as onnxscript's CosSinCacheFusion rewrites the MatMul form: a
    com.microsoft RotaryEmbedding reading position_ids and a [max position + 1, head_dim / 2] cos/sin cache computed
    from the same inv_freq (the same float products, so the same angles)."""
    from onnxscript.rewriter import _ir_utils, pattern
    from onnxscript.rewriter.ort_fusions.cos_sin_cache import CosSinCacheFusion

    class _MulFreqsCosSinCache(CosSinCacheFusion):
        def pattern(self, op, x, inv_freq, position_ids, interleaved, num_heads, freqs, dtype, extra_dims):
            pos = op.Cast(op.Unsqueeze(position_ids, extra_dims), to=ir.DataType.FLOAT)
            freqs = op.Mul(pos, inv_freq)  # [B, S, 1] * [E] -> [B, S, E]
            emb = op.Concat(freqs, freqs, axis=-1)
            cos, sin = op.Cos(emb), op.Sin(emb)
            if self._cast:
                cos, sin = op.Cast(cos, to=dtype), op.Cast(sin, to=dtype)
            return op.RotaryEmbedding(x, op.Unsqueeze(cos, [1]), op.Unsqueeze(sin, [1]), interleaved=interleaved,
                                      num_heads=num_heads, _domain=_FUSION_DOMAIN)

        def check(self, context, inv_freq, position_ids, extra_dims, **_):
            result = pattern.MatchResult()
            # [B, S] unsqueezed on the last axis, or [S] on the first and the last: [B or 1, S, 1]
            two_d = _ir_utils.has_rank(position_ids, 2) and (_ir_utils.is_singleton_value(extra_dims, 2)
                                                             or _ir_utils.is_singleton_value(extra_dims, -1))
            one_d = _ir_utils.has_rank(position_ids, 1) and (_ir_utils.is_1d_value(extra_dims, [0, 2])
                                                             or _ir_utils.is_1d_value(extra_dims, [0, -1]))
            if not (two_d or one_d):
                return result.fail("position_ids is not [B, S] or [S] unsqueezed to [B, S, 1]", position_ids)
            if inv_freq.const_value is None or inv_freq.shape is None or inv_freq.dtype != ir.DataType.FLOAT:
                return result.fail("inv_freq is not a float constant", inv_freq)
            if inv_freq.shape.rank() == 0 or any(d != 1 for d in inv_freq.shape[:-1]):
                return result.fail("inv_freq is not of shape [..., E]", inv_freq)
            return result

    return pattern.RewriteRuleSet([_MulFreqsCosSinCache.rule("CosSinCache_mul_cast", cast=True),
                                   _MulFreqsCosSinCache.rule("CosSinCache_mul", cast=False)])


def _gqa_lengths(model: ir.Model) -> None:
    """Give GroupQueryAttention its sequence lengths the way ONNX Runtime GenAI's models do.

    onnxscript's GQA rewrite takes seqlens_k = max(position_ids) per row and ignores the graph's attention_mask. With
    an `attention_mask` [B, T] input, seqlens_k = sum(mask) - 1 and total_sequence_length = T instead, so the mask
    still counts (right padding is masked as before; left padding is not, as in GenAI's own models). Without one,
    position_ids made by a Range are [1, S]: seqlens_k is expanded to the query's batch."""
    mask = next((v for v in model.graph.inputs if v.name == "attention_mask" and v.shape is not None
                 and v.shape.rank() == 2), None)

    def node(op, inputs, dtype, shape, **attrs):
        attributes = [ir.AttrInt64(k, v) if isinstance(v, int) else ir.AttrInt64s(k, v) for k, v in attrs.items()]
        n = ir.Node("", op, inputs, attributes=attributes, num_outputs=1)
        n.outputs[0].dtype, n.outputs[0].shape = dtype, ir.Shape(shape)
        return n

    def const(values):
        return node("Constant", [], ir.DataType.INT64, [len(values)], value_ints=values)

    i32, i64 = ir.DataType.INT32, ir.DataType.INT64
    for gqa in list(model.graph):
        if gqa.domain != "com.microsoft" or gqa.op_type != "GroupQueryAttention" or len(gqa.inputs) < 7:
            continue
        query, seqlens = gqa.inputs[0], gqa.inputs[5]
        batch_dim = query.shape[0] if query.shape is not None else None
        if mask is not None:
            axis = const([1])
            total = node("ReduceSum", [mask, axis.outputs[0]], mask.dtype, [mask.shape[0]], keepdims=0)
            total32 = node("Cast", [total.outputs[0]], i32, [mask.shape[0]], to=i32.value)
            one = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(1, dtype=i32))],
                          num_outputs=1)
            one.outputs[0].dtype, one.outputs[0].shape = i32, ir.Shape([])
            new_seqlens = node("Sub", [total32.outputs[0], one.outputs[0]], i32, [mask.shape[0]])
            width = node("Shape", [mask], i64, [1], start=1, end=2)
            width32 = node("Cast", [width.outputs[0]], i32, [1], to=i32.value)
            squeeze_axes = const([0])
            total_len = node("Squeeze", [width32.outputs[0], squeeze_axes.outputs[0]], i32, [])
            nodes = [axis, total, total32, one, new_seqlens, width, width32, squeeze_axes, total_len]
            model.graph.insert_before(gqa, nodes)
            gqa.replace_input_with(5, new_seqlens.outputs[0])
            gqa.replace_input_with(6, total_len.outputs[0])
        else:
            shape = node("Shape", [query], i64, [1], start=0, end=1)
            expand = node("Expand", [seqlens, shape.outputs[0]], seqlens.dtype, [batch_dim])
            model.graph.insert_before(gqa, [shape, expand])
            gqa.replace_input_with(5, expand.outputs[0])
        for out, past in zip(gqa.outputs[1:3], gqa.inputs[3:5]):  # present key/value: typed like the past
            if out.dtype is None and past is not None:
                out.dtype = past.dtype


def _broadcast_position_ids(model: ir.Model) -> None:
    """A RotaryEmbedding of a graph that makes position_ids [1, S] from a Range (no position_ids input) gets them
    expanded to [B, S]: ONNX Runtime's kernel wants one row per batch row (Expand to [B, 1] is a no-op otherwise)."""
    for node in list(model.graph):
        if node.domain != "com.microsoft" or node.op_type != "RotaryEmbedding":
            continue
        x, pos = node.inputs[0], node.inputs[1]
        if pos is None or pos.shape is None or pos.shape.rank() != 2 or (x.shape is not None and pos.shape[0] == x.shape[0]):
            continue
        batch = ir.Node("", "Shape", [x], attributes=[ir.AttrInt64("start", 0), ir.AttrInt64("end", 1)], num_outputs=1)
        one = ir.Value(name=None, const_value=ir.tensor([1], dtype=ir.DataType.INT64))
        const = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", one.const_value)], num_outputs=1)
        target = ir.Node("", "Concat", [batch.outputs[0], const.outputs[0]], attributes=[ir.AttrInt64("axis", 0)],
                         num_outputs=1)
        expand = ir.Node("", "Expand", [pos, target.outputs[0]], num_outputs=1)
        for v, dtype, shape in ((batch.outputs[0], ir.DataType.INT64, [1]), (const.outputs[0], ir.DataType.INT64, [1]),
                                (target.outputs[0], ir.DataType.INT64, [2]),
                                (expand.outputs[0], pos.dtype, [x.shape[0] if x.shape is not None else None,
                                                                pos.shape[1]])):
            v.dtype, v.shape = dtype, ir.Shape(shape)
        model.graph.insert_before(node, [batch, const, target, expand])
        node.replace_input_with(1, expand.outputs[0])


def _clear_fused_shapes(model: ir.Model) -> None:
    """Forget the shapes onnxscript's rewrites copied onto fused ops' outputs (a value of the replaced subgraph can
    carry a different rank); the manager infers them again from ONNX Runtime's schemas."""
    for node in model.graph.all_nodes():
        if (_domain(node), node.op_type) in FUSED_OPS:
            for out in node.outputs:
                if not out.is_graph_output():
                    out.shape = None


_NORMS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization",
          "LayerNormalization"}


def _drop_unused_norm_outputs(model: ir.Model) -> int:
    """Unname the statistics outputs (mean, inverse std) of norms that nothing reads: an optional output with a name
    is computed and written by ONNX Runtime's kernel (about a third of a SkipSimplifiedLayerNormalization's time at
    one decode token); an empty name means "not produced", as in GenAI's models. The first output (the result) and
    a Skip norm's last (the residual sum) are not statistics and stay. Returns how many were unnamed."""
    dropped = 0
    for node in model.graph.all_nodes():
        if node.op_type not in _NORMS:
            continue
        last = len(node.outputs) - 1 if node.op_type.startswith("Skip") else len(node.outputs)
        for out in node.outputs[1:last]:
            if out.name and not out.uses() and not out.is_graph_output():
                out.name = ""
                dropped += 1
    return dropped


def _optimize(model: ir.Model) -> None:
    """onnxscript's optimizer (inlining, folding, CSE) with cleanup's folding rule."""
    from onnxscript.optimizer import optimize_ir

    from modelsurgeon.passes.cleanup import _should_fold

    optimize_ir(model, should_fold=_should_fold)


_ATTENTION_STEPS = {"sdpa", "gqa", "packed_qkv_for_gqa", "mha1", "mha2", "mha_scale", "mha_bias", "attention",
                    "sdpa_via_mha"}


@contextlib.contextmanager
def _quiet_shape_inference():
    """onnx_ir's shape inference pass logs a warning with a traceback when ONNX's inference rejects the graph (GenAI's
    rank-0 Constants declared rank 1, say) and leaves the model unchanged, which is all the fusions need: keep that
    traceback off the user's terminal."""
    logger = logging.getLogger("onnx_ir.passes.common.shape_inference")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def fuse(model: ir.Model, attention: bool = True) -> dict[str, int]:
    """Apply the fusions in place; returns how often each fusion rule applied (onnxscript's names). `attention=False`
    leaves attention decomposed (norms, rotary embeddings and GELU still fuse)."""
    # the model's own functions (spquant's fallback for its custom op) stay calls: onnxscript's optimizer inlines every
    # function it finds, which would replace the custom op's kernel by its reference body
    own = dict(model.functions)
    model.functions.clear()
    try:
        with _quiet_shape_inference():
            return _fuse_all(model, attention)
    finally:
        model.functions.update(own)


def _fuse_all(model: ir.Model, attention: bool) -> dict[str, int]:
    from onnxscript.rewriter import _fusion_utils, rewrite
    from onnxscript.rewriter.ort_fusions import _core, shape_optimization
    from onnxscript.rewriter.ort_fusions import fused_matmul_rule_sets as fmm
    from onnxscript.rewriter.rules.common import _gemm_to_matmul_add

    rewrite(model, [_gemm_to_matmul_add.gemm_to_matmul_add_rule])
    _optimize(model)
    shape_optimization.rules.apply_to_model(model)
    _optimize(model)
    steps = [
        ("erf_gelu", _core.fuse_erfgelu, {}),
        ("rms_normalization", _core.fuse_rms_normalization, {}),
        ("rms_normalization_other_forms", _fusion_utils.apply_fusion_rules(_norm_patterns.rules()), {}),
        ("skip_layer_normalization", _core.fuse_skip_layer_normalization, {}),
        ("skip_rms_normalization", _core.fuse_skip_rms_normalization, {}),
        ("rotary_embedding", _core.fuse_rotary_embedding, {}),
        ("cos_sin_cache", _core.fuse_cos_sin_cache, {}),
        ("cos_sin_cache_mul", _fusion_utils.apply_fusion_rules(_mul_freqs_rules()), {}),
        ("cse", None, {}),
        ("partial_rotary_embedding", _core.fuse_partial_rotary_embedding, {}),
        ("sdpa", _core.fuse_sdpa, {"apply_shape_inference": True}),
        ("gqa", _core.fuse_gqa, {}),
        ("packed_qkv_for_gqa", _core.fuse_qkv_gqa, {}),
        ("mha1", _core.fuse_mha1, {}),
        ("mha2", _core.fuse_mha2, {}),
        ("mha_scale", _core.fuse_mha_scale, {}),
        ("mha_bias", _core.fuse_mha_bias, {}),
        ("attention", _core.fuse_attention, {}),
        ("gelu", _core.fuse_gelu, {}),
        ("bias_gelu", _core.fuse_bias_gelu, {}),
        ("sdpa_via_mha", _core.replace_sdpa_by_mha, {}),
    ]
    counts: dict[str, int] = {}
    for name, fn, kwargs in steps:
        if fn is None:
            common.CommonSubexpressionEliminationPass()(model)
            continue
        if name in _ATTENTION_STEPS and not attention:
            continue
        if name in ("mha_bias", "attention") and not (counts.get("mha1") or counts.get("mha2")):
            continue  # as onnxscript: these refine a MultiHeadAttention the mha fusions made
        counts[name] = int(fn(model, **kwargs))
        if name == "gqa" and counts[name]:
            _gqa_lengths(model)
    _optimize(model)  # inlines the intermediate fusion ops no later fusion consumed
    rewrite(model, _core.ORT_PATTERN_REWRITE_RULES)
    common.RemoveUnusedNodesPass()(model)
    _broadcast_position_ids(model)
    counts["packed_projections"] = pack_projections(model)
    common.RemoveUnusedNodesPass()(model)
    counts["unused_norm_outputs"] = _drop_unused_norm_outputs(model)
    _clear_fused_shapes(model)
    return {k: v for k, v in counts.items() if v}


# Ops some fusion starts from: norms, rotary embeddings, attention, GELU, MatMul + Transpose / scale (FusedMatMul).
_CANDIDATE_OPS = {"ReduceMean", "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
                  "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "Sin", "Cos", "RotaryEmbedding",
                  "Softmax", "Erf", "Tanh", "Transpose", "Attention", "MultiHeadAttention", "GroupQueryAttention"}


def _has_candidates(model: ir.Model) -> bool:
    """Whether any fusion could apply: an op a fusion starts from, or two products of one activation (packing). A
    graph without either (a chain of MatMuls, a CNN without attention) is left alone without the cost of trying."""
    readers: collections.Counter = collections.Counter()
    for node in model.graph.all_nodes():
        if node.op_type in _CANDIDATE_OPS:
            return True
        if node.op_type in ("MatMul", "MatMulNBits") and node.inputs and node.inputs[0] is not None:
            readers[id(node.inputs[0])] += 1
            if readers[id(node.inputs[0])] > 1:
                return True
    return False


@register_pass
class FusePass(Pass):
    name = "fuse"
    summary = "fuse norms, rotary embeddings, attention and GELU into ONNX Runtime's com.microsoft ops (exact)"
    stage = Stage.FUSE
    exact = True
    preserves = ()

    def run(self, model, ctx):
        if not _has_candidates(model):  # cheap: fusing clones, folds and re-checks the whole model
            return PassResult(model, False, notes={"fused": "nothing to fuse"})
        work, rules, left = None, {}, None
        for attention in (True, False):
            work = model.clone()  # tensors shared; the input stays as it is when nothing fuses or a rule fails
            rules = self._fuse(work, attention)
            problem = self._new_problem(model, work, ctx)
            if problem is None:
                break
            # onnxscript's attention patterns can replace a value of another rank (GPT-2's [B*S, D] for Gemm)
            left = f"attention left decomposed: fusing it made the model invalid ({problem[:160]})"
            log.warning("fuse: %s", left)
            work = None
        if work is None:
            return PassResult(model, False, notes={"fused": "nothing (the fused model was invalid)"}, skipped=[left])
        before_ops, after_ops = fused_op_counts(model), fused_op_counts(work)
        fused = {op: after_ops[op] - before_ops.get(op, 0) for op in sorted(set(after_ops) | set(before_ops))
                 if after_ops[op] != before_ops.get(op, 0)}
        if not fused and not rules.get("packed_projections") and not rules.get("unused_norm_outputs"):
            return PassResult(model, False, notes={"fused": "nothing to fuse"}, skipped=[left] if left else [])
        nodes_before = sum(1 for _ in model.graph.all_nodes())
        nodes_after = sum(1 for _ in work.graph.all_nodes())
        return PassResult(work, True, notes={"fused": fused, "nodes_removed": nodes_before - nodes_after,
                                             "rules": rules}, skipped=[left] if left else [])

    @staticmethod
    def _fuse(work: ir.Model, attention: bool) -> dict[str, int]:
        try:
            rules = fuse(work, attention=attention)
        except UserError:
            raise
        except Exception as exc:  # an onnxscript rule that fails on a graph it did not foresee
            first = str(exc).splitlines()[0][:160] if str(exc) else ""
            raise UserError(f"fuse: onnxscript's fusions failed on this graph ({type(exc).__name__}: {first}); "
                            "leave fuse out of --passes") from exc
        leftover = sorted({n.op_type for n in work.graph.all_nodes() if n.domain == _FUSION_DOMAIN})
        if leftover:
            raise UserError(f"fuse: onnxscript left intermediate {leftover[0]} nodes that ONNX Runtime cannot run; "
                            "leave fuse out of --passes")
        return rules

    @staticmethod
    def _new_problem(model: ir.Model, work: ir.Model, ctx) -> str | None:
        """The first checker / strict shape inference problem of `work` that the input does not have."""
        from modelsurgeon.value_types import complete_types
        from modelsurgeon.verify import structural_problems

        complete_types(work, ctx)
        problems = structural_problems(work)
        if not problems:
            return None
        inherited = set(structural_problems(model))
        return next((p for p in problems if p not in inherited), None)
