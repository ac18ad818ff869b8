"""Exact canonicalizing rewrites that make every exporter's transformer look alike to the block finder.

`canonicalize(model)` rewrites the graph in place, without changing what it computes (up to float round-off
of the same operations in the same order), and returns how many nodes it rewrote:

- **No-op Casts go.** The legacy (TorchScript) exporter, and Optimum through it, writes `.to(float32)` of a
  float32 tensor as a Cast to the type the tensor already has, and the residual Add then reads the Cast's
  output: the stream would run through a node that is not an Add, a norm or a view. Their readers read the
  input instead. A Cast whose output is a graph output stays.
- **Skip norms split.** ONNX Runtime GenAI's builder (and ORT's own fusions) write the residual add and the
  next norm as one com.microsoft op: `SkipSimplifiedLayerNormalization(x, skip, gamma[, bias])` and
  `SkipLayerNormalization(x, skip, gamma[, beta][, bias])` compute `s = x + skip (+ bias)` (output 3, the
  residual stream) and normalize s (output 0). They become `Add` (+ `Add` of the bias) and
  `SimplifiedLayerNormalization` / `LayerNormalization`, the residual add and norm every structural pass
  understands. ONNX Runtime fuses the pair back into the skip op when it loads the model
  (SkipLayerNormFusion), so the split costs nothing at run time. A skip norm whose mean or inverse standard
  deviation outputs (1, 2) are read stays as it is.
- **Copied heads tied back.** The TorchScript exporter (Optimum) stores a tied head as a second [d, vocab] copy of
  the embedding table; the head reads Transpose(table) instead and the copy goes (`tie_copied_heads`).
- **Tied tables stored the embedding's way.** GenAI ties the LM head to the embedding by gathering rows of
  `Transpose(W)`, W the head's [d, vocab] weight; torch exports the tie as a [vocab, d] table that the head
  reads through a Transpose. The table is stored as W^T (same size) and the head reads Transpose(W^T).

Why a rewrite instead of teaching the finder the fused ops: the passes that rewire the stream (drop-blocks
removes a block by pointing the next block at its input; slice puts a change of basis on each residual
connection; fold-norms replaces norms) would each need a second code path for an op that is both a residual add
and a norm. After the split there is one form.

`find_blocks` (the "blocks" analysis) runs this first, so every pass that reads the blocks sees the canonical
graph. What it cannot do: split skip norms with a `bias` input whose shape is not [hidden] (never written by
the builder), or LayerNormalization at opset below 17 (the op does not exist there; such a skip norm stays).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_SKIP_NORMS = {"SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization",
               "SkipLayerNormalization": "LayerNormalization"}


def canonicalize(model: ir.Model) -> int:
    """Apply every rewrite of this module to `model` in place; return how many nodes were rewritten."""
    return (drop_noop_casts(model.graph) + split_skip_norms(model) + untranspose_tied_tables(model.graph)
            + tie_copied_heads(model.graph))


def tie_copied_heads(graph: ir.Graph) -> int:
    """Tie back a head that stores an exact copy of the embedding table.

    The TorchScript exporter (and Optimum through it) writes a tied LM head as its own [d, vocab] initializer equal
    to the transpose of the embedding's [vocab, d] table: the table is stored twice (113 MB more for SmolLM2-135M),
    and passes see an untied head (slice then fits the head a basis of its own: 1.50x perplexity at 25% where the
    tied export gives 1.43x). A MatMul whose constant 2-D weight equals the transpose of a Gathered table, element
    for element, reads Transpose(table) instead, as torch's dynamo exporter writes a tie; the copy goes. Exact."""
    from modelsurgeon.analyses.blocks import const_array

    tables = {}
    for node in graph:
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.inputs[0] is not None \
                and node.inputs[0].is_initializer() and not node.inputs[0].is_graph_input():
            attr = node.attributes.get("axis")
            arr = const_array(node.inputs[0]) if attr is None or attr.value == 0 else None
            if arr is not None and arr.ndim == 2:
                tables[(arr.shape[1], arr.shape[0], arr.dtype)] = (node.inputs[0], arr)
    count = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or not tables:
            continue
        w = node.inputs[1]
        if w is None or not w.is_initializer() or w.is_graph_input() or w.is_graph_output():
            continue
        arr = const_array(w)
        found = tables.get((arr.shape[0], arr.shape[1], arr.dtype)) if arr is not None and arr.ndim == 2 else None
        if found is None or found[0] is w or not np.array_equal(arr, found[1].T):
            continue
        table = found[0]
        view = _transposed_view(graph, table, (table.name or "table") + "/tied_head", (table.name or "table") + ".T",
                                w.dtype, arr.shape)
        for n, i in list(w.uses()):
            n.replace_input_with(i, view)
        if w.name in graph.initializers:
            del graph.initializers[w.name]
        count += 1
    return count


def _transposed_view(graph: ir.Graph, table: ir.Value, node_name: str, value_name: str, dtype, shape) -> ir.Value:
    """A new Transpose(table) (perm [1, 0]) at the top of the graph (it reads only an initializer, so first is always
    in order), its output typed `dtype` and `shape`."""
    from modelsurgeon.analyses.blocks import unique_name

    node = ir.Node("", "Transpose", [table], attributes=[ir.AttrInt64s("perm", [1, 0])],
                   name=unique_name(graph, node_name))
    node.outputs[0].name = unique_name(graph, value_name)
    node.outputs[0].dtype = dtype
    node.outputs[0].shape = ir.Shape(shape)
    graph.insert_before(next(iter(graph)), node)
    return node.outputs[0]


def untranspose_tied_tables(graph: ir.Graph) -> int:
    """Store a table that an embedding Gathers through a Transpose as the embedding's [vocab, d] constant.

    ONNX Runtime GenAI ties the embedding to the LM head by keeping the head's [d, vocab] weight W and gathering
    rows of Transpose(W). The same tie as torch exports it (and as the finder reads it) is a [vocab, d] table T
    gathered directly, the head reading Transpose(T): T = W^T is stored instead of W (the same size), and every
    other reader of W reads one new Transpose(T). Exact: the values are the same numbers."""
    from modelsurgeon.analyses.blocks import const_array, new_initializer

    count = 0
    for node in list(graph):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        if node.attributes.get("axis") is not None and node.attributes["axis"].value != 0:
            continue
        t = node.inputs[0].producer() if node.inputs[0] is not None else None
        if t is None or t.op_type != "Transpose" or t.inputs[0] is None:
            continue
        perm = t.attributes.get("perm")
        w = t.inputs[0]
        arr = const_array(w)
        if arr is None or arr.ndim != 2 or (perm is not None and list(perm.value) != [1, 0]):
            continue
        if not w.is_initializer() or w.is_graph_input() or w.is_graph_output():
            continue
        table = new_initializer(graph, np.ascontiguousarray(arr.T), (w.name or "table") + ".T")
        node.replace_input_with(0, table)
        others = [(n, i) for n, i in w.uses() if n is not t]
        if others:
            back = _transposed_view(graph, table, (w.name or "table") + "/untied_view", (w.name or "table") + "_view",
                                    w.dtype, arr.shape)
            for n, i in others:
                n.replace_input_with(i, back)
        if not t.outputs[0].uses() and not t.outputs[0].is_graph_output():
            graph.remove(t, safe=True)
        if not w.uses() and w.name in graph.initializers:
            del graph.initializers[w.name]
        count += 1
    return count



def _is_noop_cast(node: ir.Node) -> bool:
    if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or node.attributes.get("to") is None:
        return False
    x = node.inputs[0] if node.inputs else None
    return x is not None and x.dtype in _FLOATS and x.dtype == ir.DataType(node.attributes["to"].value)


def drop_noop_casts(graph: ir.Graph) -> int:
    """Make the readers of a Cast to its input's own (float) type read the input; remove the Cast."""
    count = 0
    for node in list(graph):
        if not _is_noop_cast(node) or node.outputs[0].is_graph_output():
            continue
        ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
        graph.remove(node, safe=True)
        count += 1
    return count


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def _new_value(graph: ir.Graph, like: ir.Value, base: str) -> ir.Value:
    from modelsurgeon.analyses.blocks import unique_name

    v = ir.Value(name=unique_name(graph, base))
    if like.dtype is not None:
        v.dtype = like.dtype
    if like.shape is not None:
        v.shape = like.shape
    return v


def split_skip_norms(model: ir.Model) -> int:
    """Rewrite each com.microsoft Skip(Simplified)LayerNormalization into Add(s) + (Simplified)LayerNormalization."""
    from modelsurgeon.analyses.blocks import replace_value, unique_name

    graph, count = model.graph, 0
    for node in list(graph):
        target = _SKIP_NORMS.get(node.op_type)
        if target is None or node.domain != "com.microsoft":
            continue
        outs = list(node.outputs)
        if any(i < len(outs) and (outs[i].uses() or outs[i].is_graph_output()) for i in (1, 2)):
            continue
        if target == "LayerNormalization" and _opset(model) < 17:
            continue
        ins = list(node.inputs) + [None] * 5
        x, skip, gamma = ins[0], ins[1], ins[2]
        beta, bias = (ins[3], ins[4]) if target == "LayerNormalization" else (None, ins[3])
        name = node.name or "skip_norm"
        like = outs[3] if len(outs) > 3 and outs[3].dtype is not None else (outs[0] if outs[0].dtype is not None else x)
        new_nodes: list[ir.Node] = []
        add = ir.Node("", "Add", [x, skip], outputs=[_new_value(graph, like, f"{name}/residual_sum")],
                      name=unique_name(graph, f"{name}/residual_add"))
        new_nodes.append(add)
        total = add.outputs[0]
        if bias is not None:
            badd = ir.Node("", "Add", [total, bias], outputs=[_new_value(graph, like, f"{name}/residual_sum_bias")],
                           name=unique_name(graph, f"{name}/bias_add"))
            new_nodes.append(badd)
            total = badd.outputs[0]
        attrs = [ir.AttrInt64("axis", -1)]
        if node.attributes.get("epsilon") is not None:
            attrs.append(ir.AttrFloat32("epsilon", float(node.attributes["epsilon"].value)))
        norm_inputs = [total, gamma] + ([beta] if beta is not None else [])
        if target == "SimplifiedLayerNormalization":
            attrs.append(ir.AttrInt64("stash_type", 1))
        norm = ir.Node("", target, norm_inputs, attributes=attrs,
                       outputs=[_new_value(graph, outs[0], f"{name}/normalized")], name=unique_name(graph, f"{name}/norm"))
        new_nodes.append(norm)
        graph.insert_before(node, new_nodes)
        for old, new in ((outs[0], norm.outputs[0]), (outs[3] if len(outs) > 3 else None, total)):
            if old is not None:  # the split values keep the fused op's names: the original's values still name them
                replace_value(graph, old, new, old_suffix="_fused", keep_name=True)
        graph.remove(node, safe=True)
        count += 1
    return count
