"""The transformer block finder: analysis "blocks" -> `TransformerBlocks`.

Finds, in a decoder or encoder graph exported by torch (dynamo at opset 18 or 23, or the legacy exporter),
the token embedding, every block's residual stream values, its norms, its linear projections (attention
q/k/v or a fused qkv, attention output, MLP up/gate/down), the final norm and the LM head.

API (stable; drop-blocks, share, lowrank, fold-norms and slice read it):

    tb = ctx.analysis("blocks")            # TransformerBlocks
    tb.layout                              # "pre-norm" | "post-norm" | "unknown" (no block found)
    tb.d_model                             # width of the residual stream
    tb.embedding.output                    # ir.Value: the residual stream entering block 0 (pre-norm);
                                           #   post-norm: the embedding before its LayerNorm (tb.embedding.norm)
    for b in tb.blocks:                    # Block, in execution order
        b.residual_in, b.residual_mid, b.residual_out   # ir.Value: stream before the block, after attention, after MLP
        b.attn_norm, b.mlp_norm            # Norm: pre-norm: applied to the stream before each sub-block;
                                           #       post-norm: applied to the output of each residual add
        b.q, b.k, b.v, b.qkv, b.o          # Linear | None (qkv when fused; then q, k, v are None)
        b.up, b.gate, b.down               # Linear | None (gate is None for non-gated MLPs such as OPT's;
                                           #   a fused gate+up projection is reported as `up`)
        b.attn_add, b.mlp_add              # ir.Node: the residual Adds (attn_add.outputs[0] is residual_mid)
        b.attn_shortcut, b.mlp_shortcut    # Linear | None: a square MatMul the Add applies to the stream first
                                           #   (slice's change of basis); None on unsliced models
        b.nodes                            # the nodes on paths from residual_in to residual_out, in graph order
                                           #   (side computations such as masks and rotary tables are not included)
    tb.final_norm                          # Norm | None
    tb.lm_head                             # Linear | None (reads final_norm's output)
    tb.stream_reshapes                     # Reshape nodes on the residual stream (OPT flattens it to 2-D), and
                                           #   between it and the projections (GPT-2's Conv1D flattens to 2-D)
    tb.problems                            # why detection stopped early, if it did (blocks found so far are kept)

A `Linear` is one MatMul or Gemm whose weight is a constant (initializer or Constant, possibly behind a
Transpose, or Gemm transB=1), with an optional constant bias (Gemm input C, or an Add right after the MatMul).
`Linear.weight_matrix()` always returns [in, out] (y = x @ W + b) whatever the storage layout;
`Linear.set_weight` / `set_bias` store new values in the node's own layout under a new initializer, so
initializers shared with other nodes (tied embeddings, deduplicated zeros) are never changed in place.

Exporters covered (the corpus, docs/corpus.md): torch dynamo at opset 18/23 (with or without mask and KV cache),
the TorchScript exporter and Optimum through it, fp16, and ONNX Runtime GenAI's builder. `find_blocks` reads graphs in
the canonical form of `modelsurgeon.canonical` (exact rewrites, which the `canonicalize` pass makes and every pass
reading the blocks requires): no-op Casts removed, com.microsoft skip norms split into Add + norm, a tied table
gathered through a Transpose stored the embedding's way. Besides:
a norm wrapped in Casts (`x -> Cast(float32) -> norm -> Cast(float16)`) is one Norm with `compute_dtype`; a
projection may read the norm, or write the stream, through flattening Reshapes (GPT-2's Conv1D; those Reshapes
join `stream_reshapes`); Shape readers of the embedding or a norm are ignored; a com.microsoft MatMulNBits is a
`Linear` with `quantized=True` (its structure is known, its float weight is not: weight-rewriting passes refuse
through `require_float_linears`), and a GatherBlockQuantized table is a 4-bit embedding (`Embedding.quantized`).

Detection relies only on structure: starting from the largest Gather of a constant table, it follows the
residual stream from Add to Add (an Add is residual when its other input is computed from the stream);
norms are recognized as ops (LayerNormalization, RMSNormalization, SimplifiedLayerNormalization) or as
decomposed patterns (ReduceMean, Sub, Pow, Sqrt, Div/Reciprocal, Mul); attention branches contain Softmax or
an attention op. q/k/v and gate/up are told apart by dataflow. `pkg.torch.onnx.name_scopes` metadata only
labels things in `describe()`.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Iterable, Literal

import numpy as np
import onnx_ir as ir

from modelsurgeon.analysis import register_analysis


# ----------------------------------------------------------------------------------------------------------------
# Data model
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Linear:
    """One projection: `y = x @ W (+ b)` with W constant. `node` is the MatMul or Gemm."""

    node: ir.Node
    weight: ir.Value                       # the constant the node (or its Transpose) reads
    transposed: bool                       # True when the stored weight is [out, in] (Gemm transB=1 or a Transpose)
    bias: ir.Value | None = None           # constant bias (Gemm input C, or the constant of the Add after the MatMul)
    bias_node: ir.Node | None = None       # the Add holding the bias (None for Gemm or no bias)
    transpose_node: ir.Node | None = None  # Transpose between the stored weight and the MatMul, if any
    quantized: bool = False                # a com.microsoft MatMulNBits: `weight` is its packed 4-bit B; the
                                           #   structure is known, the float weight is not (weight_matrix refuses)

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    def _nbits_dims(self) -> tuple[int, int]:
        a = self.node.attributes
        return int(a["K"].value), int(a["N"].value)

    @property
    def output(self) -> ir.Value:
        """The value after the bias (the Linear's result)."""
        return (self.bias_node or self.node).outputs[0]

    @property
    def in_features(self) -> int:
        if self.quantized:
            return self._nbits_dims()[0]
        return int(_const(self.weight).shape[1 if self.transposed else 0])

    @property
    def out_features(self) -> int:
        if self.quantized:
            return self._nbits_dims()[1]
        return int(_const(self.weight).shape[0 if self.transposed else 1])

    def weight_matrix(self) -> np.ndarray:
        """The weight as an [in, out] array (a copy, in the stored dtype). Refuses a 4-bit (MatMulNBits) weight."""
        if self.quantized:
            from modelsurgeon.errors import UserError

            raise UserError(QUANTIZED_MESSAGE.format(what="this pass"))
        w = np.array(_const(self.weight))
        return np.ascontiguousarray(w.T) if self.transposed else w

    def bias_vector(self) -> np.ndarray | None:
        return None if self.bias is None else np.array(_const(self.bias)).reshape(-1)

    def set_weight(self, graph: ir.Graph, w_in_out: np.ndarray) -> None:
        """Store a new [in, out] weight (its shape may differ) in this node's layout, as a new initializer."""
        if self.quantized:
            self.weight_matrix()  # refuses
        dtype = _const(self.weight).dtype
        if self.transpose_node is not None:  # a Transpose of a (shared) constant: store [in, out] directly
            t, old = self.transpose_node, self.weight
            self.weight = new_initializer(graph, np.asarray(w_in_out).astype(dtype), _base_name(old) + ".T")
            self.node.replace_input_with(1, self.weight)
            if not t.outputs[0].uses() and not t.outputs[0].is_graph_output():
                graph.remove(t, safe=True)
            drop_if_unused(graph, old)
            self.transposed, self.transpose_node = False, None
            return
        stored = (w_in_out.T if self.transposed else w_in_out).astype(dtype)
        self.weight = replace_constant_input(graph, self.node, 1, stored, "weight")

    def set_bias(self, graph: ir.Graph, b: np.ndarray) -> None:
        """Store a new bias [out]; adds an Add node after a bias-less MatMul (or an input C to a Gemm)."""
        if self.quantized:
            self.weight_matrix()  # refuses
        dtype = _const(self.weight).dtype
        b = np.asarray(b).astype(dtype).reshape(-1)
        if self.bias is None:
            if self.node.op_type == "Gemm" and len(self.node.inputs) < 3:
                value = new_initializer(graph, b, _base_name(self.weight) + ".bias")
                self.node.resize_inputs(3)
                self.node.replace_input_with(2, value)
                self.bias = value
                return
            self.bias_node, self.bias = _insert_bias_add(graph, self.node, b)
            return
        if self.bias_node is None:  # Gemm C
            self.bias = replace_constant_input(graph, self.node, 2, b, "bias")
            return
        idx = next(i for i, v in enumerate(self.bias_node.inputs) if v is self.bias)
        self.bias = replace_constant_input(graph, self.bias_node, idx, b, "bias")


@dataclasses.dataclass(eq=False)
class Norm:
    """A normalization over the last axis: y = (x - mean(x)?) / sqrt(mean(x^2) + eps) * scale + bias."""

    kind: Literal["layer", "rms"]
    input: ir.Value
    output: ir.Value
    nodes: list[ir.Node]                  # the fused op, or every node of the decomposed pattern
    epsilon: float
    scale: ir.Value | None = None         # constant (None: no scale)
    bias: ir.Value | None = None          # constant (None: no bias)
    fused: bool = False                   # one op (LayerNormalization / RMSNormalization / SimplifiedLayerNormalization)
    compute_dtype: ir.DataType | None = None  # the float type it normalizes in when a Cast wraps it (fp16 models
                                          #   normalize in float32): input -> Cast -> norm -> Cast -> output

    def scale_vector(self, width: int) -> np.ndarray:
        """The scale as float64 [width] (ones when the norm has none)."""
        if self.scale is None:
            return np.ones(width, np.float64)
        return np.broadcast_to(np.asarray(_const(self.scale), np.float64).reshape(-1), (width,)).copy()

    def bias_vector(self, width: int) -> np.ndarray | None:
        if self.bias is None:
            return None
        return np.broadcast_to(np.asarray(_const(self.bias), np.float64).reshape(-1), (width,)).copy()

    @property
    def weightless(self) -> bool:
        """True when the norm has no bias and its scale is absent or all ones."""
        return self.bias is None and (self.scale is None or bool(np.all(np.asarray(_const(self.scale)) == 1)))


@dataclasses.dataclass(eq=False)
class Embedding:
    """The token embedding `Gather(table, ids)`, plus tables added to it (learned positions, token types)."""

    gather: ir.Node
    table: ir.Value                       # [vocab, d] constant
    output: ir.Value                      # pre-norm: the stream entering block 0; post-norm: the input of `norm`
    nodes: list[ir.Node]                  # the Gathers and the nodes between them and `output`
    extra_tables: list[tuple[ir.Node, ir.Value]] = dataclasses.field(default_factory=list)  # (Gather, table)
    added_constants: list[tuple[ir.Node, ir.Value]] = dataclasses.field(default_factory=list)  # (Add, constant [.., d])
    norm: Norm | None = None              # post-norm models: the LayerNorm after the embedding
    quantized: int = 0                    # bits of a com.microsoft GatherBlockQuantized table (GenAI int4 with a
                                          #   tied head); `table` is then its packed data, not a [vocab, d] array

    @property
    def width(self) -> int:
        """d, the width of the rows gathered."""
        if self.quantized:
            return int(self.gather.outputs[0].shape[-1])
        return int(_const(self.table).shape[1])


@dataclasses.dataclass(eq=False)
class Block:
    index: int
    residual_in: ir.Value
    residual_mid: ir.Value
    residual_out: ir.Value
    attn_norm: Norm | None
    mlp_norm: Norm | None
    attn_add: ir.Node
    mlp_add: ir.Node
    q: Linear | None = None
    k: Linear | None = None
    v: Linear | None = None
    qkv: Linear | None = None
    o: Linear | None = None
    up: Linear | None = None
    gate: Linear | None = None
    down: Linear | None = None
    attn_shortcut: Linear | None = None   # MatMul by a constant square matrix on the residual path into attn_add
    mlp_shortcut: Linear | None = None    # (present after `slice`: the change of basis between sub-blocks)
    nodes: list[ir.Node] = dataclasses.field(default_factory=list)
    scope: str = ""                       # name scope from metadata (describe() only), e.g. "model.layers.3"

    @property
    def attn_inputs(self) -> list[Linear]:
        """The projections reading the attention norm's output (q, k, v or qkv)."""
        return [p for p in (self.q, self.k, self.v, self.qkv) if p is not None]

    @property
    def mlp_inputs(self) -> list[Linear]:
        """The projections reading the MLP norm's output (gate and up)."""
        return [p for p in (self.gate, self.up) if p is not None]

    def linears(self) -> dict[str, Linear]:
        names = ("q", "k", "v", "qkv", "o", "gate", "up", "down")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclasses.dataclass(eq=False)
class TransformerBlocks:
    layout: Literal["pre-norm", "post-norm", "unknown"]
    embedding: Embedding | None
    blocks: list[Block]
    final_norm: Norm | None
    lm_head: Linear | None
    d_model: int
    stream_reshapes: list[ir.Node] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    def norms(self) -> list[Norm]:
        """Every norm on the stream: per block (attn, mlp), then the final one; embedding norm first if any."""
        out = [self.embedding.norm] if self.embedding is not None and self.embedding.norm is not None else []
        for b in self.blocks:
            out += [n for n in (b.attn_norm, b.mlp_norm) if n is not None]
        if self.final_norm is not None:
            out.append(self.final_norm)
        return out

    def describe(self) -> str:
        return describe(self)


# ----------------------------------------------------------------------------------------------------------------
# Small graph helpers (shared with the passes that edit blocks)
# ----------------------------------------------------------------------------------------------------------------


def _const(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant (initializer, Constant node output, or an Identity of one), else None."""
    for _ in range(8):
        if value is None:
            return None
        tensor = value.const_value
        if tensor is not None:
            return tensor.numpy()
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type == "Identity" and producer.domain in ("", "ai.onnx"):  # legacy exporter's shared weights
            value = producer.inputs[0]
            continue
        if producer.op_type != "Constant":
            return None
        tensor = ir.convenience.get_const_tensor(value)
        return None if tensor is None else tensor.numpy()
    return None


const_array = _const


def _scalar(value: ir.Value | None) -> float | None:
    arr = _const(value)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(()))


def _base_name(value: ir.Value) -> str:
    return value.name or "w"


_NAMES_KEY = "modelsurgeon.blocks.names"


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value, old_suffix: str = "_old",
                  keep_name: bool = False) -> None:
    """Every reader of `old` reads `new`; a graph output keeps its name (`new` takes it, `old` gets a suffix).

    `keep_name`: `new` takes the name even where `old` is no graph output (a rewrite whose values should still
    answer to the names in the model it came from, e.g. for matching against that model value by value)."""
    hand_over = (keep_name or old.is_graph_output()) and bool(old.name)
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if hand_over:
        keep = old.name
        old.name = unique_name(graph, keep + old_suffix)
        new.name = keep


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value name not used anywhere in the graph.

    Scans the graph each call, unless inside `naming(graph)`, which keeps one set of names for a batch of edits.
    """
    taken = graph.meta.get(_NAMES_KEY)
    if taken is None:
        taken = {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs} | set(graph.initializers)
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


class naming:
    """Context manager: cache the graph's value names while a pass makes many edits (all names go through
    `unique_name` meanwhile)."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph

    def __enter__(self):
        self.graph.meta[_NAMES_KEY] = ({v.name for n in self.graph for v in n.outputs}
                                       | {v.name for v in self.graph.inputs} | set(self.graph.initializers))
        return self

    def __exit__(self, *exc):
        self.graph.meta.pop(_NAMES_KEY, None)
        return False


def new_initializer(graph: ir.Graph, array: np.ndarray, base: str) -> ir.Value:
    array = np.array(array, order="C")  # a copy (ascontiguousarray would turn 0-d arrays into 1-d)
    value = ir.Value(name=unique_name(graph, base), const_value=ir.tensor(array))
    value.shape = ir.Shape(array.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def copy_type(dst: ir.Value, src: ir.Value, shape: bool = False) -> None:
    """Give `dst` the element type (and optionally the shape) of `src` where those are known."""
    if src.dtype is not None:
        dst.dtype = src.dtype
    if shape and src.shape is not None:
        dst.shape = src.shape


def drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove an initializer nothing reads any more."""
    if value is None or value.uses() or value.is_graph_output():
        return
    if value.name in graph.initializers and graph.initializers[value.name] is value:
        del graph.initializers[value.name]


def replace_constant_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, what: str) -> ir.Value:
    """Point `node.inputs[index]` at a new initializer holding `array`; drop the old one if now unused."""
    old = node.inputs[index]
    value = new_initializer(graph, array, (_base_name(old) if old is not None else what))
    node.replace_input_with(index, value)
    drop_if_unused(graph, old)
    return value


def _insert_bias_add(graph: ir.Graph, node: ir.Node, b: np.ndarray) -> tuple[ir.Node, ir.Value]:
    """Put `Add(node output, b)` after `node` and make every reader (and the graph output) read the sum."""
    out = node.outputs[0]
    users = list(out.uses())
    was_output = out.is_graph_output()
    bias = new_initializer(graph, b, (node.name or "linear") + ".bias")
    add = ir.Node("", "Add", [out, bias], name=unique_name(graph, (node.name or "linear") + "_bias"))
    total = add.outputs[0]
    total.name = unique_name(graph, (out.name or "linear") + "_biased")
    copy_type(total, out, shape=True)
    for user, i in users:
        user.replace_input_with(i, total)
    if was_output:
        outs = graph.outputs
        for i, v in enumerate(outs):
            if v is out:
                outs[i] = total
        keep = out.name
        out.name = unique_name(graph, keep + "_nobias")
        total.name = keep
    graph.insert_after(node, add)
    return add, bias


def scope_of(node: ir.Node | None) -> str:
    """The innermost module path from `pkg.torch.onnx.name_scopes` metadata ('' when absent)."""
    if node is None:
        return ""
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return ""
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return ""
    mods = [s for s in scopes[:-1] if s] if isinstance(scopes, list) else []
    return mods[-1] if mods else ""


# ----------------------------------------------------------------------------------------------------------------
# Linears
# ----------------------------------------------------------------------------------------------------------------


QUANTIZED_MESSAGE = ("{what} rewrites float weights, and the projections are already 4-bit (MatMulNBits); "
                     "run {what} on the float model, then quant4")


FOUR_BIT_OPS = ("MatMulNBits", "GatherBlockQuantized")  # com.microsoft ops that hold 4-bit weights


def require_float_linears(tb: "TransformerBlocks", what: str) -> None:
    """Raise a UserError when a block's projections are 4-bit MatMulNBits (their float weights are gone)."""
    if any(lin.quantized for b in tb.blocks for lin in b.linears().values()):
        from modelsurgeon.errors import UserError

        raise UserError(QUANTIZED_MESSAGE.format(what=what))


def require_float_weights(model: ir.Model, what: str) -> None:
    """Raise a UserError when any op of the graph holds 4-bit weights (`FOUR_BIT_OPS`), blocks or not: for a
    pass that rewrites every weight it reaches, not only the blocks' projections."""
    if any(n.domain == "com.microsoft" and n.op_type in FOUR_BIT_OPS for n in model.graph):
        from modelsurgeon.errors import UserError

        raise UserError(QUANTIZED_MESSAGE.format(what=what))


def _match_nbits(node: ir.Node) -> Linear | None:
    """A quantized Linear for com.microsoft MatMulNBits (ONNX Runtime GenAI's int4 models, our quant4)."""
    if node.domain != "com.microsoft" or node.op_type != "MatMulNBits" or len(node.inputs) < 3:
        return None
    if node.attributes.get("K") is None or node.attributes.get("N") is None or node.inputs[0] is None:
        return None
    if _const(node.inputs[1]) is None:
        return None
    n = int(node.attributes["N"].value)
    bias, bias_node = (node.inputs[5], None) if len(node.inputs) > 5 and node.inputs[5] is not None else (None, None)
    if bias is None:
        uses = node.outputs[0].uses()
        if len(uses) == 1 and uses[0][0].op_type == "Add" and not node.outputs[0].is_graph_output():
            other = uses[0][0].inputs[1 - uses[0][1]]
            c = _const(other)
            if c is not None and c.size == n and c.shape[-1:] == (n,):
                bias, bias_node = other, uses[0][0]
    return Linear(node, node.inputs[1], True, bias, bias_node, None, quantized=True)


def match_linear(node: ir.Node) -> Linear | None:
    """A Linear when `node` is a MatMul/Gemm of an activation by a constant 2-D weight (or a MatMulNBits)."""
    if node.op_type == "MatMulNBits":
        return _match_nbits(node)
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if w is None or node.inputs[0] is None or _const(node.inputs[0]) is not None:
        return None
    transposed, tnode = False, None
    if _const(w) is None:
        p = w.producer()
        if p is None or p.op_type != "Transpose" or _const(p.inputs[0]) is None:
            return None
        perm = p.attributes.get("perm")
        if perm is not None and list(perm.value) != [1, 0]:
            return None
        if len(w.uses()) != 1:
            return None
        tnode, w, transposed = p, p.inputs[0], True
    if _const(w).ndim != 2:
        return None
    bias, bias_node = None, None
    if node.op_type == "Gemm":
        a = node.attributes
        if a.get("transA") is not None and a["transA"].value != 0:
            return None
        if a.get("alpha") is not None and a["alpha"].value != 1.0:
            return None
        if a.get("transB") is not None and a["transB"].value != 0:
            if tnode is not None:
                return None
            transposed = True
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if _const(node.inputs[2]) is None or (a.get("beta") is not None and a["beta"].value != 1.0):
                return None
            bias = node.inputs[2]
    out_features = _const(w).shape[0 if transposed else 1]
    if bias is None:
        uses = node.outputs[0].uses()
        if len(uses) == 1 and uses[0][0].op_type == "Add" and not node.outputs[0].is_graph_output():
            add = uses[0][0]
            other = add.inputs[1 - uses[0][1]]
            c = _const(other)
            if c is not None and c.size == out_features and c.shape[-1:] == (out_features,) and c.ndim <= 3:
                bias, bias_node = other, add
    elif _const(bias).size != out_features:
        return None
    return Linear(node, w, transposed, bias, bias_node, tnode)


# ----------------------------------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------------------------------

_FUSED_NORMS = {"LayerNormalization": "layer", "RMSNormalization": "rms", "SimplifiedLayerNormalization": "rms"}


def _last_axis(axis, rank: int | None) -> bool:
    return axis == -1 or (rank is not None and axis == rank - 1)


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _only_use(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0][0]


def _past_factors(value: ir.Value) -> ir.Value:
    """The output of the last of a chain of constant-weight linears that starts at `value` (each the only reader of
    the one before, as lowrank writes x @ A @ B); `value` itself when nothing follows it that way."""
    while (n := _only_use(value)) is not None and n.inputs[0] is value and match_linear(n) is not None:
        value = n.outputs[0]
    return value


def _other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    ins = list(node.inputs)
    if len(ins) != 2:
        return None
    if ins[0] is value:
        return ins[1]
    if ins[1] is value:
        return ins[0]
    return None


def _reduce_axes(node: ir.Node) -> list[int] | None:
    if node.attributes.get("axes") is not None:
        return list(node.attributes["axes"].value)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        c = _const(node.inputs[1])
        return None if c is None else [int(a) for a in c.reshape(-1)]
    return None


def _is_last_axis_mean(node: ir.Node, x: ir.Value) -> bool:
    if node.op_type != "ReduceMean":
        return False
    if node.attributes.get("keepdims") is not None and node.attributes["keepdims"].value != 1:
        return False
    axes = _reduce_axes(node)
    return axes is not None and len(axes) == 1 and _last_axis(axes[0], _rank(x))


_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def _cast_to(node: ir.Node | None) -> ir.DataType | None:
    """The target type of a float-to-float Cast node (None for anything else)."""
    if node is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or node.attributes.get("to") is None:
        return None
    to = ir.DataType(node.attributes["to"].value)
    src = node.inputs[0].dtype if node.inputs and node.inputs[0] is not None else None
    if to not in _FLOATS or (src is not None and src not in _FLOATS):
        return None
    return to


def is_noop_cast(node: ir.Node) -> bool:
    """A Cast to the type its input already has (the legacy exporter writes `.to(float32)` of float32 so)."""
    to = _cast_to(node)
    return to is not None and node.inputs[0].dtype == to


def _wrap_casts(norm: Norm) -> Norm:
    """Extend a norm over the Casts around it: `x -> Cast -> norm -> Cast -> y` is a norm of x computing in the
    inner type (fp16 exports normalize in float32). The input Cast is absorbed only when nothing else reads it."""
    p = norm.input.producer()
    if _cast_to(p) is not None and not is_noop_cast(p):
        inside = {id(n) for n in norm.nodes}
        if not norm.input.is_graph_output() and all(id(n) in inside for n, _ in norm.input.uses()):
            norm.compute_dtype = _cast_to(p)
            norm.nodes.insert(0, p)
            norm.input = p.inputs[0]
    c = _only_use(norm.output)
    if c is not None and _cast_to(c) is not None and norm.compute_dtype is not None:
        norm.nodes.append(c)
        norm.output = c.outputs[0]
    return norm


def _match_fused_norm(node: ir.Node) -> Norm | None:
    kind = _FUSED_NORMS.get(node.op_type)
    if kind is None or node.domain not in ("", "ai.onnx", "com.microsoft"):
        return None
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return None
    x = node.inputs[0]
    axis = node.attributes["axis"].value if node.attributes.get("axis") is not None else -1
    if not _last_axis(axis, _rank(x)):
        return None
    eps = node.attributes["epsilon"].value if node.attributes.get("epsilon") is not None else 1e-5
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if (scale is not None and _const(scale) is None) or (bias is not None and _const(bias) is None):
        return None
    return _wrap_casts(Norm(kind, x, node.outputs[0], [node], float(eps), scale, bias, fused=True))


def _match_decomposed_norm(rm: ir.Node) -> Norm | None:
    """Match a decomposed norm from its mean-of-squares ReduceMean."""
    sq = rm.inputs[0]
    p = sq.producer() if sq is not None else None
    if p is None:
        return None
    if p.op_type == "Pow" and _scalar(p.inputs[1]) == 2.0:
        base = p.inputs[0]
    elif p.op_type == "Mul" and p.inputs[0] is p.inputs[1]:
        base = p.inputs[0]
    else:
        return None
    if not _is_last_axis_mean(rm, base):
        return None
    nodes = [p, rm]
    kind, x = "rms", base
    bp = base.producer()
    if bp is not None and bp.op_type == "Sub":
        mp = bp.inputs[1].producer() if bp.inputs[1] is not None else None
        if mp is not None and mp.op_type == "ReduceMean" and mp.inputs[0] is bp.inputs[0] and _is_last_axis_mean(mp, bp.inputs[0]):
            kind, x = "layer", bp.inputs[0]
            nodes = [mp, bp] + nodes
    add = _only_use(rm.outputs[0])
    if add is None or add.op_type != "Add":
        return None
    eps = _scalar(_other_input(add, rm.outputs[0]))
    if eps is None:
        return None
    nodes.append(add)
    nxt = _only_use(add.outputs[0])
    if nxt is None:
        return None
    y = None
    if nxt.op_type == "Sqrt":
        nodes.append(nxt)
        r = nxt.outputs[0]
        uses = r.uses()
        if len(uses) != 1:
            return None
        u = uses[0][0]
        if u.op_type == "Div" and u.inputs[0] is base and u.inputs[1] is r:
            nodes.append(u)
            y = u.outputs[0]
        elif u.op_type in ("Reciprocal",) or (u.op_type == "Div" and _scalar(u.inputs[0]) == 1.0 and u.inputs[1] is r):
            nodes.append(u)
            m = _only_use(u.outputs[0])
            if m is not None and m.op_type == "Mul" and _other_input(m, u.outputs[0]) is base:
                nodes.append(m)
                y = m.outputs[0]
    elif nxt.op_type == "Pow" and _scalar(nxt.inputs[1]) == -0.5:
        nodes.append(nxt)
        m = _only_use(nxt.outputs[0])
        if m is not None and m.op_type == "Mul" and _other_input(m, nxt.outputs[0]) is base:
            nodes.append(m)
            y = m.outputs[0]
    if y is None:
        return None
    scale = bias = None
    casts = []  # a Cast back to the stream's type may sit between the normalization and its scale
    m = _only_use(y)
    if _cast_to(m) is not None:
        casts, m = [m], _only_use(m.outputs[0])
    if m is not None and m.op_type == "Mul":
        other = _other_input(m, (casts[0] if casts else y.producer()).outputs[0])
        c = _const(other)
        if c is not None and c.ndim <= 1:
            nodes += casts
            scale, y, casts = other, m.outputs[0], []
            nodes.append(m)
    a = _only_use(y)
    if a is not None and a.op_type == "Add":
        other = _other_input(a, y)
        c = _const(other)
        if c is not None and c.ndim == 1 and c.size > 1:
            bias, y = other, a.outputs[0]
            nodes.append(a)
    return _wrap_casts(Norm(kind, x, y, nodes, float(eps), scale, bias, fused=False))


def find_norms(graph: ir.Graph) -> list[Norm]:
    norms = []
    for node in graph:
        n = _match_fused_norm(node) if node.op_type in _FUSED_NORMS else (
            _match_decomposed_norm(node) if node.op_type == "ReduceMean" else None)
        if n is not None:
            norms.append(n)
    return norms


# ----------------------------------------------------------------------------------------------------------------
# The finder
# ----------------------------------------------------------------------------------------------------------------

_ATTENTION_OPS = {"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention"}
_ACTIVATIONS = {"Sigmoid", "Relu", "Gelu", "FastGelu", "QuickGelu", "BiasGelu", "Tanh", "Erf", "HardSigmoid", "Silu",
                "Swish", "Elu", "Selu", "LeakyRelu", "Softplus", "Mish", "HardSwish"}
_TRANSPARENT = {"Reshape", "Identity", "Dropout"}


def views_of(value: ir.Value) -> list[ir.Value]:
    """`value` and the values equal to it up to Reshape/Identity/Dropout that keep its last axis (GPT-2's Conv1D
    flattens the norm's output to [tokens, d] before its Gemm; OPT flattens the stream)."""
    out, frontier = [value], [value]
    while frontier:
        v = frontier.pop()
        for node, i in v.uses():
            if node.op_type in _TRANSPARENT and i == 0 and node.outputs:
                o = node.outputs[0]
                if o.shape is not None and value.shape is not None and len(o.shape) and len(value.shape) \
                        and o.shape[-1] != value.shape[-1]:
                    continue
                out.append(o)
                frontier.append(o)
    return out


def _table_gather(value: ir.Value, d: int) -> tuple[ir.Node | None, list[ir.Node]]:
    """The Gather of a constant [n, d] table that `value` is (through Unsqueeze/Reshape/Expand/Cast), if any."""
    via = []
    for _ in range(6):
        p = value.producer()
        if p is None:
            return None, []
        if p.op_type == "Gather":
            t = _const(p.inputs[0])
            ok = t is not None and t.ndim == 2 and t.shape[1] == d and _const(p.inputs[1]) is None
            return (p, via[::-1]) if ok else (None, [])
        if p.op_type not in ("Unsqueeze", "Reshape", "Expand", "Identity", "Squeeze"):
            return None, []
        via.append(p)
        value = p.inputs[0]
    return None, []


class _Finder:
    def __init__(self, model: ir.Model):
        self.graph = model.graph
        self.index = {id(n): i for i, n in enumerate(self.graph)}
        self.norms = find_norms(self.graph)
        self.norm_by_input: dict[int, list[Norm]] = {}
        for n in self.norms:
            self.norm_by_input.setdefault(id(n.input), []).append(n)
        self.problems: list[str] = []
        self.width_change: str | None = None  # a residual shortcut that changes the stream's width, if one was seen
        self.stream_reshapes: list[ir.Node] = []

    # -- graph walking ------------------------------------------------------------------------------------------
    def idx(self, value: ir.Value) -> int:
        p = value.producer()
        return -1 if p is None else self.index.get(id(p), -1)

    def aliases(self, value: ir.Value) -> list[ir.Value]:
        """The value and the values equal to it up to Reshape/Identity (the stream seen through views)."""
        return views_of(value)

    def ancestors_within(self, value: ir.Value, low: int) -> set[int]:
        """ids of nodes reached backward from `value` without going to nodes at index < low."""
        seen: set[int] = set()
        stack = [value]
        while stack:
            v = stack.pop()
            p = v.producer() if v is not None else None
            if p is None or id(p) in seen or self.index.get(id(p), -1) < low:
                continue
            seen.add(id(p))
            stack.extend(x for x in p.inputs if x is not None)
        return seen

    def descendants_within(self, values: Iterable[ir.Value], high: int) -> set[int]:
        seen: set[int] = set()
        stack = list(values)
        while stack:
            v = stack.pop()
            for node, _ in v.uses():
                if id(node) in seen or self.index.get(id(node), 1 << 60) > high:
                    continue
                seen.add(id(node))
                stack.extend(node.outputs)
        return seen

    def between(self, sources: list[ir.Value], target: ir.Value) -> list[ir.Node]:
        """Nodes on paths from any of `sources` to `target`, in graph order."""
        low = min(self.idx(s) for s in sources) + 1
        high = self.idx(target)
        down = self.descendants_within(sources, high)
        up = self.ancestors_within(target, low)
        keep = down & up
        return [n for n in self.graph if id(n) in keep]

    def reaches(self, value: ir.Value, target: ir.Value) -> bool:
        return id(target.producer()) in self.descendants_within([value], self.idx(target)) if target.producer() else False

    # -- pieces ---------------------------------------------------------------------------------------------------
    def find_embedding(self) -> Embedding | None:
        best = None
        for node in self.graph:
            if node.op_type != "Gather" or len(node.inputs) < 2:
                continue
            axis = node.attributes["axis"].value if node.attributes.get("axis") is not None else 0
            table = _const(node.inputs[0])
            if axis != 0 or table is None or table.ndim != 2 or _const(node.inputs[1]) is not None:
                continue
            if best is None or table.shape[0] > _const(best.inputs[0]).shape[0]:
                best = node
        bits = 0
        if best is None:  # a 4-bit table (GenAI int4 ties its head to the embedding so)
            for node in self.graph:
                a = node.attributes
                if node.op_type == "GatherBlockQuantized" and node.domain == "com.microsoft" \
                        and (a.get("gather_axis") is None or a["gather_axis"].value == 0) \
                        and node.outputs[0].shape is not None and isinstance(node.outputs[0].shape[-1], int):
                    best, bits = node, int(a["bits"].value) if a.get("bits") is not None else 4
                    break
            if best is None:
                return None
        d = best.outputs[0].shape[-1] if bits else _const(best.inputs[0]).shape[1]
        out, nodes, extra, consts = best.outputs[0], [best], [], []
        while True:
            # Shape readers do not count (the legacy exporter reads the embedding's shape for the masks)
            uses = [n for n, _ in out.uses() if n.op_type != "Shape"]
            nxt = uses[0] if len(uses) == 1 and not out.is_graph_output() else None
            if nxt is None:
                break
            other = _other_input(nxt, out) if len(nxt.inputs) == 2 else None
            if nxt.op_type == "Add" and other is not None:
                op, via = _table_gather(other, d)
                c = _const(other)
                if op is not None:
                    extra.append((op, op.inputs[0]))
                    nodes += [op, *via, nxt]
                elif c is not None and c.shape[-1:] == (d,):
                    consts.append((nxt, other))
                    nodes.append(nxt)
                else:
                    break
            elif nxt.op_type == "Mul" and other is not None and _const(other) is not None and _const(other).size == 1:
                nodes.append(nxt)
            else:
                break
            out = nxt.outputs[0]
        return Embedding(best, best.inputs[0], out, nodes, extra, consts, quantized=bits)

    def residual_add(self, stream: list[ir.Value]) -> tuple[ir.Node, ir.Value, ir.Value, Linear | None] | None:
        """The first Add that adds to the stream something computed from it.

        Returns (add, stream value, branch input, shortcut): the Add may read the stream through a shortcut,
        a MatMul (or a 4-bit MatMulNBits) by a constant square matrix (what `slice` puts on residual connections).
        """
        self.width_change = None
        ids = {id(v) for v in stream}
        low = min(self.idx(v) for v in stream) + 1
        best = None
        for v in stream:
            for node, i in v.uses():
                shortcut, via = None, v
                if node.op_type in ("MatMul", "MatMulNBits") and i == 0:  # quant4 quantizes the shortcuts too
                    lin = match_linear(node)
                    if lin is None or lin.bias is not None or lin.transpose_node is not None:
                        continue
                    add = _only_use(node.outputs[0])
                    if add is None:
                        continue
                    if lin.in_features != lin.out_features:  # slice with per-block widths: the stream narrows/widens
                        if add.op_type == "Add":
                            self.width_change = node.name
                        continue
                    shortcut, via, node = lin, node.outputs[0], add
                    i = next(j for j, x in enumerate(add.inputs) if x is via)
                if node.op_type != "Add" or len(node.inputs) != 2:
                    continue
                other = node.inputs[1 - i]
                if other is None or id(other) in ids:
                    continue
                anc = self.ancestors_within(other, low)
                if not any(id(s.producer()) in anc or any(id(u[0]) in anc for u in s.uses() if u[0] is not
                                                          (shortcut.node if shortcut else None)) for s in stream):
                    continue
                if best is None or self.index[id(node)] < self.index[id(best[0])]:
                    best = (node, v, other, shortcut)
        return best

    def norm_on(self, stream: list[ir.Value]) -> Norm | None:
        for v in stream:
            for n in self.norm_by_input.get(id(v), []):
                return n
        return None

    def linears_reading(self, values: list[ir.Value], allowed: set[int]) -> list[Linear]:
        out = []
        for v in values:
            for node, i in v.uses():
                if i == 0 and id(node) in allowed:
                    lin = match_linear(node)
                    if lin is not None:
                        out.append(lin)
        out.sort(key=lambda l: self.index[id(l.node)])
        return out

    def output_linear(self, branch_out: ir.Value) -> Linear | None:
        v = branch_out
        while True:
            p = v.producer()
            if p is None:
                return None
            if p.op_type in _TRANSPARENT:
                v = p.inputs[0]
                continue
            if p.op_type == "Add":  # a bias Add
                for x in p.inputs:
                    if x is not None and x.producer() is not None and x.producer().op_type in ("MatMul", "Gemm", "MatMulNBits"):
                        lin = match_linear(x.producer())
                        if lin is not None and lin.output is v:
                            return lin
                return None
            lin = match_linear(p)
            return lin if lin is not None and lin.output is v else None

    def _projection_reshapes(self, b: Block) -> None:
        """Record the Reshapes that carry a stream-width value between the stream and the projections: from a norm
        to the projections reading it, and from the o/down projections to the residual Adds (GPT-2's Conv1D is
        `view(-1, d) -> addmm -> view(b, s, d)`). Slicing resizes them with the stream's."""
        found = []
        for lin in b.attn_inputs + b.mlp_inputs:
            v = lin.input
            while (p := v.producer()) is not None and p.op_type in _TRANSPARENT:
                found.append(p)
                v = p.inputs[0]
        for lin, add in ((b.o, b.attn_add), (b.down, b.mlp_add)):
            v = lin.output
            while (n := _only_use(v)) is not None and n is not add and n.op_type in _TRANSPARENT:
                found.append(n)
                v = n.outputs[0]
        for n in found:
            if n.op_type == "Reshape" and n not in self.stream_reshapes:
                self.stream_reshapes.append(n)

    def label_attention(self, block: Block, projs: list[Linear], branch: list[ir.Node]) -> str | None:
        if len(projs) == 1:
            block.qkv = projs[0]
            return None
        if len(projs) != 3:
            return f"attention reads the norm through {len(projs)} projections (expected q, k, v or one fused qkv)"
        roles = self._attention_roles(projs, branch)
        if roles is None:  # fall back to metadata, then to export order (q, k, v)
            names = [scope_of(p.node).rsplit(".", 1)[-1] for p in projs]
            by_name = {n[:1]: p for n, p in zip(names, projs) if n[:1] in "qkv" and n.endswith("proj")}
            roles = [by_name[r] for r in "qkv"] if len(by_name) == 3 else projs
        block.q, block.k, block.v = roles
        return None

    def _attention_roles(self, projs: list[Linear], branch: list[ir.Node]) -> list[Linear] | None:
        core = next((n for n in branch if n.op_type in ("Attention", "MultiHeadAttention", "GroupQueryAttention")), None)
        if core is not None:
            targets = [core.inputs[i] for i in range(3)]
        else:
            sm = next((n for n in branch if n.op_type == "Softmax"), None)
            if sm is None:
                return None
            qk = self._walk(sm.inputs[0], backward=True)
            pv = self._walk(sm.outputs[0], backward=False)
            if qk is None or pv is None:
                return None
            targets = [qk.inputs[0], qk.inputs[1], pv.inputs[1]]
        roles = []
        for t in targets:
            hits = [p for p in projs if t is not None and (p.output is t or self.reaches(p.output, t))]
            if len(hits) != 1:
                return None
            roles.append(hits[0])
        return roles if len({id(r) for r in roles}) == 3 else None

    def _walk(self, value: ir.Value, backward: bool) -> ir.Node | None:
        """The MatMul nearest to a Softmax through mask/scale/cast ops (scores before it, values after it)."""
        skip = {"Add", "Mul", "Div", "Where", "Cast", "IsNaN", "Dropout", "Identity", "Sub"}
        for _ in range(8):
            if backward:
                p = value.producer()
                if p is None:
                    return None
                if p.op_type == "MatMul":
                    return p
                if p.op_type not in skip:
                    return None
                nxt = [x for x in p.inputs if x is not None and _const(x) is None and x.producer() is not None]
                # follow the input that carries the scores (the one computed inside the block, latest)
                nxt.sort(key=lambda x: self.idx(x))
                if not nxt:
                    return None
                value = nxt[-1]
            else:
                uses = value.uses()
                mm = [n for n, i in uses if n.op_type == "MatMul" and i == 0]
                if mm:
                    return mm[0]
                nxt = [n for n, _ in uses if n.op_type in skip]
                if not nxt:
                    return None
                value = max(nxt, key=lambda n: self.index[id(n)]).outputs[0]
        return None

    def label_mlp(self, block: Block, projs: list[Linear]) -> str | None:
        if len(projs) == 1:
            block.up = projs[0]
            return None
        if len(projs) != 2:
            return f"the MLP reads the norm through {len(projs)} projections (expected up, or gate and up)"
        # a factored projection (lowrank's x @ A @ B) is told apart by what its last factor feeds
        outs = [_past_factors(p.output) for p in projs]
        gated = [p for p, out in zip(projs, outs) if any(n.op_type in _ACTIVATIONS for n, _ in out.uses())]
        if len(gated) == 1:
            block.gate = gated[0]
            block.up = projs[1] if gated[0] is projs[0] else projs[0]
            return None
        # the up projection feeds only the product with the activated gate (an activation written out as
        # several ops, as the legacy exporter writes GELU, reads the gate more than once)
        ups = [p for i, p in enumerate(projs) if (m := _only_use(outs[i])) is not None and m.op_type == "Mul"
               and (o := _other_input(m, outs[i])) is not None and self.reaches(outs[1 - i], o)]
        if len(ups) == 1:
            block.up = ups[0]
            block.gate = projs[1] if ups[0] is projs[0] else projs[0]
            return None
        names = [scope_of(p.node).rsplit(".", 1)[-1] for p in projs]
        if "gate_proj" in names:
            g = names.index("gate_proj")
            block.gate, block.up = projs[g], projs[1 - g]
            return None
        return "cannot tell the MLP's gate projection from its up projection"

    # -- the walk -----------------------------------------------------------------------------------------------
    def run(self) -> TransformerBlocks:
        emb = self.find_embedding()
        if emb is None:
            return TransformerBlocks("unknown", None, [], None, None, 0, problems=["no token embedding (Gather of a constant table) found"])
        d = emb.width
        h = emb.output
        layout: str = "unknown"
        first = self.norm_on([h])
        if first is not None and first.kind == "layer" and not h.is_graph_output() \
                and all(any(n is x for x in first.nodes) for n, _ in h.uses()):
            # embedding LayerNorm with nothing else reading the embedding: a post-norm (BERT-style) model
            emb.norm = first
            emb.nodes += first.nodes
            h = first.output
        subs = []  # (kind, norm, add, stream value feeding the add, branch input, branch nodes, stream in)
        while True:
            stream = self.aliases(h)
            found = self.residual_add(stream)
            if found is None:
                if self.width_change is not None:
                    self.problems.append(f"the residual stream changes width at '{self.width_change}' (a model sliced "
                                         "with per-block widths); block-level passes need one width throughout")
                break
            add, stream_v, branch_out, shortcut = found
            branch = self.between(stream, branch_out)
            pre = self.norm_on(stream)
            if pre is not None and not any(id(pre.nodes[-1]) == id(n) for n in branch):
                pre = None
            out_stream = self.aliases(add.outputs[0])
            post = None
            if pre is None:
                post = self.norm_on(out_stream)
                if post is None:
                    self.problems.append(f"residual add {add.name}: no norm before or after it")
                    break
            sub_layout = "pre-norm" if pre is not None else "post-norm"
            if layout == "unknown":
                layout = sub_layout
            elif layout != sub_layout:
                self.problems.append(f"residual add {add.name}: mixes pre- and post-norm blocks")
                break
            kind = "attn" if any(n.op_type in _ATTENTION_OPS for n in branch) else "mlp"
            reads = [pre.output] if pre is not None else stream
            projs = self.linears_reading(self.aliases(reads[0]) if pre is not None else stream, {id(n) for n in branch})
            subs.append(dict(kind=kind, norm=pre or post, add=add, stream_in=h, branch=branch, projs=projs,
                             out=self.output_linear(branch_out), branch_out=branch_out, shortcut=shortcut))
            for v in stream + out_stream:
                p = v.producer()
                if p is not None and p.op_type == "Reshape" and p not in self.stream_reshapes:
                    self.stream_reshapes.append(p)
            h = add.outputs[0] if pre is not None else post.output
        blocks = self.pair(subs, layout)
        tb = TransformerBlocks(layout if blocks else "unknown", emb, blocks, None, None, d,
                               self.stream_reshapes, self.problems)
        end = blocks[-1].residual_out if blocks else emb.output
        if layout == "pre-norm" and blocks:
            tb.final_norm = self.norm_on(self.aliases(end))
            if tb.final_norm is not None:
                out = tb.final_norm.output
                views = views_of(out)
                users = [(n, v) for v in views for n, _ in v.uses() if not any(n is v2.producer() for v2 in views)]
                if len(users) == 1 and not any(v.is_graph_output() for v in views):
                    lin = match_linear(users[0][0])
                    if lin is not None and lin.input is users[0][1]:
                        tb.lm_head = lin
                        self.stream_reshapes += [v.producer() for v in views[1:] if v.producer().op_type == "Reshape"
                                                 and v.producer() not in self.stream_reshapes]
        elif layout == "post-norm" and blocks:
            tb.final_norm = None
            users = [n for n, i in blocks[-1].residual_out.uses()]
            if len(users) == 1 and not blocks[-1].residual_out.is_graph_output():
                tb.lm_head = match_linear(users[0])
        # the residual stream must go nowhere except blocks, the final norm and reshapes
        return tb

    def pair(self, subs: list[dict], layout: str) -> list[Block]:
        blocks: list[Block] = []
        i = 0
        while i + 1 < len(subs):
            a, m = subs[i], subs[i + 1]
            if a["kind"] != "attn" or m["kind"] != "mlp":
                what = "attention+MLP in one branch (parallel blocks)" if a["kind"] == "attn" and m["kind"] == "attn" else \
                    f"{a['kind']} then {m['kind']}"
                self.problems.append(f"block {len(blocks)}: expected attention then MLP, found {what}")
                break
            b = Block(len(blocks), a["stream_in"], a["add"].outputs[0], m["add"].outputs[0],
                      a["norm"], m["norm"], a["add"], m["add"], attn_shortcut=a["shortcut"], mlp_shortcut=m["shortcut"])
            problem = self.label_attention(b, a["projs"], a["branch"]) or self.label_mlp(b, m["projs"])
            b.o, b.down = a["out"], m["out"]
            if problem is None and (b.o is None or b.down is None):
                problem = "the attention or MLP output projection is not a MatMul/Gemm with a constant weight"
            if problem is None and any(a["branch_out"] is not None and p.output is None for p in b.linears().values()):
                problem = "a projection has no output"
            if problem is not None:
                self.problems.append(f"block {len(blocks)}: {problem}")
                break
            if layout == "post-norm":
                b.residual_mid, b.residual_out = a["norm"].output, m["norm"].output
            nodes = {id(n) for n in a["branch"]} | {id(n) for n in m["branch"]} | {id(a["add"]), id(m["add"])}
            nodes |= {id(x["shortcut"].node) for x in (a, m) if x["shortcut"] is not None}
            if layout == "post-norm":
                nodes |= {id(n) for n in a["norm"].nodes} | {id(n) for n in m["norm"].nodes}
            for lin in b.linears().values():
                nodes.add(id(lin.node))
                if lin.bias_node is not None:
                    nodes.add(id(lin.bias_node))
            nodes |= {id(n) for n in self.between([b.residual_in], b.residual_out)}
            b.nodes = [n for n in self.graph if id(n) in nodes]
            b.scope = _common_scope([lin.node for lin in b.linears().values()])
            self._projection_reshapes(b)
            blocks.append(b)
            i += 2
        if i < len(subs) and not self.problems:
            self.problems.append(f"a lone {subs[i]['kind']} sub-block after block {len(blocks) - 1}")
        return blocks


def _common_scope(nodes: list[ir.Node]) -> str:
    scopes = [scope_of(n) for n in nodes]
    scopes = [s for s in scopes if s]
    if not scopes:
        return ""
    parts = [s.split(".") for s in scopes]
    common = []
    for xs in zip(*parts):
        if len(set(xs)) != 1:
            break
        common.append(xs[0])
    return ".".join(common)


def find_blocks(model: ir.Model) -> TransformerBlocks:
    """Find the transformer structure of `model` (see the module docstring).

    Reads the graph only. It expects the canonical form of `modelsurgeon.canonical` (no-op Casts removed, fused
    skip norms split into Add + norm): passes that read the blocks require the `canonicalize` pass, which the
    pipeline runs first; other callers run `canonicalize(model)` themselves (`inspect` does)."""
    return _Finder(model).run()


@register_analysis("blocks")
def blocks_analysis(model: ir.Model, ctx) -> TransformerBlocks:
    return find_blocks(model)


# ----------------------------------------------------------------------------------------------------------------
# describe()
# ----------------------------------------------------------------------------------------------------------------


def _lin(l: Linear | None) -> str:
    if l is None:
        return "-"
    return f"{l.in_features}x{l.out_features}" + ("+b" if l.bias is not None else "")


def _norm(n: Norm | None) -> str:
    if n is None:
        return "-"
    extras = ("" if n.scale is None else "*g") + ("" if n.bias is None else "+b")
    return f"{n.kind}{'' if n.fused else '(dec)'}{extras}"


def describe(tb: TransformerBlocks) -> str:
    if not tb.blocks:
        why = "; ".join(tb.problems) or "no residual blocks found"
        return f"no transformer blocks ({why})"
    lines = [f"{len(tb.blocks)} {tb.layout} transformer blocks, d_model {tb.d_model}"]
    e = tb.embedding
    extra = f" + {len(e.extra_tables)} added table(s)" if e.extra_tables else ""
    table = f"{e.quantized}-bit {e.table.name} [.., {e.width}]" if e.quantized else \
        f"{e.table.name} {tuple(_const(e.table).shape)}"
    lines.append(f"  embedding: {table}{extra} -> {e.output.name}"
                 + (f" -> {_norm(e.norm)}" if e.norm is not None else ""))
    lines.append(f"  {'#':>3} {'scope':<22} {'attn norm':<12} {'q/k/v|qkv':<26} {'o':<10} {'mlp norm':<12} "
                 f"{'gate/up':<20} {'down':<10}")
    for b in tb.blocks:
        attn = f"qkv {_lin(b.qkv)}" if b.qkv else "/".join(_lin(p) for p in (b.q, b.k, b.v))
        mlp = "/".join(_lin(p) for p in (b.gate, b.up) if p is not None)
        lines.append(f"  {b.index:>3} {b.scope[-22:]:<22} {_norm(b.attn_norm):<12} {attn:<26} {_lin(b.o):<10} "
                     f"{_norm(b.mlp_norm):<12} {mlp:<20} {_lin(b.down):<10}")
    lines.append(f"  final norm: {_norm(tb.final_norm)}   lm head: {_lin(tb.lm_head)}")
    if tb.stream_reshapes:
        lines.append(f"  reshapes on the residual stream: {len(tb.stream_reshapes)}")
    for p in tb.problems:
        lines.append(f"  stopped: {p}")
    return "\n".join(lines)
