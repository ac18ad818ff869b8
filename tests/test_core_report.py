"""Report numbers: parameters, bytes, MACs per op kind, and the JSON form."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import modelsurgeon
from modelsurgeon.stats import count_parameters, estimate_macs, file_bytes


def conv_gemm_model() -> ir.Model:
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [onnx.numpy_helper.from_array(f(16, 3, 3, 3), "cw"), onnx.numpy_helper.from_array(f(16), "cb"),
             onnx.numpy_helper.from_array(f(16, 1, 3, 3), "dw"),
             onnx.numpy_helper.from_array(f(10, 16), "gw"), onnx.numpy_helper.from_array(f(10), "gb")]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c", "dw"], ["d"], group=16, pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["d"], ["p"]),
             helper.make_node("Flatten", ["p"], ["fl"]),
             helper.make_node("Gemm", ["fl", "gw", "gb"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


def test_macs_parameters_bytes():
    model = conv_gemm_model()
    feeds = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    conv = 16 * 8 * 8 * 3 * 3 * 3
    depthwise = 16 * 8 * 8 * 1 * 3 * 3
    gemm = 10 * 16
    assert estimate_macs(model, feeds) == conv + depthwise + gemm
    assert count_parameters(model) == 16 * 27 + 16 + 16 * 9 + 160 + 10
    size = len(ir.serde.serialize_model(model).SerializeToString())
    assert abs(file_bytes(model) - size) < 64


def test_report_table_and_json(tmp_path):
    result = modelsurgeon.compile(conv_gemm_model(), "dce")
    table = result.report.table()
    assert "(input)" in table and "dce" in table and "cleanup" in table and "MACs" in table
    path = tmp_path / "r.json"
    result.report.write_json(path)
    data = json.loads(path.read_text())
    assert [p["name"] for p in data["passes"]] == ["(input)", "dce", "cleanup"]
    assert data["summary"]["macs"][0] == 16 * 64 * 27 + 16 * 64 * 9 + 160
    assert data["passes"][-1]["max_abs"] == pytest.approx(0.0, abs=1e-6)
