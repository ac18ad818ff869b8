"""An ONNX graph (or a slice of one) as a differentiable torch function of chosen initializers.

`TorchGraph(nodes, outputs, params)` interprets `onnx_ir` nodes one by one with torch operations, so gradients flow
from the outputs to the initializers given as `torch.nn.Parameter`s (by initializer name); every other initializer
is a constant. One given as a `LowRankSum` (a frozen matrix plus trainable factors: heal's LoRA) stays factored
where the op reading it allows. Inputs are fed by value name, so the same interpreter runs a whole graph (feeds:
the graph inputs) or one transformer block (feeds: its residual stream input and the side values it reads, such as
masks and rotary tables). This is our own interpreter, not a converter: onnx2torch is not installed here, and what
`heal` needs is narrower (the graph stays the graph, only initializer values change) and covers the ops our
exporters' decoders, encoders and CNNs use after our passes (`OPS`). An op outside `OPS` raises a one-line
`UserError` naming it.

What it cannot do: control flow (If, Loop, Scan) and model-local functions; com.microsoft contrib ops other than
Skip(Simplified)LayerNormalization and GroupQueryAttention (`onnx_torch_attention`: GenAI's builder writes it), such
as MatMulNBits, RotaryEmbedding, MultiHeadAttention and quantized ops; opset-23 Attention and RotaryEmbedding. With
`upcast` (default) float16 and bfloat16 tensors and Casts to them compute in float32, so a float16 graph is
interpreted in float32 (its weights train in float32 and are stored back in float16).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from modelsurgeon.errors import UserError

_DTYPES = {
    ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64, ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
    ir.DataType.INT16: torch.int16, ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}
_LOW_FLOATS = (torch.float16, torch.bfloat16)


def torch_dtype(dtype: ir.DataType | int, upcast: bool = True) -> torch.dtype:
    dt = _DTYPES.get(ir.DataType(dtype))
    if dt is None:
        raise UserError(f"the torch interpreter has no tensors of type {ir.DataType(dtype).name}")
    return torch.float32 if upcast and dt in _LOW_FLOATS else dt


def to_torch(array: np.ndarray, upcast: bool = True) -> torch.Tensor:
    """A numpy array as a torch tensor (shared when it can be; float16 upcast to float32)."""
    a = np.asarray(array)
    if a.dtype == np.float16 and upcast:
        a = a.astype(np.float32)
    elif a.dtype.kind not in "biuf" or a.dtype == np.uint16:  # bfloat16 from ml_dtypes and friends
        a = a.astype(np.float32)
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, order="C", copy=True)
    return torch.from_numpy(a)


# ----------------------------------------------------------------------------------------------------------------
# Op implementations: fn(node, inputs, interp) -> list of outputs (None inputs are absent optional ones)
# ----------------------------------------------------------------------------------------------------------------

OpFn = Callable[[ir.Node, list, "TorchGraph"], list]
OPS: dict[str, OpFn] = {}


def _op(*names: str):
    def deco(fn):
        for n in names:
            OPS[n] = fn
        return fn
    return deco


def _attr(node: ir.Node, key: str, default=None):
    a = node.attributes.get(key)
    if a is None:
        return default
    v = a.value
    if isinstance(v, ir.TensorProtocol):
        return v.numpy()
    if isinstance(v, Sequence) and not isinstance(v, (str, bytes)):
        return list(v)
    return v


def _ints(t) -> list[int]:
    if t is None:
        return []
    return [int(v) for v in (t.reshape(-1).tolist() if isinstance(t, torch.Tensor) else np.asarray(t).reshape(-1))]


def _elementwise(fn):
    return lambda node, xs, g: [fn(*xs)]


def _int_div(a, b):
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _int_div, "Neg": torch.neg,
    "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Exp": torch.exp, "Log": torch.log, "Abs": torch.abs,
    "Sin": torch.sin, "Cos": torch.cos, "Tanh": torch.tanh, "Sigmoid": torch.sigmoid, "Erf": torch.erf,
    "Relu": torch.relu, "Floor": torch.floor, "Ceil": torch.ceil, "Sign": torch.sign, "Round": torch.round,
    "Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge,
    "Not": torch.logical_not, "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
    "IsNaN": torch.isnan, "MatMul": torch.matmul, "Softplus": F.softplus,
}.items():
    OPS[_name] = _elementwise(_fn)


@_op("Identity", "Dropout")
def _identity(node, xs, g):
    out = [xs[0]]
    if len(node.outputs) > 1:
        out.append(torch.ones_like(xs[0], dtype=torch.bool))
    return out


@_op("Pow")
def _pow(node, xs, g):
    x, y = xs
    if x.dtype.is_floating_point and not y.dtype.is_floating_point:
        y = y.to(x.dtype)
    return [torch.pow(x, y).to(x.dtype)]


@_op("Mod")
def _mod(node, xs, g):
    return [torch.fmod(*xs) if _attr(node, "fmod", 0) else torch.remainder(*xs)]


@_op("IsInf")
def _isinf(node, xs, g):
    x = xs[0]
    pos, neg = _attr(node, "detect_positive", 1), _attr(node, "detect_negative", 1)
    return [(torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))]


@_op("Max", "Min", "Sum", "Mean")
def _variadic(node, xs, g):
    fn = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[node.op_type]
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return [out / len(xs) if node.op_type == "Mean" else out]


@_op("Where")
def _where(node, xs, g):
    return [torch.where(xs[0].bool(), xs[1], xs[2])]


@_op("Clip")
def _clip(node, xs, g):
    x = xs[0]
    lo = xs[1] if len(xs) > 1 and xs[1] is not None else _attr(node, "min")
    hi = xs[2] if len(xs) > 2 and xs[2] is not None else _attr(node, "max")
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return [x]


@_op("LeakyRelu")
def _leaky(node, xs, g):
    return [F.leaky_relu(xs[0], _attr(node, "alpha", 0.01))]


@_op("Elu")
def _elu(node, xs, g):
    return [F.elu(xs[0], _attr(node, "alpha", 1.0))]


@_op("HardSigmoid")
def _hardsigmoid(node, xs, g):
    return [torch.clamp(_attr(node, "alpha", 0.2) * xs[0] + _attr(node, "beta", 0.5), 0, 1)]


@_op("HardSwish")
def _hardswish(node, xs, g):
    return [F.hardswish(xs[0])]


@_op("Gelu")
def _gelu(node, xs, g):
    return [F.gelu(xs[0], approximate=_attr(node, "approximate", "none"))]


@_op("Softmax", "LogSoftmax")
def _softmax(node, xs, g):
    fn = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    return [fn(xs[0], dim=_attr(node, "axis", -1))]


@_op("Cast")
def _cast(node, xs, g):
    return [xs[0].to(torch_dtype(_attr(node, "to"), g.upcast))]


@_op("CastLike")
def _castlike(node, xs, g):
    return [xs[0].to(xs[1].dtype)]


@_op("Constant")
def _constant(node, xs, g):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        v = _attr(node, key)
        if v is not None:
            if key.startswith("value_float"):
                return [torch.tensor(v, dtype=torch.float32)]
            if key.startswith("value_int"):
                return [torch.tensor(v, dtype=torch.int64)]
            return [to_torch(v, g.upcast)]
    raise UserError(f"the torch interpreter cannot read Constant {node.name!r} (no numeric value attribute)")


@_op("ConstantOfShape")
def _constant_of_shape(node, xs, g):
    v = _attr(node, "value")
    fill = to_torch(np.zeros(1, np.float32) if v is None else v, g.upcast).reshape(-1)
    return [fill.expand(*_ints(xs[0])).clone() if _ints(xs[0]) else fill.reshape(())]


@_op("Shape")
def _shape(node, xs, g):
    dims = list(xs[0].shape)
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    return [torch.tensor(dims[start:end] if end is not None else dims[start:], dtype=torch.int64)]


@_op("Size")
def _size(node, xs, g):
    return [torch.tensor(xs[0].numel(), dtype=torch.int64)]


@_op("Range")
def _range(node, xs, g):
    start, limit, delta = (x.item() for x in xs)
    return [torch.arange(start, limit, delta, dtype=xs[0].dtype)]


@_op("Reshape")
def _reshape(node, xs, g):
    x, shape = xs[0], _ints(xs[1])
    if not _attr(node, "allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


@_op("Flatten")
def _flatten(node, xs, g):
    x = xs[0]
    axis = _attr(node, "axis", 1) % (x.dim() or 1) if _attr(node, "axis", 1) < 0 else _attr(node, "axis", 1)
    return [x.reshape(math.prod(x.shape[:axis]), -1)]


@_op("Transpose")
def _transpose(node, xs, g):
    perm = _attr(node, "perm") or list(range(xs[0].dim()))[::-1]
    return [xs[0].permute(*perm)]


def _axes(node, xs, index: int = 1) -> list[int] | None:
    if len(xs) > index and xs[index] is not None:
        return _ints(xs[index])
    a = _attr(node, "axes")
    return None if a is None else [int(v) for v in a]


@_op("Unsqueeze")
def _unsqueeze(node, xs, g):
    x = xs[0]
    axes = sorted(a % (x.dim() + len(_axes(node, xs))) for a in _axes(node, xs))
    for a in axes:
        x = x.unsqueeze(a)
    return [x]


@_op("Squeeze")
def _squeeze(node, xs, g):
    x = xs[0]
    axes = _axes(node, xs)
    if axes is None:
        return [x.squeeze()]
    keep = [d for i, d in enumerate(x.shape) if i not in {a % x.dim() for a in axes}]
    return [x.reshape(keep)]


@_op("Concat")
def _concat(node, xs, g):
    return [torch.cat([x for x in xs if x is not None], dim=_attr(node, "axis"))]


@_op("Split")
def _split(node, xs, g):
    x, axis = xs[0], _attr(node, "axis", 0)
    if len(xs) > 1 and xs[1] is not None:
        sizes = _ints(xs[1])
    elif _attr(node, "split") is not None:
        sizes = [int(v) for v in _attr(node, "split")]
    else:
        n, dim = len(node.outputs), x.shape[axis]
        chunk = -(-dim // n)
        sizes = [min(chunk, dim - i * chunk) for i in range(n)]
    return list(torch.split(x, sizes, dim=axis))


@_op("Expand")
def _expand(node, xs, g):
    x = xs[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(xs[1])))
    return [x.expand(shape)]


@_op("Tile")
def _tile(node, xs, g):
    return [xs[0].repeat(*_ints(xs[1]))]


@_op("Slice")
def _slice(node, xs, g):
    x = xs[0]
    starts, ends = _ints(xs[1]), _ints(xs[2])
    axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
    steps = _ints(xs[4]) if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= x.dim()
        dim = x.shape[a]
        if st > 0:
            s = min(max(s + dim if s < 0 else s, 0), dim)
            e = min(max(e + dim if e < 0 else e, 0), dim)
            x = x.narrow(a, s, max(e - s, 0)) if st == 1 else x.index_select(a, torch.arange(s, max(e, s), st))
        else:
            s = min(max(s + dim if s < 0 else s, -1), dim - 1)
            e = min(max(e + dim if e < 0 else e, -1), dim - 1)
            x = x.index_select(a, torch.arange(s, e, st, dtype=torch.int64))
    return [x]


def _normalize_index(idx: torch.Tensor, dim: int) -> torch.Tensor:
    idx = idx.long()
    return torch.where(idx < 0, idx + dim, idx)


@_op("Gather")
def _gather(node, xs, g):
    x, idx = xs
    axis = _attr(node, "axis", 0) % x.dim()
    idx = _normalize_index(idx, x.shape[axis])
    out = x.index_select(axis, idx.reshape(-1))
    return [out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))]


@_op("GatherElements")
def _gather_elements(node, xs, g):
    x, idx = xs
    axis = _attr(node, "axis", 0) % x.dim()
    return [torch.gather(x, axis, _normalize_index(idx, x.shape[axis]))]


@_op("GatherND")
def _gather_nd(node, xs, g):
    data, indices = xs
    b = _attr(node, "batch_dims", 0)
    k = indices.shape[-1]
    batch_shape = tuple(data.shape[:b])
    n = math.prod(batch_shape)
    d = data.reshape((n,) + tuple(data.shape[b:]))
    idx = indices.long().reshape(n, -1, k)
    parts = [torch.where(idx[..., j] < 0, idx[..., j] + d.shape[1 + j], idx[..., j]) for j in range(k)]
    bi = torch.arange(n).unsqueeze(1).expand(n, idx.shape[1])
    sel = d[(bi, *parts)]
    return [sel.reshape(batch_shape + tuple(indices.shape[b:-1]) + tuple(data.shape[b + k:]))]


@_op("ScatterND")
def _scatter_nd(node, xs, g):
    data, indices, updates = xs
    out = data.clone()
    k = indices.shape[-1]
    idx = indices.long().reshape(-1, k)
    upd = updates.reshape((idx.shape[0],) + tuple(data.shape[k:]))
    out[tuple(idx[:, j] for j in range(k))] = upd
    return [out]


@_op("Trilu")
def _trilu(node, xs, g):
    k = int(xs[1].item()) if len(xs) > 1 and xs[1] is not None else 0
    return [torch.triu(xs[0], k) if _attr(node, "upper", 1) else torch.tril(xs[0], k)]


@_op("CumSum")
def _cumsum(node, xs, g):
    x, axis = xs[0], int(xs[1].item())
    if _attr(node, "reverse", 0):
        x = x.flip(axis)
    out = torch.cumsum(x, axis).to(x.dtype)
    if _attr(node, "exclusive", 0):
        out = out - x
    return [out.flip(axis) if _attr(node, "reverse", 0) else out]


def _reduce(fn):
    def run(node, xs, g):
        x = xs[0]
        axes = _axes(node, xs)
        keep = bool(_attr(node, "keepdims", 1))
        if not axes:
            if _attr(node, "noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, [a % x.dim() for a in axes], keep)]
    return run


OPS["ReduceMean"] = _reduce(lambda x, a, k: torch.mean(x, dim=a, keepdim=k))
OPS["ReduceSum"] = _reduce(lambda x, a, k: torch.sum(x, dim=a, keepdim=k))
OPS["ReduceMax"] = _reduce(lambda x, a, k: torch.amax(x, dim=a, keepdim=k))
OPS["ReduceMin"] = _reduce(lambda x, a, k: torch.amin(x, dim=a, keepdim=k))
def _prod(x, axes, keep):
    for a in sorted(axes, reverse=True):
        x = torch.prod(x, dim=a, keepdim=keep)
    return x


OPS["ReduceProd"] = _reduce(_prod)
OPS["ReduceL2"] = _reduce(lambda x, a, k: torch.sqrt(torch.sum(x * x, dim=a, keepdim=k)))
OPS["ReduceSumSquare"] = _reduce(lambda x, a, k: torch.sum(x * x, dim=a, keepdim=k))


@_op("ArgMax", "ArgMin")
def _argmax(node, xs, g):
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    return [fn(xs[0], dim=_attr(node, "axis", 0), keepdim=bool(_attr(node, "keepdims", 1)))]


@_op("Gemm")
def _gemm(node, xs, g):
    a, b = xs[0], xs[1]
    if _attr(node, "transA", 0):
        a = a.transpose(0, 1)
    if _attr(node, "transB", 0):
        b = b.transpose(0, 1)
    y = _attr(node, "alpha", 1.0) * (a @ b)
    if len(xs) > 2 and xs[2] is not None:
        y = y + _attr(node, "beta", 1.0) * xs[2]
    return [y]


@_op("Einsum")
def _einsum(node, xs, g):
    return [torch.einsum(_attr(node, "equation"), *xs)]


def _norm_axes(x: torch.Tensor, axis: int) -> list[int]:
    return list(range(axis % x.dim(), x.dim()))


@_op("LayerNormalization")
def _layer_norm(node, xs, g):
    x, scale = xs[0], xs[1]
    bias = xs[2] if len(xs) > 2 else None
    dims = _norm_axes(x, _attr(node, "axis", -1))
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    inv = torch.rsqrt((centered * centered).mean(dim=dims, keepdim=True) + _attr(node, "epsilon", 1e-5))
    y = centered * inv * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv][:len(node.outputs)]


@_op("SimplifiedLayerNormalization", "RMSNormalization")
def _rms_norm(node, xs, g):
    x, scale = xs[0], xs[1]
    dims = _norm_axes(x, _attr(node, "axis", -1))
    inv = torch.rsqrt((x * x).mean(dim=dims, keepdim=True) + _attr(node, "epsilon", 1e-5))
    return [x * inv * scale, inv][:len(node.outputs)]


@_op("com.microsoft:SkipSimplifiedLayerNormalization", "com.microsoft:SkipLayerNormalization")
def _skip_norm(node, xs, g):
    x, skip, gamma = xs[0], xs[1], xs[2]
    simplified = node.op_type.startswith("SkipSimplified")
    beta = None if simplified else (xs[3] if len(xs) > 3 else None)
    bias = xs[3 if simplified else 4] if len(xs) > (3 if simplified else 4) else None
    s = x + skip + (bias if bias is not None else 0)
    eps = _attr(node, "epsilon", 1e-5)
    if simplified:
        inv = torch.rsqrt((s * s).mean(-1, keepdim=True) + eps)
        y, mean = s * inv * gamma, None
    else:
        mean = s.mean(-1, keepdim=True)
        inv = torch.rsqrt(((s - mean) ** 2).mean(-1, keepdim=True) + eps)
        y = (s - mean) * inv * gamma + (beta if beta is not None else 0)
    return [y, mean, inv, s][:len(node.outputs)]


@_op("BatchNormalization")
def _batch_norm(node, xs, g):
    x, scale, bias, mean, var = xs[:5]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = torch.rsqrt(var.reshape(shape) + _attr(node, "epsilon", 1e-5))
    return [(x - mean.reshape(shape)) * inv * scale.reshape(shape) + bias.reshape(shape)]


def _spatial_pads(node, x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads [begin..., end...] for the spatial axes, auto_pad resolved."""
    n = len(kernel)
    auto = _attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(n):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin + end
    if auto == "VALID":
        return [0] * (2 * n)
    return [int(p) for p in (_attr(node, "pads") or [0] * (2 * n))]


def _pad_input(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Symmetric pads as a list for torch, asymmetric ones applied to x (then none left)."""
    n = len(pads) // 2
    begin, end = pads[:n], pads[n:]
    if begin == end:
        return x, begin
    torch_pads = []
    for i in reversed(range(n)):
        torch_pads += [begin[i], end[i]]
    return F.pad(x, torch_pads, value=value), [0] * n


@_op("Conv")
def _conv(node, xs, g):
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    n = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = [int(s) for s in (_attr(node, "strides") or [1] * n)]
    dilations = [int(d) for d in (_attr(node, "dilations") or [1] * n)]
    x, pads = _pad_input(x, _spatial_pads(node, x, kernel, strides, dilations))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return [fn(x, w, b, stride=strides, padding=pads, dilation=dilations, groups=_attr(node, "group", 1))]


@_op("MaxPool", "AveragePool")
def _pool(node, xs, g):
    x = xs[0]
    kernel = [int(k) for k in _attr(node, "kernel_shape")]
    n = len(kernel)
    strides = [int(s) for s in (_attr(node, "strides") or [1] * n)]
    dilations = [int(d) for d in (_attr(node, "dilations") or [1] * n)]
    pads = _spatial_pads(node, x, kernel, strides, dilations)
    ceil = bool(_attr(node, "ceil_mode", 0))
    if node.op_type == "MaxPool":
        x, sym = _pad_input(x, pads, value=-math.inf)
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
        return [fn(x, kernel, strides, sym, dilations, ceil_mode=ceil)]
    include = bool(_attr(node, "count_include_pad", 0))
    x, sym = _pad_input(x, pads) if include else (x, pads[:n])
    if not include and pads[:n] != pads[n:]:
        raise UserError(f"the torch interpreter has no AveragePool with asymmetric pads ({node.name})")
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
    return [fn(x, kernel, strides, sym, ceil_mode=ceil, count_include_pad=include)]


@_op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node, xs, g):
    dims = list(range(2, xs[0].dim()))
    if node.op_type == "GlobalAveragePool":
        return [xs[0].mean(dim=dims, keepdim=True)]
    return [torch.amax(xs[0], dim=dims, keepdim=True)]


@_op("Pad")
def _pad(node, xs, g):
    x, pads = xs[0], _ints(xs[1]) if len(xs) > 1 and xs[1] is not None else [int(p) for p in _attr(node, "pads")]
    value = float(xs[2].item()) if len(xs) > 2 and xs[2] is not None else 0.0
    axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(x.dim()))
    mode = _attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    n = len(axes)
    full = {a % x.dim(): (pads[i], pads[i + n]) for i, a in enumerate(axes)}
    torch_pads = []
    for a in reversed(range(x.dim())):
        torch_pads += list(full.get(a, (0, 0)))
    if mode == "constant":
        return [F.pad(x, torch_pads, value=value)]
    return [F.pad(x, torch_pads, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])]


# ----------------------------------------------------------------------------------------------------------------
# The interpreter
# ----------------------------------------------------------------------------------------------------------------


class LowRankSum:
    """A matrix kept as a frozen base plus a trainable low-rank delta, `base + a @ b` ([m, n] + [m, r] @ [r, n]),
    that the interpreter never forms where it need not: a MatMul or Gemm reading it as its right operand computes
    `x @ base + (x @ a) @ b`, a 2-D Transpose swaps the factors, a Gather of rows gathers the factors' rows. So the
    backward pass computes no [m, n] gradient of the base (only the input's and the factors'), which for LoRA
    (heal's `rank=R`) is a third of a training step's matrix products. Any other op reads `dense()`."""

    def __init__(self, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        self.base, self.a, self.b = base, a, b

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    def dense(self) -> torch.Tensor:
        return self.base + self.a @ self.b

    def t(self) -> "LowRankSum":
        return LowRankSum(self.base.t(), self.b.t(), self.a.t())

    def right_of(self, x: torch.Tensor) -> torch.Tensor:
        """x @ (base + a @ b)."""
        return x @ self.base + (x @ self.a) @ self.b

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.base.index_select(0, idx) + self.a.index_select(0, idx) @ self.b


def formed(x):
    """`x` as the graph's ops read it: a LowRankSum formed into its matrix, any other value as it is."""
    return x.dense() if isinstance(x, LowRankSum) else x


def _low_rank_matmul(node, xs, g):
    if xs[0].dim() < 1:
        return None
    return [xs[1].right_of(xs[0])]


def _low_rank_transpose(node, xs, g):
    perm = _attr(node, "perm")
    return [xs[0].t()] if perm is None or list(perm) == [1, 0] else None


def _low_rank_gather(node, xs, g):
    x, idx = xs
    if _attr(node, "axis", 0) % 2 != 0:
        return None
    rows = x.rows(_normalize_index(idx, x.shape[0]).reshape(-1))
    return [rows.reshape(tuple(idx.shape) + tuple(x.shape[1:]))]


def _low_rank_gemm(node, xs, g):
    if _attr(node, "transA", 0):
        return None
    b = xs[1].t() if _attr(node, "transB", 0) else xs[1]
    y = _attr(node, "alpha", 1.0) * b.right_of(xs[0])
    if len(xs) > 2 and xs[2] is not None:
        y = y + _attr(node, "beta", 1.0) * xs[2]
    return [y]


# ops that take a LowRankSum as it is (at input 1 for MatMul and Gemm, input 0 for Transpose and Gather; `_run`
# calls them only when no other input is one); each returns None where it cannot, and the op then reads the
# formed matrix
LOW_RANK_OPS: dict[str, OpFn] = {"MatMul": _low_rank_matmul, "Gemm": _low_rank_gemm,
                                  "Transpose": _low_rank_transpose, "Gather": _low_rank_gather}
_LOW_RANK_INPUT = {"MatMul": 1, "Gemm": 1, "Transpose": 0, "Gather": 0}


def op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


def unsupported_ops(nodes: Iterable[ir.Node]) -> list[str]:
    """The ops among `nodes` the interpreter cannot run, as 'domain:op' (or 'op'), each once."""
    return sorted({op_key(n) for n in nodes if op_key(n) not in OPS})


class TorchGraph:
    """`nodes` (in topological order) as a torch function: feeds by value name -> tensors of `outputs`.

    `params` maps initializer names to tensors (usually `torch.nn.Parameter`s) that replace the stored values;
    every other initializer read by the nodes is converted once and kept as a constant.
    """

    def __init__(self, nodes: Iterable[ir.Node], outputs: Sequence[str],
                 params: dict[str, torch.Tensor] | None = None, upcast: bool = True):
        self.nodes = list(nodes)
        self.outputs = list(outputs)
        self.params = dict(params or {})
        self.upcast = upcast
        missing = unsupported_ops(self.nodes)
        if missing:
            where = next(n.name for n in self.nodes if op_key(n) == missing[0])
            raise UserError(f"the torch interpreter (modelsurgeon.onnx_torch) has no {missing[0]} op (node {where!r}"
                            f"{' and ' + ', '.join(missing[1:]) if missing[1:] else ''}); models with it cannot be "
                            "run in torch")
        for n in self.nodes:
            if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in n.attributes.values()):
                raise UserError(f"the torch interpreter cannot run control flow ({n.op_type} node {n.name!r})")
        self._consts: dict[str, torch.Tensor] = {}
        produced = {v.name for n in self.nodes for v in n.outputs}
        self.external = []  # values read but not produced, that are not constants: to be fed
        seen = set()
        for n in self.nodes:
            for v in n.inputs:
                if v is None or v.name in produced or v.name in seen:
                    continue
                seen.add(v.name)
                if v.name not in self.params and v.const_value is None:
                    self.external.append(v.name)
        # last use of each value, to free intermediates early (memory of one block's activations)
        keep = set(self.outputs)
        self._last_use: dict[int, list[str]] = {}
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for v in n.inputs:
                if v is not None:
                    last[v.name] = i
        for name, i in last.items():
            if name not in keep and name in produced:
                self._last_use.setdefault(i, []).append(name)

    def constant(self, value: ir.Value) -> torch.Tensor:
        t = self._consts.get(value.name)
        if t is None:
            t = self._consts[value.name] = to_torch(value.const_value.numpy(), self.upcast)
        return t

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(feeds)
        for i, node in enumerate(self.nodes):
            xs = []
            for v in node.inputs:
                if v is None or v.name == "":
                    xs.append(None)
                elif v.name in env:
                    xs.append(env[v.name])
                elif v.name in self.params:
                    xs.append(self.params[v.name])
                elif v.const_value is not None:
                    xs.append(self.constant(v))
                else:
                    raise UserError(f"the torch interpreter was given no value for '{v.name}' (read by {node.op_type} "
                                    f"{node.name!r})")
            try:
                outs = self._run(node, xs)
            except UserError:
                raise
            except Exception as exc:
                raise RuntimeError(f"{node.op_type} node {node.name!r}: {exc}") from exc
            for v, t in zip(node.outputs, outs):
                if v is not None and v.name:
                    env[v.name] = t
            for name in self._last_use.get(i, ()):
                env.pop(name, None)
        missing = [o for o in self.outputs if o not in env]
        if missing:
            raise UserError(f"the torch interpreter computed no value '{missing[0]}' from the given nodes")
        return {o: formed(env[o]) for o in self.outputs}

    def _run(self, node: ir.Node, xs: list) -> list:
        """One node's outputs; a factored (LowRankSum) input stays factored where the op allows it, else is formed."""
        key = op_key(node)
        if any(isinstance(x, LowRankSum) for x in xs):
            slot = _LOW_RANK_INPUT.get(key)
            if slot is not None and isinstance(xs[slot], LowRankSum) and \
                    all(not isinstance(x, LowRankSum) for i, x in enumerate(xs) if i != slot):
                outs = LOW_RANK_OPS[key](node, xs, self)
                if outs is not None:
                    return outs
            xs = [formed(x) for x in xs]
        return OPS[key](node, xs, self)


def graph_function(model: ir.Model, params: dict[str, torch.Tensor] | None = None, upcast: bool = True,
                   outputs: Sequence[str] | None = None) -> TorchGraph:
    """The whole main graph of `model` as a `TorchGraph` fed by its input names."""
    names = list(outputs) if outputs is not None else [o.name for o in model.graph.outputs]
    return TorchGraph(list(model.graph), names, params, upcast)


def feeds_to_torch(feeds: dict[str, np.ndarray], upcast: bool = True) -> dict[str, torch.Tensor]:
    return {k: to_torch(v, upcast) for k, v in feeds.items()}


# ops that live in modules of their own register themselves into OPS on import
from modelsurgeon import onnx_torch_attention  # noqa: E402,F401
