"""Graph-side helpers shared by the quantizing passes (quant4, quant8): finding linear layers with constant
weights, naming and registering new initializers, replacing a node while keeping its output's name, output
heads, node-name patterns, opset upgrades, and folding a per-channel input scale into the producing op.

Not a pass module (the leading underscore keeps `passes/__init__` from importing it as one).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np
import onnx_ir as ir

from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Option

FLOAT_TYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}
# Ops an output head's result may pass through on its way to a graph output and still count as the head.
_HEAD_TRANSPARENT = {"Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Softmax", "LogSoftmax",
                     "Sigmoid", "Add", "Mul", "Div"}


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer, a Constant output or a Transpose of one (tied heads), else None."""
    if value is None:
        return None
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx"):
        inner = const_array(producer.inputs[0])
        if inner is None:
            return None
        perm = attr(producer, "perm", None)
        return np.transpose(inner, perm)
    tensor = value.const_value
    if tensor is None:
        try:
            tensor = ir.convenience.get_const_tensor(value)
        except Exception:
            tensor = None
    if tensor is None:
        return None
    try:
        return tensor.numpy()
    except Exception:
        return None


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


@dataclasses.dataclass
class Linear:
    """A MatMul/Gemm computing out = x @ weight (+ bias) with a constant weight [K, N]."""

    node: ir.Node                 # the node to replace (MatMul or Gemm)
    x: ir.Value                   # the activation input
    weight: np.ndarray            # float32 [K, N] (Gemm's transB and alpha applied)
    weight_name: str              # initializer name, for naming and pattern matching
    bias: np.ndarray | None       # float32 [N]: Gemm's beta*C, or a fused MatMul -> Add(bias)
    bias_add: ir.Node | None      # the Add node folded into `bias` (replaced together with `node`)
    extra_add: ir.Value | None    # Gemm's non-constant C, added after the quantized product
    dtype: type                   # numpy float type of the activations (float32 / float16)

    @property
    def name(self) -> str:
        return self.node.name or self.weight_name

    @property
    def out(self) -> ir.Value:
        return (self.bias_add or self.node).outputs[0]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


KEEP_FLOAT = "modelsurgeon.keep_float"
"""Node metadata key: a pass that builds a layer whose weight must stay in float (a residual shortcut matrix of
`slice`, say) sets it to the reason; quantizing passes leave such nodes alone and report the reason."""


PROTECTED_BITS = Option(int, 8, "layers another pass marked as precision-sensitive (slice's residual shortcuts, its "
                        "basis change before a tied head): 8 = 8-bit MatMulNBits blocks, 32 = keep them in float",
                        choices=(8, 32))
"""The `protected_bits` option of the passes that quantize to MatMulNBits (quant4, spquant)."""


def mark_keep_float(node: ir.Node, reason: str) -> None:
    node.metadata_props[KEEP_FLOAT] = reason


def keep_float_reason(node: ir.Node) -> str | None:
    return node.metadata_props.get(KEEP_FLOAT)


def weighted_nodes(model: ir.Model, ops: tuple[str, ...], skipped: list[str], take_marked: bool = False):
    """(node, label, x_dtype, w) for each default-domain node of `ops` whose input 1 is a constant, in graph order.

    Nodes marked `keep_float` are reported in `skipped` and left out, unless `take_marked`. Products of two
    activations (attention scores and mixing) are counted, in one line appended to `skipped` once the iteration
    ends. `x_dtype` is the activation's type, or the weight's where the activation is untyped: MatMul, Gemm and
    Conv take both inputs of one type (legacy exports and values new passes create may carry no type)."""
    products = 0
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
            continue
        label = node.name or node.outputs[0].name
        if keep_float_reason(node) and not take_marked:
            skipped.append(f"{label}: kept in float ({keep_float_reason(node)})")
            continue
        x, wv = node.inputs[0], node.inputs[1]
        w = const_array(wv)
        if w is None:
            products += 1
            continue
        yield node, label, (None if x is None else x.dtype if x.dtype is not None else wv.dtype), w
    if products:
        skipped.append(activation_products_note(products))


def activation_products_note(count: int) -> str:
    return f"{count} MatMul/Gemm of two activations (attention scores and mixing): no constant weight to quantize"


def weight_name(node: ir.Node, label: str) -> str:
    """A name for a layer's weight: its initializer's, or `table.T` for the Transpose of one (a tied head)."""
    wv = node.inputs[1]
    if wv.producer() is not None and wv.producer().op_type == "Transpose":
        return f"{wv.producer().inputs[0].name}.T"
    return wv.name or label


def find_linears(model: ir.Model, fuse_bias: bool = True,
                 protected: list[Linear] | None = None) -> tuple[list[Linear], list[str]]:
    """MatMul/Gemm nodes with a constant 2-D weight, in graph order, and 'node: reason' for the ones left alone.

    Nodes marked `keep_float` are left alone too, unless `protected` is a list: then they go there instead."""
    found: list[Linear] = []
    skipped: list[str] = []
    for node, label, x_dtype, w in weighted_nodes(model, ("MatMul", "Gemm"), skipped, take_marked=protected is not None):
        x = node.inputs[0]
        if x_dtype not in FLOAT_TYPES:
            skipped.append(f"{label}: activation type {x_dtype} is not float32/float16")
            continue
        if w.dtype not in (np.float32, np.float16, np.float64):
            skipped.append(f"{label}: weight type {w.dtype} is not a float type")
            continue
        if w.ndim != 2:
            skipped.append(f"{label}: weight has rank {w.ndim}, only 2-D weights are quantized")
            continue
        w = w.astype(np.float32, copy=False)  # a weight memory-mapped from external data stays mapped, not copied
        bias = None
        bias_add = None
        extra = None
        if node.op_type == "Gemm":
            if attr(node, "transA", 0):
                skipped.append(f"{label}: Gemm with transA=1 is not supported")
                continue
            if attr(node, "transB", 0):
                w = w.T
            alpha = float(attr(node, "alpha", 1.0))
            if alpha != 1.0:  # a copy only when the weight really changes
                w = w * alpha
            beta = float(attr(node, "beta", 1.0))
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                c = const_array(node.inputs[2])
                if c is None:
                    if beta != 1.0:
                        skipped.append(f"{label}: Gemm with a non-constant C and beta != 1 is not supported")
                        continue
                    extra = node.inputs[2]
                else:
                    c = np.asarray(c, np.float32) * beta
                    if c.size not in (1, w.shape[1]) or (c.ndim == 2 and c.shape[0] != 1):
                        skipped.append(f"{label}: Gemm bias of shape {c.shape} is not a per-column vector")
                        continue
                    bias = np.broadcast_to(c.reshape(-1), (w.shape[1],)).astype(np.float32).copy()
        else:
            if _rank(x) == 1:
                skipped.append(f"{label}: 1-D activation input")
                continue
            if fuse_bias:
                bias, bias_add = _trailing_bias(node, w.shape[1])
        lin = Linear(node, x, np.ascontiguousarray(w), weight_name(node, label), bias, bias_add, extra,
                     FLOAT_TYPES[x_dtype])
        (protected if keep_float_reason(node) else found).append(lin)
    return found, skipped


def _trailing_bias(node: ir.Node, n: int) -> tuple[np.ndarray | None, ir.Node | None]:
    """A MatMul's only consumer `Add(out, const [N])` (bias), if there is one."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None, None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1 - uses[0].idx]
    c = const_array(other)
    if c is None or c.size != n or c.shape[-1:] != (n,) or c.ndim > 2 or (out.shape is not None and len(out.shape) < c.ndim):
        return None, None
    return c.reshape(-1).astype(np.float32), add


def find_embeddings(model: ir.Model, min_size: int = 4096) -> tuple[list[tuple[ir.Node, np.ndarray]], list[str]]:
    """Row-lookup Gathers (axis 0) from a constant float 2-D table of >= min_size values, and what was left alone.

    A table another node also reads (e.g. a head tied to the embedding) is left alone: quantizing the lookup
    alone would store the table twice.
    """
    found, skipped = [], []
    for node in model.graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        table = const_array(node.inputs[0])
        if table is None or table.ndim != 2 or table.dtype not in (np.float32, np.float16) or table.size < min_size:
            continue
        label = node.name or node.outputs[0].name
        if attr(node, "axis", 0) != 0:
            skipped.append(f"{label}: Gather on axis {attr(node, 'axis', 0)} (only row lookups are quantized)")
        elif len(node.inputs[0].uses()) > 1 or node.inputs[0].is_graph_output():
            skipped.append(f"{label}: its table is also read by other nodes (quantizing the lookup would store it twice)")
        else:
            found.append((node, table))
    return found, skipped


def refresh_inputs(group: list[Linear]) -> None:
    """Point each layer at its node's current input: a producer quantized earlier in the same pass (the first factor
    of a lowrank pair, say) was replaced by a new node writing a new value."""
    for lin in group:
        lin.x = lin.node.inputs[0]


def layer_input(nodes: list[ir.Node]) -> ir.Value:
    """The activation input of the node computing a layer (MatMul, Gemm or MatMulNBits among `nodes`)."""
    return next(n.inputs[0] for n in nodes if n.op_type in ("MatMul", "Gemm", "MatMulNBits"))


def expose_ties(model: ir.Model) -> int:
    """Write every exporter's tied head the way `tied_table` reads it (torch dynamo's): the head reads
    Transpose(table) of the table the embedding Gathers. Optimum's TorchScript export stores the head as a copy of
    the table, GenAI's builder gathers rows of Transpose(head weight) (modelsurgeon.canonical's two tie rewrites).
    Exact; the number of rewrites."""
    from modelsurgeon.canonical import tie_copied_heads, untranspose_tied_tables

    return untranspose_tied_tables(model.graph) + tie_copied_heads(model.graph)


def tied_table(node: ir.Node) -> ir.Value | None:
    """The embedding table an output head reads through a Transpose (a tied head), if the table also feeds a Gather."""
    if not is_output_head(node) or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    producer = node.inputs[1].producer()
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
        return None
    table = producer.inputs[0]
    if table is None or table.const_value is None or attr(producer, "perm", [1, 0]) not in ([1, 0], (1, 0)):
        return None
    if not any(n.op_type == "Gather" and i == 0 and attr(n, "axis", 0) == 0 for n, i in table.uses()):
        return None
    return table


def group_by_input(linears: list[Linear]) -> list[list[Linear]]:
    """Layers reading the same activation (q/k/v, gate/up) form one group; groups in graph order."""
    groups: dict[int, list[Linear]] = {}
    for lin in linears:
        groups.setdefault(id(lin.x), []).append(lin)
    return list(groups.values())


def is_output_head(node: ir.Node) -> bool:
    """Whether the node's result reaches a graph output only through shape/elementwise-with-constant ops."""
    value = node.outputs[0]
    for _ in range(16):
        if value.is_graph_output():
            return True
        uses = list(value.uses())
        if len(uses) != 1:
            return False
        nxt = uses[0].node
        if nxt.op_type not in _HEAD_TRANSPARENT:
            return False
        if nxt.op_type in ("Add", "Mul", "Div") and any(
                v is not None and v is not value and const_array(v) is None for v in nxt.inputs):
            return False
        value = nxt.outputs[0]
    return False


def check_regex(text: str) -> str | None:
    """Option check: None if `text` is a valid regular expression, else what is wrong."""
    try:
        re.compile(text)
    except re.error as exc:
        return f"not a valid regular expression ({exc})"
    return None


def matches(pattern: str, *names: str | None) -> bool:
    """Whether the regular expression is found (re.search) in any of the names (node name, weight name)."""
    return any(n and re.search(pattern, n) for n in names)


# ---------------------------------------------------------------------------------------------------------
# building


class Namer:
    """Unique value names for new initializers and intermediates."""

    def __init__(self, model: ir.Model):
        self.used = set(model.graph.initializers)
        self.used.update(v.name for v in model.graph.inputs)
        for node in model.graph.all_nodes():
            self.used.update(o.name for o in node.outputs if o.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


def add_initializer(model: ir.Model, namer: Namer, base: str, array) -> ir.Value:
    if not isinstance(array, ir.TensorProtocol):
        array = np.asarray(array)
        array = array if array.flags.c_contiguous else array.copy()  # (np.ascontiguousarray would make 0-d 1-d)
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(array)
    name = namer(base)
    tensor.name = name
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    model.graph.register_initializer(value)
    return value


def matmulnbits_node(model: ir.Model, namer: Namer, lin: Linear, bq, bias: np.ndarray | None, accuracy_level: int,
                     tag: str) -> ir.Node:
    """A `com.microsoft.MatMulNBits` node computing lin.x @ dequantize(bq) (+ bias), its initializers registered
    (named after the weight and `tag`). The caller inserts it (see `replace`)."""
    from modelsurgeon import quantize as Q

    ensure_opset(model, "com.microsoft", 1)
    base = lin.weight_name
    k, n = lin.shape
    b, scales, zp = Q.pack_matmulnbits(bq)
    inputs = [lin.x, add_initializer(model, namer, f"{base}_{tag}", b),
              add_initializer(model, namer, f"{base}_{tag}_scales", scales.astype(lin.dtype)),
              None if zp is None else add_initializer(model, namer, f"{base}_{tag}_zero_points", zp), None,
              None if bias is None else add_initializer(model, namer, f"{base}_{tag}_bias", bias.astype(lin.dtype))]
    while inputs[-1] is None:
        inputs.pop()
    attrs = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bq.bits),
             ir.AttrInt64("block_size", bq.block_size), ir.AttrInt64("accuracy_level", accuracy_level)]
    node = ir.Node("com.microsoft", "MatMulNBits", inputs, attrs, name=namer(f"{lin.name}_{tag}"))
    node.outputs[0].name = namer(f"{lin.out.name}_{tag}")
    return node


def drop_unused_initializers(model: ir.Model, values) -> None:
    for v in values:
        if v is not None and v.is_initializer() and not v.uses() and not v.is_graph_output() \
                and not v.is_graph_input() and v.name in model.graph.initializers:
            del model.graph.initializers[v.name]


def replace(model: ir.Model, old_nodes: list[ir.Node], old_out: ir.Value, new_nodes: list[ir.Node],
            new_out: ir.Value) -> None:
    """Put `new_nodes` where `old_nodes` were; `new_out` takes over `old_out`'s uses, name, type and shape."""
    graph = model.graph
    old_inputs = [v for n in old_nodes for v in n.inputs]
    ir.convenience.replace_nodes_and_values(graph, old_nodes[-1], old_nodes, new_nodes, [old_out], [new_out])
    drop_unused_initializers(model, old_inputs)


def ensure_opset(model: ir.Model, domain: str, version: int) -> bool:
    """Declare `domain` at >= `version`; the default domain is converted (onnxscript version converter).

    Returns True when the graph was rebuilt: below opset 18 onnxscript hands the conversion to onnx's C converter,
    whose graph replaces the model's, so nodes and values taken from the model before the call no longer belong
    to it. Call it before collecting layers, or collect them again when it returns True."""
    have = model.opset_imports.get(domain)
    if have is not None and have >= version:
        return False
    if domain in ("", "ai.onnx") and have is not None:
        from onnxscript import version_converter

        graph = model.graph
        try:
            version_converter.convert_version(model, version, fallback=True)
        except Exception as exc:
            raise UserError(f"cannot upgrade the model from opset {have} to {version} for blocked DequantizeLinear "
                            f"({str(exc).splitlines()[0][:120]}); use format=matmulnbits") from None
        model.opset_imports[""] = max(version, model.opset_imports.get("", version))
        return model.graph is not graph
    model.opset_imports[domain] = version
    return False


# ---------------------------------------------------------------------------------------------------------
# folding a per-channel scale into the op that produces a value


@dataclasses.dataclass
class Fold:
    """What `plan_channel_scale` found: actions to apply, and the values whose content they scale."""

    actions: list[Callable[[], None]]
    scaled_values: list[str]   # names of values multiplied by the factor along their last axis
    touched_nodes: list[ir.Node]  # nodes whose constants change (e.g. a quantized producer's scales)

    def apply(self) -> None:
        for act in self.actions:
            act()


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is None or len(value.shape) == 0:
        return None
    d = value.shape[-1]
    return d if isinstance(d, int) else None


def plan_channel_scale(model: ir.Model, namer: Namer, value: ir.Value, factor: np.ndarray,
                       allowed: set[int]) -> Fold | None:
    """Plan to multiply `value` by `factor` [C] along its last axis by changing the constants of its producer.

    Exact rewrites only: LayerNormalization/RMSNormalization gains (and bias), Mul/Div by a constant, MatMul /
    Gemm / MatMulNBits / DequantizeLinear->MatMul weights (output columns), Add/Sub (both operands), Relu (the
    factor is positive). Every consumer of a value on the way must be in `allowed` (node ids) or on the path.
    Returns None when no exact fold exists; nothing is changed until `apply()`.
    """
    c = factor.shape[0]
    if value.is_graph_output() or value.is_graph_input() or any(id(u.node) not in allowed for u in value.uses()):
        return None
    node = value.producer()
    if node is None or len(node.outputs) < 1 or node.outputs[0] is not value:
        return None
    op, dom = node.op_type, node.domain
    fold = Fold([], [value.name], [])

    def set_const(idx: int, array: np.ndarray, base: str) -> None:
        def act(node=node, idx=idx, array=array, base=base):
            old = node.inputs[idx]
            new = add_initializer(model, namer, base, array)
            node.replace_input_with(idx, new)
            drop_unused_initializers(model, [old])
        fold.actions.append(act)

    def scaled(array: np.ndarray, axis: int = -1) -> np.ndarray | None:
        """array * factor along `axis` (which must have length C), keeping dtype."""
        if array.ndim == 0 or array.shape[axis] != c:
            return None
        shape = [1] * array.ndim
        shape[axis] = c
        return (array.astype(np.float64) * factor.reshape(shape)).astype(array.dtype)

    def through(v: ir.Value) -> bool:
        sub = plan_channel_scale(model, namer, v, factor, {id(node)})
        if sub is None:
            return False
        fold.actions[:0] = sub.actions
        fold.scaled_values.extend(sub.scaled_values)
        fold.touched_nodes.extend(sub.touched_nodes)
        return True

    std = dom in ("", "ai.onnx")
    if std and op in ("LayerNormalization", "RMSNormalization"):
        rank = _rank(node.inputs[0])
        axis = attr(node, "axis", -1)
        if not (axis == -1 or (rank is not None and axis == rank - 1)):
            return None
        for idx in range(1, len(node.inputs)):
            arr = const_array(node.inputs[idx])
            if node.inputs[idx] is None:
                continue
            new = None if arr is None or arr.ndim != 1 else scaled(arr)
            if new is None:
                return None
            set_const(idx, new, f"{node.inputs[idx].name}_awq")
        return fold
    if std and op in ("Mul", "Div") and len(node.inputs) == 2:
        for idx in (1, 0) if op == "Mul" else (1,):
            arr = const_array(node.inputs[idx])
            if arr is None:
                continue
            if arr.ndim == 0 or arr.shape[-1] != c or arr.size != c:
                return None
            new = scaled(arr) if op == "Mul" else (arr.astype(np.float64) / factor.reshape(arr.shape)).astype(arr.dtype)
            set_const(idx, new, f"{node.inputs[idx].name}_awq")
            return fold
        for idx in (1, 0) if op == "Mul" else (0,):  # no constant: scale one operand (with C channels) instead
            v = node.inputs[idx]
            if _last_dim(v) == c and through(v):
                return fold
        return None
    if std and op in ("Add", "Sub") and len(node.inputs) == 2:
        for idx in (0, 1):
            v = node.inputs[idx]
            arr = const_array(v)
            if arr is not None:
                if arr.ndim == 0 or arr.shape[-1] != c:
                    return None
                set_const(idx, scaled(arr), f"{v.name}_awq")
            elif _last_dim(v) != c or not through(v):
                return None
        return fold
    if std and op == "Relu":
        return fold if through(node.inputs[0]) else None
    if std and op == "MatMul":
        wv = node.inputs[1]
        w = const_array(wv)
        if w is not None:
            if w.ndim != 2 or w.shape[1] != c:
                return None
            set_const(1, scaled(w), f"{wv.name}_awq")
            fold.touched_nodes.append(node)
            return fold
        dq = wv.producer() if wv is not None else None
        if dq is not None and dq.op_type == "DequantizeLinear" and len(wv.uses()) == 1 and attr(dq, "axis", 1) == 0:
            s = const_array(dq.inputs[1])
            if s is None or s.ndim != 2 or s.shape[1] != c or len(dq.inputs[1].uses()) != 1:
                return None
            fold.actions.append(lambda dq=dq, s=s: (dq.replace_input_with(
                1, add_initializer(model, namer, f"{dq.inputs[1].name}_awq", scaled(s)))))
            fold.touched_nodes.append(node)
            return fold
        return None
    if std and op == "Gemm":
        w = const_array(node.inputs[1])
        if w is None or w.ndim != 2 or attr(node, "transA", 0):
            return None
        new = scaled(w, 0 if attr(node, "transB", 0) else 1)
        if new is None:
            return None
        set_const(1, new, f"{node.inputs[1].name}_awq")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b = const_array(node.inputs[2])
            if b is None or b.ndim == 0 or b.shape[-1] != c:
                return None
            set_const(2, scaled(b), f"{node.inputs[2].name}_awq")
        fold.touched_nodes.append(node)
        return fold
    if dom == "com.microsoft" and op == "MatMulNBits":
        if attr(node, "N") != c:
            return None
        s = const_array(node.inputs[2])
        if s is None:
            return None
        per_col = s.reshape(c, -1)
        set_const(2, (per_col.astype(np.float64) * factor[:, None]).astype(s.dtype).reshape(s.shape),
                  f"{node.inputs[2].name}_awq")
        if len(node.inputs) > 5 and node.inputs[5] is not None:
            b = const_array(node.inputs[5])
            if b is None:
                return None
            set_const(5, scaled(b), f"{node.inputs[5].name}_awq")
        fold.touched_nodes.append(node)
        return fold
    return None
