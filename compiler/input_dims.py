"""Sizes of the input dimensions a graph leaves symbolic but its weights fix.

Made-up inputs (calibration and verification without `--calib`, the typing run, benchmarks) bind a symbolic
dimension to the number of samples (axis 0), to 0 (a KV cache's past axis, `calibration.empty_past_dims`) or to a
sequence length. That is right for token axes, not for a dimension the weights decide: ONNX Runtime GenAI's KV
cache declares its head size `kv_cache_dim`, Optimum's ViT declares `pixel_values` as [batch_size, num_channels,
height, width]. `fixed_dims(model)` finds those sizes, first source first:

1. shapes the caller gave (`--input-shape pixel_values=1,3,224,224`, `compile(input_shapes=...)`), kept in
   `model.meta[INPUT_SHAPES]` (`set_input_shapes` checks them against the signature);
2. the graph: an input read as the data of a Conv has the weight's input channels; a Conv patch embedding whose
   tokens meet a fixed position table (ViT) has the square image that makes that many patches; a KV-cache input
   read by GroupQueryAttention, MultiHeadAttention or Attention has the op's head size and KV heads;
3. the model's folder (`model.meta[SOURCE_PATH]`, set when a file is loaded, else the folder of its external data):
   `genai_config.json` (head_size, num_key_value_heads), `config.json` (head_dim or hidden_size /
   num_attention_heads, num_key_value_heads; num_channels, image_size) and `preprocessor_config.json`
   (crop_size or size).

A size found for a named dimension holds for every input axis of that name. What is left symbolic is listed by
`guessed_dims`, which the refusal of a model that does not run on made-up inputs names. It cannot read sizes a
graph fixes in any other way (a Reshape to a constant shape, a Gemm after a Flatten): give those with
`--input-shape`.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Iterable

import onnx_ir as ir

from modelsurgeon.errors import UserError

INPUT_SHAPES = "modelsurgeon.input_shapes"  # model.meta: {input name: tuple of sizes}, given by the caller
SOURCE_PATH = "modelsurgeon.source_path"  # model.meta: the file the model was loaded from

# A KV-cache input (past_key_values.0.key, past_key_0, past.0.value, cache.1.key ...): [batch, heads, past, head_dim]
KV_CACHE = re.compile(r"(^|[._/])(past|cache)([._/\d]|_key|_value|$)", re.IGNORECASE)

Sizes = dict[str, dict[int, int]]  # {input name: {axis: size}}


def _inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if v.name not in model.graph.initializers and v.shape is not None]


def _symbolic(value: ir.Value, axis: int) -> str | None:
    """The name of axis `axis` of `value` when it is symbolic ('' for an unnamed one), else None."""
    d = value.shape[axis]
    if isinstance(d, int):
        return None
    return str(d) if d is not None and str(d) and str(d) != "None" else ""


def set_input_shapes(model: ir.Model, shapes: dict[str, Iterable[int]] | None) -> None:
    """Check the caller's input shapes against the signature and keep them in `model.meta[INPUT_SHAPES]`."""
    if not shapes:
        return
    inputs = {v.name: v for v in _inputs(model)}
    kept = {}
    for name, dims in shapes.items():
        dims = tuple(int(d) for d in dims)
        if name not in inputs:
            raise UserError(f"--input-shape names '{name}', which is not an input of the model; its inputs are "
                            f"{', '.join(inputs) or 'none'}")
        value = inputs[name]
        want = tuple(d if isinstance(d, int) else str(d) for d in value.shape)
        if len(dims) != len(want):
            raise UserError(f"--input-shape {name}={','.join(map(str, dims))} has {len(dims)} dimensions; the model "
                            f"declares {len(want)} {list(want)}")
        for i, (got, decl) in enumerate(zip(dims, want)):
            if got < 0 or isinstance(decl, int) and got != decl and i > 0:
                raise UserError(f"--input-shape {name}={','.join(map(str, dims))}: dimension {i} must be "
                                f"{decl if isinstance(decl, int) else 'a size of 0 or more'} (the model declares "
                                f"{list(want)})")
        kept[name] = dims
    model.meta[INPUT_SHAPES] = kept


def fixed_dims(model: ir.Model) -> Sizes:
    """{input name: {axis: size}} for the symbolic axes the caller, the graph or the model's folder fix."""
    inputs = _inputs(model)
    out: Sizes = {}
    named: dict[str, int] = {}

    def put(found: Sizes) -> None:
        for name, axes in found.items():
            value = next((v for v in inputs if v.name == name), None)
            for axis, size in axes.items():
                if value is None or axis >= len(value.shape) or out.get(name, {}).get(axis) is not None:
                    continue
                dim = _symbolic(value, axis)
                if dim is None:
                    continue
                out.setdefault(name, {})[axis] = int(size)
                if dim:
                    named.setdefault(dim, int(size))

    given = model.meta.get(INPUT_SHAPES) or {}
    # the sample axis (a symbolic axis 0) is chosen by calibration and verification, not by a given shape
    put({name: {i: d for i, d in enumerate(dims) if i > 0} for name, dims in given.items()})
    put(_from_graph(model, inputs))
    put(_from_folder(model, inputs))
    for value in inputs:  # a size found for a named dimension holds for every axis of that name (but sample axes)
        for axis in range(1, len(value.shape)):
            dim = _symbolic(value, axis)
            if dim and dim in named and axis not in out.get(value.name, {}):
                out.setdefault(value.name, {})[axis] = named[dim]
    return out


def guessed_dims(model: ir.Model, empty: set[str] = frozenset()) -> list[str]:
    """'input: dim' for the symbolic axes past the first of float inputs (images, features, KV caches) that nothing
    fixes, so made-up inputs guess their size; a KV cache's past axis (`empty`) is 0 by design, and the symbolic
    axes of integer inputs (token ids, masks) are sequence lengths, which any size fits."""
    fixed = fixed_dims(model)
    out = []
    for value in _inputs(model):
        if value.dtype is None or not value.dtype.is_floating_point():
            continue
        for axis in range(1, len(value.shape)):
            dim = _symbolic(value, axis)
            if dim is not None and dim not in empty and axis not in fixed.get(value.name, {}):
                out.append(f"{value.name}: {dim or f'axis {axis}'}")
    return out


def input_shape_example(model: ir.Model, name: str) -> str:
    """`NAME=1,3,H,W` for --input-shape: the input's declared and fixed sizes, 1 for a symbolic first axis, the
    names of the other symbolic axes in capitals (D2 for an unnamed axis 2)."""
    value = next(v for v in _inputs(model) if v.name == name)
    fixed = fixed_dims(model).get(name, {})
    dims = []
    for axis in range(len(value.shape)):
        dim = _symbolic(value, axis)
        if dim is None:
            dims.append(str(value.shape[axis]))
        elif axis in fixed:
            dims.append(str(fixed[axis]))
        else:
            dims.append("1" if axis == 0 else re.sub(r"\W", "", dim).upper() or f"D{axis}")
    return f"{name}={','.join(dims)}"


# ------------------------------------------------------------------------------------------------ the graph

_PASS_THROUGH = ("Cast", "Identity")


def _readers(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """(node, input index) of the nodes reading `value`, looking through Cast and Identity."""
    out, frontier, seen = [], [value], set()
    while frontier:
        v = frontier.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for node, idx in v.uses():
            if node.op_type in _PASS_THROUGH and node.domain in ("", "ai.onnx"):
                frontier.extend(node.outputs)
            else:
                out.append((node, idx))
    return out


def _const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    tensor = value.const_value if value.const_value is not None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else tuple(int(d) for d in tensor.shape)


def _weight_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of a constant weight, also behind the DequantizeLinear or Cast a quantizing pass puts before it."""
    shape = _const_shape(value)
    node = value.producer() if value is not None and shape is None else None
    if node is not None and node.op_type in ("DequantizeLinear", "Cast") and node.inputs:
        return _weight_shape(node.inputs[0])
    return shape


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _last_dim(value: ir.Value | None, depth: int = 0) -> int | None:
    """The size of the last axis of an activation: declared, or read off the op that makes it from a constant
    weight (MatMul, Gemm, MatMulNBits, a bias Add), through casts."""
    if value is None or depth > 8:
        return None
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return int(value.shape[-1])
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "MatMulNBits":
        return int(_attr(node, "N"))
    if node.op_type in ("MatMul", "FusedMatMul") and len(node.inputs) > 1:
        w = _weight_shape(node.inputs[1])
        if w is not None and len(w) >= 2:
            return w[-1]
    if node.op_type == "Gemm" and len(node.inputs) > 1:
        w = _weight_shape(node.inputs[1])
        if w is not None and len(w) == 2:
            return w[0] if _attr(node, "transB", 0) else w[1]
    if node.op_type in ("Add", "Sub", "Mul", "Div", *_PASS_THROUGH):
        for v in node.inputs:
            if _const_shape(v) is None:
                found = _last_dim(v, depth + 1)
                if found is not None:
                    return found
    return None


def _from_graph(model: ir.Model, inputs: list[ir.Value]) -> Sizes:
    found: Sizes = {}
    for value in inputs:
        for node, idx in _readers(value):
            sizes = _conv_input(node, idx, value) or _kv_cache(node, idx, value)
            for axis, size in (sizes or {}).items():
                found.setdefault(value.name, {}).setdefault(axis, size)
    return found


def _conv_input(node: ir.Node, idx: int, value: ir.Value) -> dict[int, int] | None:
    """Channels of a Conv's data input (weight [M, C/group, k...]), and the image size of a ViT patch embedding."""
    if node.op_type != "Conv" or idx != 0 or node.domain not in ("", "ai.onnx"):
        return None
    w = _const_shape(node.inputs[1] if len(node.inputs) > 1 else None)
    if w is None or len(w) != len(value.shape):
        return None
    sizes = {1: w[1] * int(_attr(node, "group", 1))}
    side = _patch_grid_side(node, w)
    if side is not None:
        sizes.update({axis: side for axis in range(2, len(w))})
    return sizes


def _patch_grid_side(conv: ir.Node, w: tuple[int, ...]) -> int | None:
    """The image side for which a 2-D patch embedding (ViT: Conv -> flatten -> transpose -> concat with class
    tokens -> add a constant position table [1, tokens, hidden]) makes as many tokens as the table has rows:
    tokens = extra + g * g patches, the side (g - 1) * stride + kernel - pads. Square images only."""
    if len(w) != 4 or any(d != 1 for d in _attr(conv, "dilations", [1, 1])):
        return None
    strides, kernel = list(_attr(conv, "strides", [1, 1])), list(w[2:])
    pads = list(_attr(conv, "pads", [0, 0, 0, 0]))
    if strides[0] != strides[1] or kernel[0] != kernel[1] or pads[0] + pads[2] != pads[1] + pads[3]:
        return None
    value, extra = conv.outputs[0], 0
    for _ in range(8):
        users = [(n, i) for n, i in value.uses() if n.op_type != "Shape"]  # Shape: the exporter's batch size
        if len(users) != 1:
            return None
        node, idx = users[0]
        if node.op_type == "Concat":
            axis = int(_attr(node, "axis", 0))
            for i, other in enumerate(node.inputs):
                if i == idx:
                    continue
                size = _token_count(other, axis)
                if size is None:
                    return None
                extra += size
        elif node.op_type == "Add":
            table = next((_const_shape(v) for v in node.inputs if v is not value and _const_shape(v) is not None), None)
            if table is None or len(table) < 2:
                return None
            g = math.isqrt(max(table[-2] - extra, 0))
            if g < 1 or g * g != table[-2] - extra:
                return None
            return (g - 1) * strides[0] + kernel[0] - pads[0] - pads[2]
        elif node.op_type not in ("Reshape", "Flatten", "Transpose"):
            return None
        value = node.outputs[0]
    return None


def _token_count(value: ir.Value | None, axis: int) -> int | None:
    """Rows a class or distillation token adds along the concatenation axis: a constant's, or that of the constant
    an Expand broadcasts over the batch."""
    shape = _const_shape(value)
    if shape is None and value is not None and value.producer() is not None and value.producer().op_type == "Expand":
        shape = _const_shape(value.producer().inputs[0])
    return None if shape is None or axis >= len(shape) else shape[axis]


def _kv_cache(node: ir.Node, idx: int, value: ir.Value) -> dict[int, int] | None:
    """Heads (axis 1) and head size (axis 3) of a KV-cache input [batch, kv_heads, past, head_size] read by an
    attention op: GroupQueryAttention (past_key/value: inputs 3, 4; a packed qkv query when inputs 1 and 2 are
    empty), MultiHeadAttention (6, 7) or ONNX Attention (4, 5; a 3-D query)."""
    if len(value.shape) != 4 or not KV_CACHE.search(value.name):
        return None
    op = (node.domain or "", node.op_type)
    query = node.inputs[0] if node.inputs else None
    if op == ("com.microsoft", "GroupQueryAttention") and idx in (3, 4):
        heads, kv_heads = int(_attr(node, "num_heads", 0)), int(_attr(node, "kv_num_heads", 0))
        packed = all(len(node.inputs) <= i or node.inputs[i] is None for i in (1, 2))
        parts = heads + 2 * kv_heads if packed else heads
    elif op == ("com.microsoft", "MultiHeadAttention") and idx in (6, 7):
        heads = kv_heads = parts = int(_attr(node, "num_heads", 0))
    elif op in (("", "Attention"), ("ai.onnx", "Attention")) and idx in (4, 5):
        heads, kv_heads = int(_attr(node, "q_num_heads", 0)), int(_attr(node, "kv_num_heads", 0))
        parts = heads
    else:
        return None
    width = _last_dim(query)
    sizes = {1: kv_heads} if kv_heads else {}
    if width and parts and width % parts == 0:
        sizes[3] = width // parts
    return sizes or None


# ------------------------------------------------------------------------------------------------ the folder

def model_folder(model: ir.Model) -> pathlib.Path | None:
    """The folder the model was loaded from, else the folder of its external data."""
    source = model.meta.get(SOURCE_PATH)
    if source:
        return pathlib.Path(source).parent
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.base_dir:
            return pathlib.Path(tensor.base_dir)
    return None


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _side(value) -> tuple[int, int] | None:
    """(height, width) of an image size as configs write it: 224, [224, 224], {"height": .., "width": ..},
    {"shortest_edge": 224}."""
    if isinstance(value, int) and value > 0:
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, dict):
        if isinstance(value.get("height"), int) and isinstance(value.get("width"), int):
            return value["height"], value["width"]
        if isinstance(value.get("shortest_edge"), int):
            return value["shortest_edge"], value["shortest_edge"]
    return None


def _from_folder(model: ir.Model, inputs: list[ir.Value]) -> Sizes:
    folder = model_folder(model)
    if folder is None or not folder.is_dir():
        return {}
    genai = _read_json(folder / "genai_config.json").get("model", {}).get("decoder", {})
    config = _read_json(folder / "config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else config
    pre = _read_json(folder / "preprocessor_config.json")

    head = genai.get("head_size") or text.get("head_dim")
    if not head and text.get("hidden_size") and text.get("num_attention_heads"):
        head = text["hidden_size"] // text["num_attention_heads"]
    kv_heads = genai.get("num_key_value_heads") or text.get("num_key_value_heads")
    channels = vision.get("num_channels")
    image = (_side(pre.get("crop_size")) if pre.get("do_center_crop") else None) or _side(pre.get("size")) \
        or _side(vision.get("image_size"))

    found: Sizes = {}
    for value in inputs:
        rank = len(value.shape)
        sizes: dict[int, int] = {}
        if rank == 4 and KV_CACHE.search(value.name):
            if isinstance(kv_heads, int):
                sizes[1] = kv_heads
            if isinstance(head, int):
                sizes[3] = head
        elif rank == 4 and value.dtype is not None and value.dtype.is_floating_point():  # an image, NCHW
            if isinstance(channels, int):
                sizes[1] = channels
            if image is not None:
                sizes[2], sizes[3] = image
        if sizes:
            found[value.name] = sizes
    return found
