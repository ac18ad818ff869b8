"""Cleanup passes remove what is dead or duplicated and keep outputs exactly."""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

import modelsurgeon
from modelsurgeon.runtime import run_model


def messy_model() -> ir.Model:
    """Duplicate weights, an Identity chain, a constant subgraph to fold, a dead branch, a DequantizeLinear."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    q = rng.integers(-8, 8, size=(8, 8)).astype(np.int8)
    inits = [onnx.numpy_helper.from_array(w, "W_a"), onnx.numpy_helper.from_array(w.copy(), "W_b"),
             onnx.numpy_helper.from_array(np.float32(2.0), "two"), onnx.numpy_helper.from_array(np.float32(3.0), "three"),
             onnx.numpy_helper.from_array(q, "Wq"), onnx.numpy_helper.from_array(np.float32(0.05), "s"),
             onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W_dead")]
    nodes = [
        helper.make_node("Identity", ["x"], ["x_id"]),
        helper.make_node("MatMul", ["x_id", "W_a"], ["a"]),
        helper.make_node("MatMul", ["x_id", "W_b"], ["b"]),
        helper.make_node("Mul", ["two", "three"], ["six"]),  # constant: folds to 6
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Mul", ["ab", "six"], ["ab6"]),
        helper.make_node("DequantizeLinear", ["Wq", "s"], ["Wdq"]),  # must stay quantized
        helper.make_node("MatMul", ["ab6", "Wdq"], ["c"]),
        helper.make_node("Identity", ["c"], ["y"]),
        helper.make_node("MatMul", ["x", "W_dead"], ["dead"]),
    ]
    g = helper.make_graph(nodes, "messy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))


def test_cleanup_removes_dead_duplicate_identity_and_folds_but_keeps_quantized_weights():
    model = messy_model()
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    ref = run_model(model, {"x": x})["y"]
    result = modelsurgeon.compile(model, "cleanup", cleanup=False)
    out = result.model
    ops = [n.op_type for n in out.graph]
    assert "Identity" not in ops
    assert ops.count("MatMul") == 3  # the dead MatMul is gone
    assert "DequantizeLinear" in ops  # not folded back to float
    inits = {k: v.const_value.numpy() for k, v in out.graph.initializers.items()}
    assert "W_dead" not in inits
    assert sum(1 for v in inits.values() if v.shape == (8, 8) and v.dtype == np.float32) == 1  # W_a/W_b stored once
    assert any(v.dtype == np.int8 for v in inits.values())
    assert [o.name for o in out.graph.outputs] == ["y"]
    np.testing.assert_allclose(run_model(out, {"x": x})["y"], ref, rtol=1e-6, atol=1e-6)
    row = result.report.rows[-1]
    assert row.modified and row.max_abs < 1e-5
    assert row.parameters < result.report.rows[0].parameters


def test_individual_cleanup_passes():
    r = modelsurgeon.compile(messy_model(), "dce", cleanup=False)
    assert "W_dead" not in r.model.graph.initializers and r.report.rows[-1].modified
    r = modelsurgeon.compile(messy_model(), "dedup", cleanup=False)
    assert r.report.rows[-1].notes["initializers_removed"] >= 1
    r = modelsurgeon.compile(messy_model(), "remove-identity", cleanup=False)
    assert "Identity" not in [n.op_type for n in r.model.graph]
    r = modelsurgeon.compile(messy_model(), "fold-constants", cleanup=False)
    assert "six" not in [o.name for n in r.model.graph for o in n.outputs if n.op_type == "Mul" and "two" in [i.name for i in n.inputs]]


def test_cleanup_folds_a_transposed_weight_and_deduplicates_it():
    """Folding Transpose(W) leaves a transposed (non-contiguous) array; deduplication must still hash it (it used
    to raise 'ndarray is not C-contiguous'), and an identical stored copy of W^T is then stored once."""
    w = np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(np.ascontiguousarray(w.T), "Wt_copy")]
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["a"]),
             helper.make_node("MatMul", ["x", "Wt_copy"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], inits)
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    expected = x @ w.T * 2
    result = modelsurgeon.compile(model, passes="cleanup", progress=False)
    assert [n.op_type for n in result.model.graph] == ["MatMul", "MatMul", "Add"]
    assert len(result.model.graph.initializers) == 1
    np.testing.assert_allclose(run_model(result.model, {"x": x})["y"], expected, rtol=1e-6)
