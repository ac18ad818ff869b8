"""`fold-norms`: turn every norm on a pre-norm transformer's residual stream into a weightless RMS norm.

What changes (exact: outputs match to float round-off):
- LayerNorm models (OPT, GPT-2 style): every writer of the residual stream is made to write zero-mean vectors
  (the embedding tables and added constants have their rows centered; the attention and MLP output
  projections have their output columns and biases centered). On a zero-mean stream LayerNorm equals RMSNorm
  with the same epsilon, so each LayerNorm becomes an RMS norm.
- Each norm's scale g and bias b move into the linear layers that read the norm:
  `(n*g + b) @ W + c = n @ (diag(g) W) + (b @ W + c)`; a bias Add is created where a layer had none.
- The norm left behind is weightless: `RMSNormalization` (scale of ones) from opset 23, else the decomposed
  Pow/ReduceMean/Add/Sqrt/Div/Mul(ones) form that ONNX Runtime fuses into SimplifiedLayerNormalization.

What is preserved: every graph output, every other node, input and output names. Weights shared between
layers (tied embeddings, deduplicated initializers) are copied before they change. A final norm with no LM
head after it (its output is a graph output) keeps its scale and bias. Post-norm (BERT-style) models are
refused: their norms sit on the residual stream itself, after each add, so there is nothing to fold into.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelsurgeon.analyses.blocks import (Linear, Norm, TransformerBlocks, const_array, copy_type, drop_if_unused,
                                          naming, new_initializer, replace_value, require_float_linears, unique_name,
                                          views_of)
from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Pass, PassResult, Stage, register_pass

POST_NORM_MESSAGE = ("post-LayerNorm (BERT-style) blocks normalize the residual stream after each add, so the norms "
                     "cannot be folded into linear layers and the stream cannot be rotated; {what} needs a pre-norm "
                     "transformer (Llama, OPT, GPT-2 style)")


def require_pre_norm(tb: TransformerBlocks, what: str) -> None:
    """Raise UserError unless `tb` describes a pre-norm transformer."""
    if tb.layout == "post-norm":
        raise UserError(POST_NORM_MESSAGE.format(what=what))
    if not tb.blocks:
        why = "; ".join(tb.problems) or "no embedding -> residual add -> norm chain"
        raise UserError(f"{what} needs a transformer, and no transformer blocks were found ({why}); "
                        "run `modelsurgeon inspect` to see what was detected")


def opset_of(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 18)))


def emit_rms_norm(graph: ir.Graph, x: ir.Value, epsilon: float, scale: np.ndarray, opset: int,
                  before: ir.Node, name: str, compute_dtype: ir.DataType | None = None,
                  out_dtype: ir.DataType | None = None) -> ir.Value:
    """Insert `x / sqrt(mean(x^2, -1) + eps) * scale` before `before`; return its output value.

    Opset >= 23: one RMSNormalization; below: Pow, ReduceMean, Add, Sqrt, Div, Mul (ORT fuses this form
    into SimplifiedLayerNormalization; the Reciprocal form the torch exporter writes is not fused).
    With `compute_dtype` (a norm that ran in float32 inside Casts, as fp16 exports do) x is cast to it first,
    and the result is cast to `out_dtype` (default: x's type).
    """
    in_dtype = x.dtype
    out_dtype = out_dtype or in_dtype
    work = compute_dtype or in_dtype
    dtype = np.float16 if work == ir.DataType.FLOAT16 else np.float32
    g = new_initializer(graph, np.asarray(scale, dtype), f"{name}.scale")
    nodes: list[ir.Node] = []

    def node(op: str, inputs: list, **attrs) -> ir.Value:
        n = ir.Node("", op, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
                    name=unique_name(graph, f"{name}/{op}"))
        n.outputs[0].name = unique_name(graph, f"{name}/{op.lower()}")
        copy_type(n.outputs[0], x)
        if op == "Cast":
            n.outputs[0].dtype = ir.DataType(attrs["to"])
        elif work is not None:
            n.outputs[0].dtype = work
        nodes.append(n)
        return n.outputs[0]

    source = x
    if work is not None and in_dtype is not None and work != in_dtype:
        x = node("Cast", [x], to=int(work))
        copy_type(x, source, shape=True)
        x.dtype = work
    if opset >= 23:
        y = node("RMSNormalization", [x, g], axis=-1, epsilon=float(epsilon))
    else:
        two = new_initializer(graph, np.asarray(2.0, dtype), f"{name}.two")
        eps = new_initializer(graph, np.asarray(epsilon, dtype), f"{name}.eps")
        sq = node("Pow", [x, two])
        if opset >= 18:
            axes = new_initializer(graph, np.asarray([-1], np.int64), f"{name}.axes")
            ms = node("ReduceMean", [sq, axes], keepdims=1)
        else:
            ms = node("ReduceMean", [sq], axes=[-1], keepdims=1)
        rms = node("Sqrt", [node("Add", [ms, eps])])
        y = node("Mul", [node("Div", [x, rms]), g])
    if work is not None and out_dtype is not None and out_dtype != work:
        y = node("Cast", [y], to=int(out_dtype))
    copy_type(y, source, shape=True)
    if out_dtype is not None:
        y.dtype = out_dtype
    graph.insert_before(before, nodes)
    return y


def replace_norm(graph: ir.Graph, norm: Norm, epsilon: float, scale: np.ndarray, opset: int, name: str) -> ir.Value:
    """Swap `norm` for a new RMS norm of `scale`; the old nodes and their constants go."""
    y = emit_rms_norm(graph, norm.input, epsilon, scale, opset, norm.nodes[0], name,
                      compute_dtype=norm.compute_dtype, out_dtype=norm.output.dtype)
    replace_value(graph, norm.output, y)
    consts = {id(v): v for n in norm.nodes for v in n.inputs if v is not None and v.is_initializer()}
    graph.remove(list(reversed(norm.nodes)), safe=True)
    for v in consts.values():
        drop_if_unused(graph, v)
    norm.nodes, norm.output, norm.kind, norm.epsilon, norm.scale, norm.bias = [], y, "rms", epsilon, None, None
    return y


def head_is_tied(tb: TransformerBlocks) -> bool:
    """True when the LM head reads the embedding table itself (through a Transpose, or Gemm transB)."""
    return tb.lm_head is not None and tb.embedding is not None and tb.lm_head.weight is tb.embedding.table


def _is_view_node(node: ir.Node, of: ir.Value) -> bool:
    return any(v is node.outputs[0] for v in views_of(of)) if node.outputs else False


def norm_readers(norm: Norm) -> list[ir.Node] | None:
    """The nodes reading the norm's output, or None when something other than a node reads it (a graph output).

    Shape nodes are left out: they read only the shape, which folding keeps (the legacy exporter reads the
    norm's shape to reshape q, k and v)."""
    if norm.output.is_graph_output():
        return None
    out = []
    for v in [norm.output] + [x for x in views_of(norm.output) if x is not norm.output]:
        if v.is_graph_output():
            return None
        out += [n for n, _ in v.uses() if n.op_type != "Shape" and not _is_view_node(n, norm.output)]
    return out


def fold_affine_into(graph: ir.Graph, linears: list[Linear], g: np.ndarray, b: np.ndarray | None) -> None:
    """Rewrite each Linear so that it reads the un-scaled norm: W <- diag(g) W, c <- c + b W."""
    for lin in linears:
        w = lin.weight_matrix().astype(np.float64)
        if b is not None:
            c = lin.bias_vector()
            c = (np.zeros(w.shape[1]) if c is None else c.astype(np.float64)) + b @ w
            lin.set_bias(graph, c)
        lin.set_weight(graph, g[:, None] * w)


def _stream_values(tb: TransformerBlocks) -> list[ir.Value]:
    vals = [tb.embedding.output]
    for b in tb.blocks:
        vals += [b.residual_mid, b.residual_out]
    out: list[ir.Value] = []
    for v in vals:  # the values and their reshaped views
        stack = [v]
        while stack:
            x = stack.pop()
            out.append(x)
            stack += [n.outputs[0] for n, i in x.uses() if n in tb.stream_reshapes and i == 0]
    return out


def unknown_stream_readers(tb: TransformerBlocks) -> list[str]:
    """Readers of the residual stream other than residual adds, norms and stream reshapes (and graph outputs)."""
    allowed = {id(n) for n in tb.stream_reshapes}
    for b in tb.blocks:
        allowed |= {id(b.attn_add), id(b.mlp_add)}
        allowed |= {id(s.node) for s in (b.attn_shortcut, b.mlp_shortcut) if s is not None}
    for norm in tb.norms():
        allowed |= {id(n) for n in norm.nodes}
    found = []
    for v in _stream_values(tb):
        if v.is_graph_output():
            found.append(f"{v.name}: a graph output")
        found += [f"{v.name}: read by {n.op_type} {n.name}" for n, _ in v.uses()
                  if id(n) not in allowed and n.op_type != "Shape"]
    return found


def center_writers(graph: ir.Graph, tb: TransformerBlocks) -> int:
    """Make every writer of the residual stream write zero-mean vectors (over the model width)."""
    emb = tb.embedding
    count = 0
    for gather, table in [(emb.gather, emb.table)] + list(emb.extra_tables):
        t = np.asarray(const_array(table), np.float64)
        new = (t - t.mean(axis=1, keepdims=True)).astype(const_array(table).dtype)
        value = new_initializer(graph, new, table.name or "table")
        gather.replace_input_with(0, value)
        drop_if_unused(graph, table)
        count += 1
    for add, const in emb.added_constants:
        c = np.asarray(const_array(const), np.float64)
        idx = next(i for i, v in enumerate(add.inputs) if v is const)
        value = new_initializer(graph, (c - c.mean(axis=-1, keepdims=True)).astype(const_array(const).dtype),
                                const.name or "const")
        add.replace_input_with(idx, value)
        drop_if_unused(graph, const)
        count += 1
    for b in tb.blocks:
        for lin in (b.o, b.down):
            w = lin.weight_matrix().astype(np.float64)
            lin.set_weight(graph, w - w.mean(axis=1, keepdims=True))
            c = lin.bias_vector()
            if c is not None:
                lin.set_bias(graph, c - c.mean())
            count += 1
    return count


@register_pass
class FoldNormsPass(Pass):
    name = "fold-norms"
    requires = ("canonicalize",)  # the block finder reads the canonical form
    summary = "LayerNorm -> RMSNorm on pre-norm transformers; fold norm scales and biases into the next linear layers"
    analyses = ("blocks",)
    stage = Stage.STRUCTURE
    exact = True

    def run(self, model: ir.Model, ctx) -> PassResult:
        tb: TransformerBlocks = ctx.analysis("blocks")
        require_pre_norm(tb, self.name)
        require_float_linears(tb, self.name)
        with naming(model.graph):
            return self._fold(model, tb)

    def _fold(self, model: ir.Model, tb: TransformerBlocks) -> PassResult:
        graph, opset = model.graph, opset_of(model)
        skipped: list[str] = []
        if tb.embedding.norm is not None:
            raise UserError(f"{self.name}: the embedding is normalized before the first block (BLOOM style); "
                            "centering the stream through that norm is not supported")
        has_layernorm = any(n.kind == "layer" for n in tb.norms())
        centered = 0
        if has_layernorm:
            readers = unknown_stream_readers(tb)
            if readers:
                raise UserError(f"{self.name}: the residual stream is read outside the blocks ({readers[0]}), so "
                                "LayerNorms cannot become RMS norms; export the model without extra hidden-state outputs")
            centered = center_writers(graph, tb)
        folded = converted = 0
        plan: list[tuple[str, Norm, list[Linear] | None]] = []
        for b in tb.blocks:
            plan.append((f"block{b.index}.attn_norm", b.attn_norm, b.attn_inputs))
            plan.append((f"block{b.index}.mlp_norm", b.mlp_norm, b.mlp_inputs))
        if tb.final_norm is not None and head_is_tied(tb) and tb.final_norm.kind == "rms" and tb.final_norm.bias is None:
            # folding the scale into the head would untie it from the embedding (a second vocab x d table)
            skipped.append("final_norm: scale kept, the LM head shares its weight with the embedding")
        elif tb.final_norm is not None:
            plan.append(("final_norm", tb.final_norm, [tb.lm_head] if tb.lm_head is not None else None))
        for label, norm, linears in plan:
            d = tb.d_model
            readers = norm_readers(norm)
            inputs = {id(v) for v in views_of(norm.output)}
            foldable = linears is not None and readers is not None and \
                sorted(id(n) for n in readers) == sorted(id(l.node) for l in linears) and \
                all(id(l.input) in inputs and l.in_features == d for l in linears)
            if not foldable:
                if norm.kind == "layer":
                    # keep the scale and bias as they are; the LayerNorm on a centered stream is an RMS norm
                    g, b = norm.scale_vector(d), norm.bias_vector(d)
                    y = replace_norm(graph, norm, norm.epsilon, np.ones(d), opset, f"{label}.rms")
                    _apply_affine_after(graph, y, g, b, label)
                    converted += 1
                skipped.append(f"{label}: its output is read by something other than linear layers; scale kept")
                continue
            g, b = norm.scale_vector(d), norm.bias_vector(d)
            if norm.kind == "layer":
                converted += 1
            fold_affine_into(graph, linears, g, b)
            replace_norm(graph, norm, norm.epsilon, np.ones(d), opset, f"{label}.rms")
            folded += 1
        notes = {"norms_folded": folded, "layernorms_to_rms": converted, "writers_centered": centered}
        return PassResult(model, bool(folded or converted or centered), notes=notes, skipped=skipped)


def _apply_affine_after(graph: ir.Graph, y: ir.Value, g: np.ndarray, b: np.ndarray | None, label: str) -> None:
    """Put a norm's scale and bias back as Mul/Add after the new RMS norm (when they cannot be folded)."""
    dtype = np.float16 if y.dtype == ir.DataType.FLOAT16 else np.float32
    users = list(y.uses())
    was_output = y.is_graph_output()
    last = y.producer()
    out = y
    new_nodes = []
    for op, vec in (("Mul", g), ("Add", b)):
        if vec is None or (op == "Mul" and np.all(vec == 1)):
            continue
        c = new_initializer(graph, vec.astype(dtype), f"{label}.{'scale' if op == 'Mul' else 'bias'}")
        n = ir.Node("", op, [out, c], name=unique_name(graph, f"{label}/{op}"))
        n.outputs[0].name = unique_name(graph, f"{label}/{op.lower()}")
        copy_type(n.outputs[0], y, shape=True)
        new_nodes.append(n)
        out = n.outputs[0]
    if out is y:
        return
    graph.insert_after(last, new_nodes)
    for node, i in users:
        node.replace_input_with(i, out)
    if was_output:
        outs = graph.outputs
        for i, v in enumerate(outs):
            if v is y:
                outs[i] = out
        keep = y.name
        y.name = unique_name(graph, keep + "_normed")
        out.name = keep
