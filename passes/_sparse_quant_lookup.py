"""An embedding lookup that reads a tied output head's sparse-quant codes, in standard ONNX ops.

A head tied to the embedding table computes h @ table^T, so spquant stores W = table^T [K = width, N = vocabulary]
and row t of the table is column t of W. ORT's quantized Gather (GatherBlockQuantized) reads only MatMulNBits'
layout, so without this the table is stored a second time (SmolLM2: 86 MiB instead of 67). When the head keeps
every group (no dropped groups, no outliers: spquant compresses a tied head that way), column t's groups are the
slots (t // T * n_blocks + g) * T + t % T for g = 0 .. n_blocks-1 (tile-groups are stored tile by tile in block
order; sparse_quant_format.py). The lookup gathers those slots' packed bytes, turns each byte into its two codes
minus 8 through two 256-entry float tables (low nibble: the group's first half of rows, high nibble: the second
half), subtracts the zero point if any, multiplies by the slot's scale (a 256-entry table decodes 8-bit scale
codes) and merges the groups into rows of width n_blocks * block (a Slice drops the last block's padding).

The result is the head's dequantized column, bit for bit what the op's ONNX function decodes. A lookup touches
one row per token (d values), so its cost is that of the Gather it replaces.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelsurgeon.passes import _quant_graph as G
from modelsurgeon.runtime.sparse_quant_format import (SparseQuantWeight, centered_code_tables,
                                                          decode_scale_codes)


def stores_every_column_whole(weight: SparseQuantWeight) -> bool:
    """Whether every column keeps all its groups, tile by tile in block order, and no outliers."""
    nb, tiles = weight.n_blocks, weight.n_tiles
    return (weight.outlier_rows is None and weight.nnz == nb * tiles
            and np.array_equal(weight.group_ptr, np.arange(tiles + 1) * nb)
            and np.array_equal(weight.group_index, np.tile(np.arange(nb), tiles)))


def replace_lookup(model: ir.Model, namer: G.Namer, gather: ir.Node, head: ir.Node, weight: SparseQuantWeight) -> bool:
    """Replace `gather` (a Gather of rows of the table tied to `head`, a SparseQuantMatMul storing `weight`) by a
    lookup of the head's codes. False (nothing changed) when the indices' rank is unknown or a column is not stored
    whole."""
    ids = gather.inputs[1]
    if ids is None or ids.shape is None or not stores_every_column_whole(weight):
        return False
    label = gather.name or gather.outputs[0].name
    T, nb, block = weight.tile, weight.n_blocks, weight.block
    nodes: list[ir.Node] = []

    def const(what: str, array) -> ir.Value:
        return G.add_initializer(model, namer, f"{label}_SQ_{what}", array)

    def op(op_type: str, inputs: list, what: str, **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes, name=namer(f"{label}_SQ_{what}"))
        node.outputs[0].name = namer(f"{gather.outputs[0].name}_SQ_{what}")
        nodes.append(node)
        return node.outputs[0]

    packed, scales = head.inputs[1], head.inputs[2]
    zero_points = head.inputs[3] if len(head.inputs) > 3 else None
    token = ids if ids.dtype == ir.DataType.INT64 else op("Cast", [ids], "ids", to=ir.DataType.INT64)
    tile = const("tile", np.array(T, np.int64))
    first = op("Add", [op("Mul", [op("Div", [token, tile], "tile_of"), const("tile_stride", np.array(nb * T, np.int64))],
                          "tile_start"), op("Mod", [token, tile], "column_in_tile")], "first_slot")
    slots = op("Add", [op("Unsqueeze", [first, const("last_axis", np.array([-1], np.int64))], "first_slot_1"),
                       const("group_offsets", np.arange(nb, dtype=np.int64) * T)], "slots")  # [..., nb]
    byte = op("Cast", [op("Gather", [packed, slots], "bytes")], "byte_index", to=ir.DataType.INT32)  # [..., nb, block/2]
    low, high = (table.astype(np.float32) for table in centered_code_tables())
    codes = op("Concat", [op("Gather", [const("low_codes", low), byte], "low"),
                          op("Gather", [const("high_codes", high), byte], "high")], "codes", axis=-1)
    if zero_points is not None:
        zp = op("Cast", [op("Gather", [zero_points, slots], "zero_points")], "zero_points_float", to=ir.DataType.FLOAT)
        codes = op("Sub", [codes, op("Unsqueeze", [zp, const("zp_axis", np.array([-1], np.int64))], "zp_1")], "centered")
    scale = op("Gather", [scales, slots], "scale_codes")
    if weight.scale_codes:
        table = decode_scale_codes(np.arange(256), weight.scale_exponent)
        scale = op("Gather", [const("scale_table", table), op("Cast", [scale], "scale_index", to=ir.DataType.INT32)],
                   "scales")
    elif weight.scales.dtype != np.float32:
        scale = op("Cast", [scale], "scales", to=ir.DataType.FLOAT)
    values = op("Mul", [codes, op("Unsqueeze", [scale, const("scale_axis", np.array([-1], np.int64))], "scales_1")],
                "values")  # [..., nb, block]
    row = op("Reshape", [values, const("row_shape", np.array([0] * len(ids.shape) + [nb * block], np.int64))], "rows")
    if nb * block != weight.K:
        row = op("Slice", [row, const("start", np.array([0], np.int64)), const("end", np.array([weight.K], np.int64)),
                           const("axis", np.array([-1], np.int64))], "unpadded")
    G.replace(model, [gather], gather.outputs[0], nodes, row)
    return True
