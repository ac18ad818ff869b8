"""The in-model ONNX function for `ai.modelsurgeon::SparseQuantMatMul`: the op's portable definition and fallback.

Every model that uses the op carries this FunctionProto (same domain and name), so it runs on any ONNX Runtime
(>= 1.17, opset >= 16) without our library: ORT inlines the function. With the library registered, ORT runs the
native kernel instead. The body is the format's executable specification (see sparse_quant_format.py):

1. codes: two 256-entry Gather tables turn each packed byte into its low and high code minus 8 (int8); the
   halves are concatenated -> q [nnz, block]; Cast, Sub and Mul give (u - 8 - z') * scale. With `scale_code` = 1
   the scales are uint8 codes c = s·128 + e·8 + m, decoded first as (-1)^s 2^(scale_exponent + e) (1 + m/8) (a
   Where on the attribute picks the decoded or the given scales: a function body has one set of nodes for every
   input type);
2. scatter: the tile of every kept tile-group comes from group_ptr (ScatterElements-add of ones at the tile
   starts, then CumSum), the column of slot j*T + c is tile*T + c; the groups are ScatterND'ed into a zero
   [N' * n_blocks, block] matrix (N' = N rounded up to whole tiles) -> W^T [N, K];
3. outliers are ScatterND-added into W^T, then Y = MatMul(A, W) + bias.

Optional inputs. A function cannot test whether an optional input was given (ONNX type inference rejects
`Optional` on an absent function input), so each optional input is read only where an op's own optional input
gives the neutral value when absent ("materializers"): zero_points and outlier_rows (little-endian uint16 as
bytes) are the zero points of a QuantizeLinear of zeros (0 when absent); bias and outlier_values are Gemm's C over
zero matrices (0). No DequantizeLinear: ORT's constant folding leaves it (and so everything after it) unfolded.
The number of outliers per column is the `outliers` attribute (default 0).

Everything but the MatMul depends only on initializers, so ORT constant-folds it once at session creation: the
fallback runs an fp32 MatMul over the decoded weight (exact dequantized math, like accuracy_level=0).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from modelsurgeon.runtime.sparse_quant_format import INPUT_NAMES, SparseQuantWeight, centered_code_tables

DOMAIN = "ai.modelsurgeon"
OP_NAME = "SparseQuantMatMul"
DOMAIN_VERSION = 1
MIN_OPSET = 16  # ScatterElements / ScatterND with reduction="add"
ATTRIBUTES = ("K", "N", "block", "bits", "accuracy_level")
DEFAULTS = {"outliers": 0, "tile": 1, "scale_code": 0, "scale_exponent": 0}  # attributes a node may leave out


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(array), name))


def _attr_const(name: str, attr: str) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name=attr))
    return node


def _fill(shape: str, out: str, dtype: int, value) -> onnx.NodeProto:
    return helper.make_node("ConstantOfShape", [shape], [out], value=helper.make_tensor(out + "_v", dtype, [1], [value]))


def function_proto(opset: int) -> onnx.FunctionProto:
    """The function for a model whose default-domain opset is `opset` (>= 16)."""
    if opset < MIN_OPSET:
        raise ValueError(f"SparseQuantMatMul's ONNX function needs opset >= {MIN_OPSET}, got {opset}")
    lo, hi = centered_code_tables()
    n = helper.make_node
    F, I64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [
        _const("lo_table", lo), _const("hi_table", hi),
        _attr_const("K_s", "K"), _attr_const("N_s", "N"), _attr_const("B_s", "block"), _attr_const("R_s", "outliers"),
        _attr_const("T_s", "tile"),
        _const("c0", np.array([0], np.int64)), _const("c1", np.array([1], np.int64)),
        _const("cm1", np.array([-1], np.int64)), _const("one_s", np.array(1, np.int64)),
        _const("two_1d", np.array([2], np.int64)), _const("byte_weights", np.array([[1.0], [256.0]], np.float32)),
        n("Reshape", ["K_s", "c1"], ["K_1d"]), n("Reshape", ["N_s", "c1"], ["N_1d"]),
        n("Reshape", ["B_s", "c1"], ["B_1d"]), n("Reshape", ["R_s", "c1"], ["R_1d"]),
        # 1. codes -> dequantized groups [slots = nnz * T, block]
        n("Cast", ["packed"], ["packed_i32"], to=TensorProto.INT32),
        n("Gather", ["lo_table", "packed_i32"], ["q_lo"]),
        n("Gather", ["hi_table", "packed_i32"], ["q_hi"]),
        n("Concat", ["q_lo", "q_hi"], ["q"], axis=1),
        n("Cast", ["scales"], ["scales_given"], to=F),
        #    8-bit scale codes c = s*128 + e*8 + m: (-1)^s 2^(E + e) (1 + m/8), used where scale_code = 1
        _attr_const("SC_s", "scale_code"), _attr_const("E_s", "scale_exponent"),
        _const("f128", np.array(128.0, np.float32)), _const("f8", np.array(8.0, np.float32)),
        _const("one_f", np.array(1.0, np.float32)), _const("two_f", np.array(2.0, np.float32)),
        n("Div", ["scales_given", "f128"], ["code_s128"]), n("Floor", ["code_s128"], ["code_s"]),   # sign bit
        n("Mul", ["code_s", "f128"], ["code_s_128"]), n("Sub", ["scales_given", "code_s_128"], ["code_em"]),
        n("Div", ["code_em", "f8"], ["code_em8"]), n("Floor", ["code_em8"], ["code_e"]),
        n("Mul", ["code_e", "f8"], ["code_e8"]), n("Sub", ["code_em", "code_e8"], ["code_m"]),
        n("Div", ["code_m", "f8"], ["code_m8"]), n("Add", ["one_f", "code_m8"], ["code_mant"]),
        n("Cast", ["E_s"], ["E_f"], to=F), n("Add", ["code_e", "E_f"], ["code_exp"]),
        n("Pow", ["two_f", "code_exp"], ["code_pow"]), n("Mul", ["code_pow", "code_mant"], ["code_mag"]),
        n("Mul", ["code_s", "two_f"], ["code_s2"]), n("Sub", ["one_f", "code_s2"], ["code_sign"]),  # 1 - 2s
        n("Mul", ["code_mag", "code_sign"], ["scales_decoded"]),
        n("Cast", ["SC_s"], ["SC_b"], to=TensorProto.BOOL),
        n("Where", ["SC_b", "scales_decoded", "scales_given"], ["scales_f32"]),
        #    (q - z') * scale in plain arithmetic: ORT's constant folding skips DequantizeLinear (kept for QDQ
        #    fusion), and everything downstream of an unfolded node would run on every call
        n("Shape", ["scales"], ["slots_1d"]),
        _fill("slots_1d", "zeros_slots", F, 0.0), _fill("slots_1d", "ones_slots", F, 1.0),
        n("QuantizeLinear", ["zeros_slots", "ones_slots", "zero_points"], ["zp_or_zero"], axis=0),
        n("Cast", ["zp_or_zero"], ["zp_f"], to=F),
        n("Cast", ["q"], ["q_f"], to=F),
        n("Unsqueeze", ["zp_f", "c1"], ["zp_col"]), n("Sub", ["q_f", "zp_col"], ["q_centered"]),
        n("Unsqueeze", ["scales_f32", "c1"], ["scale_col"]), n("Mul", ["q_centered", "scale_col"], ["groups"]),
        # 2. tile of every kept tile-group: ones added at ptr[1:tiles], cumulative sum
        n("Cast", ["group_ptr"], ["ptr"], to=I64),
        n("Slice", ["ptr", "c1", "cm1"], ["col_starts"]),
        n("Shape", ["group_index"], ["nnz_1d"]),
        n("Add", ["nnz_1d", "c1"], ["nnz1_1d"]),
        _fill("nnz1_1d", "marker0", I64, 0),
        n("Shape", ["col_starts"], ["starts_shape"]),
        _fill("starts_shape", "ones", I64, 1),
        n("ScatterElements", ["marker0", "col_starts", "ones"], ["marker"], axis=0, reduction="add"),
        n("CumSum", ["marker", "c0"], ["col_all"]),
        n("Slice", ["col_all", "c0", "nnz_1d"], ["tile_of"]),
        #    column of every slot: tile * T + c, and its block id
        n("Mul", ["tile_of", "T_s"], ["tile_base"]),
        n("Range", ["c0_s", "T_s", "one_s"], ["in_tile"]),
        n("Unsqueeze", ["tile_base", "c1"], ["tile_base_2d"]),
        n("Add", ["tile_base_2d", "in_tile"], ["col_2d"]),                # [nnz, T]
        n("Reshape", ["col_2d", "cm1"], ["col"]),
        n("Cast", ["group_index"], ["bid_j"], to=I64),
        n("Unsqueeze", ["bid_j", "c1"], ["bid_j_2d"]),
        n("Shape", ["col_2d"], ["col_2d_shape"]),
        n("Expand", ["bid_j_2d", "col_2d_shape"], ["bid_2d"]),
        n("Reshape", ["bid_2d", "cm1"], ["bid"]),
        #    flat row of each group in W^T viewed as [N' * n_blocks, block]
        n("Sub", ["B_s", "one_s"], ["B_m1"]), n("Add", ["K_s", "B_m1"], ["K_up"]), n("Div", ["K_up", "B_s"], ["NB_s"]),
        n("Sub", ["T_s", "one_s"], ["T_m1"]), n("Add", ["N_s", "T_m1"], ["N_up"]), n("Div", ["N_up", "T_s"], ["tiles_s"]),
        n("Mul", ["tiles_s", "T_s"], ["NP_s"]),
        n("Mul", ["col", "NB_s"], ["col_base"]),
        n("Add", ["col_base", "bid"], ["flat"]),
        n("Unsqueeze", ["flat", "c1"], ["flat_2d"]),
        n("Mul", ["NP_s", "NB_s"], ["rows_s"]), n("Reshape", ["rows_s", "c1"], ["rows_1d"]),
        n("Concat", ["rows_1d", "B_1d"], ["dense_shape"], axis=0),
        _fill("dense_shape", "dense0", F, 0.0),
        n("ScatterND", ["dense0", "flat_2d", "groups"], ["dense"]),
        n("Reshape", ["NP_s", "c1"], ["NP_1d"]),
        n("Concat", ["NP_1d", "cm1"], ["wt_shape"], axis=0),
        n("Reshape", ["dense", "wt_shape"], ["wt_padded"]),
        n("Concat", ["c0", "c0"], ["c00"], axis=0), n("Concat", ["N_1d", "K_1d"], ["nk_1d"], axis=0),
        n("Concat", ["c0", "c1"], ["c01"], axis=0),
        n("Slice", ["wt_padded", "c00", "nk_1d", "c01"], ["wt_groups"]),
        # 3. outliers (materialized: zeros when absent) added into W^T [N, K]
        n("Mul", ["N_1d", "R_1d"], ["NR_1d"]), n("Mul", ["NR_1d", "two_1d"], ["NR2_1d"]),
        _fill("NR2_1d", "zeros_nr2", F, 0.0), _fill("NR2_1d", "ones_nr2", F, 1.0),
        n("QuantizeLinear", ["zeros_nr2", "ones_nr2", "outlier_rows"], ["row_bytes_u8"], axis=0),
        n("Cast", ["row_bytes_u8"], ["row_bytes"], to=F),
        n("Concat", ["N_1d", "R_1d", "two_1d"], ["nr2_shape"], axis=0),
        n("Reshape", ["row_bytes", "nr2_shape"], ["row_bytes_3d"], allowzero=1),
        n("MatMul", ["row_bytes_3d", "byte_weights"], ["rows_f"]),
        n("Cast", ["rows_f"], ["rows_i"], to=I64),                       # [N, R, 1]
        n("Concat", ["N_1d", "c1"], ["n1_shape"], axis=0), _fill("n1_shape", "zeros_n1", F, 0.0),
        n("Concat", ["c1", "R_1d"], ["r1_shape"], axis=0), _fill("r1_shape", "zeros_1r", F, 0.0),
        n("Gemm", ["zeros_n1", "zeros_1r", "outlier_values"], ["values_nr"]),   # [N, R]
        n("Range", ["c0_s", "N_s", "one_s"], ["col_ids"]),
        n("Concat", ["N_1d", "c1", "c1"], ["n11_shape"], axis=0),
        n("Reshape", ["col_ids", "n11_shape"], ["col_ids_3d"]),
        n("Concat", ["N_1d", "R_1d", "c1"], ["nr1_shape"], axis=0),
        n("Expand", ["col_ids_3d", "nr1_shape"], ["cols_i"]),
        n("Concat", ["cols_i", "rows_i"], ["o_idx"], axis=2),            # [N, R, 2] = (n, row)
        n("ScatterND", ["wt_groups", "o_idx", "values_nr"], ["wt"], reduction="add"),
        n("Transpose", ["wt"], ["w"], perm=[1, 0]),
        n("MatMul", ["A", "w"], ["y_main"]),
        # bias (materialized)
        n("Concat", ["c1", "c1"], ["one_one"], axis=0), _fill("one_one", "zeros_11", F, 0.0),
        n("Concat", ["c1", "N_1d"], ["one_n"], axis=0), _fill("one_n", "zeros_1n", F, 0.0),
        n("Gemm", ["zeros_11", "zeros_1n", "bias"], ["bias_1n"]),
        n("Reshape", ["bias_1n", "cm1"], ["bias_n"]),
        n("Add", ["y_main", "bias_n"], ["Y"]),
    ]
    nodes.insert(0, _const("c0_s", np.array(0, np.int64)))
    defaults = [helper.make_attribute(k, v) for k, v in DEFAULTS.items()]
    return helper.make_function(DOMAIN, OP_NAME, list(INPUT_NAMES), ["Y"], nodes,
                                opset_imports=[helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES),
                                attribute_protos=defaults)


def model_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def ensure_function(model: ir.Model) -> None:
    """Give `model` the function (for its opset) and the domain import, once."""
    opset = model_opset(model)
    if opset < MIN_OPSET:
        raise ValueError(f"the model's opset {opset} is below {MIN_OPSET}; convert it first (onnx.version_converter)")
    model.opset_imports[DOMAIN] = DOMAIN_VERSION
    key = (DOMAIN, OP_NAME, "")
    if key not in model.functions:
        model.functions[key] = ir.serde.deserialize_function(function_proto(opset))


def make_node(A: ir.Value, weight: SparseQuantWeight, graph: ir.Graph, prefix: str, *, accuracy_level: int = 4,
              output_name: str | None = None) -> ir.Node:
    """A SparseQuantMatMul node reading `A`, with the weight's arrays registered as initializers of `graph`
    (absent optional inputs are left out). The caller inserts the node."""
    inputs: list[ir.Value | None] = [A]
    for key, array in weight.inputs().items():
        if array is None:
            inputs.append(None)
            continue
        value = ir.Value(name=f"{prefix}.{key}", const_value=ir.tensor(np.ascontiguousarray(array), name=f"{prefix}.{key}"))
        graph.register_initializer(value)
        inputs.append(value)
    while inputs and inputs[-1] is None:
        inputs.pop()
    node = ir.node(OP_NAME, inputs, domain=DOMAIN, name=prefix,
                   attributes={"K": weight.K, "N": weight.N, "block": weight.block, "bits": 4,
                               "accuracy_level": accuracy_level,
                               **({"outliers": weight.outliers_per_column} if weight.outliers_per_column else {}),
                               **({"tile": weight.tile} if weight.tile != 1 else {}),
                               **({"scale_code": 1, "scale_exponent": weight.scale_exponent} if weight.scale_codes else {})})
    node.outputs[0].name = output_name or f"{prefix}.out"
    node.outputs[0].dtype = ir.DataType.FLOAT
    return node


def single_op_model(weight: SparseQuantWeight, *, opset: int = 18, accuracy_level: int = 4,
                    leading: tuple = ("M",)) -> ir.Model:
    """A model `Y = SparseQuantMatMul(A)` with A [*leading, K] (tests and benchmarks)."""
    A = ir.Value(name="A", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([*leading, weight.K]))
    graph = ir.Graph([A], [], nodes=[], name="sqmm", opset_imports={"": opset})
    node = make_node(A, weight, graph, "sqmm", accuracy_level=accuracy_level, output_name="Y")
    graph.append(node)
    node.outputs[0].shape = ir.Shape([*leading, weight.N])
    graph.outputs.append(node.outputs[0])
    model = ir.Model(graph, ir_version=9 if opset <= 20 else 10, producer_name="modelsurgeon")
    ensure_function(model)
    return model
