"""Graphs from other exporters: no value_info for intermediate values (onnx.helper, Optimum), and ONNX Runtime's
own operators (ONNX Runtime GenAI's builder). Every value is typed before each pass (compiler/value_types.py),
and the checker and shape inference know ONNX Runtime's schemas (compiler/ort_schemas.py)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import modelsurgeon
from modelsurgeon import quantize as Q
from modelsurgeon import value_types
from modelsurgeon.errors import UserError
from modelsurgeon.runtime.session import run_model
from modelsurgeon.verify import structural_problems

logging.getLogger("modelsurgeon").setLevel(logging.ERROR)
H, HEADS, KV_HEADS, HEAD, FFN, MAX_POS = 64, 4, 2, 16, 128, 64


def _weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    return lambda *shape: rng.normal(0, 0.1, shape).astype(np.float32)


def _save(graph: onnx.GraphProto, path, opsets: dict[str, int]) -> str:
    ir_version = 10 if opsets[""] >= 21 else 8
    model = helper.make_model(graph, ir_version=ir_version,
                              opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    onnx.save(model, path)
    return str(path)


def helper_block(path, opset: int) -> str:
    """LayerNorm -> MatMul + bias -> Relu -> MatMul -> residual Add, as onnx.helper builds it: no value_info."""
    w = _weights()
    inits = [numpy_helper.from_array(a, n) for n, a in
             [("W1", w(H, FFN)), ("b1", w(FFN)), ("W2", w(FFN, H)), ("g", 1 + w(H)), ("b", w(H))]]
    mk = helper.make_node
    nodes = [mk("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1), mk("MatMul", ["n", "W1"], ["h"]),
             mk("Add", ["h", "b1"], ["hb"]), mk("Relu", ["hb"], ["r"]), mk("MatMul", ["r", "W2"], ["o"]),
             mk("Add", ["o", "x"], ["y"])]
    graph = helper.make_graph(nodes, "helper", [helper.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", H])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, ["batch", "seq", H])], inits)
    assert not graph.value_info
    return _save(graph, path, {"": opset})


def genai_block(path, opset: int = 22) -> str:
    """A decoder block as ONNX Runtime GenAI's builder writes it: SimplifiedLayerNormalization (ONNX domain),
    RotaryEmbedding, GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits and FastGelu
    (com.microsoft), float MatMuls for q/k/v/o and the down projection; no value_info."""
    w = _weights(1)
    ang = np.arange(MAX_POS)[:, None] / 10000 ** (np.arange(0, HEAD, 2) / HEAD)[None]
    up = Q.quantize_rtn(w(H, FFN), 4, 32, False)
    up_b, up_s, up_z = Q.pack_matmulnbits(up)
    arrays = {"ln1": 1 + w(H), "wq": w(H, HEADS * HEAD), "wk": w(H, KV_HEADS * HEAD), "wv": w(H, KV_HEADS * HEAD),
              "wo": w(HEADS * HEAD, H), "ln2": 1 + w(H), "up_q": up_b, "up_s": up_s.astype(np.float32), "up_z": up_z,
              "down": w(FFN, H), "ln3": 1 + w(H), "cos": np.cos(ang).astype(np.float32),
              "sin": np.sin(ang).astype(np.float32), "one": np.array(1, np.int64), "axis1": np.array([1], np.int64)}
    ms, mk = "com.microsoft", helper.make_node
    nodes = [
        mk("ReduceSum", ["attention_mask", "axis1"], ["mask_sum"], keepdims=0),
        mk("Sub", ["mask_sum", "one"], ["seqlens_k64"]), mk("Cast", ["seqlens_k64"], ["seqlens_k"], to=TP.INT32),
        mk("Shape", ["attention_mask"], ["mask_shape"]), mk("Gather", ["mask_shape", "one"], ["total64"], axis=0),
        mk("Cast", ["total64"], ["total_seq"], to=TP.INT32),
        mk("SimplifiedLayerNormalization", ["x", "ln1"], ["n1"], epsilon=1e-5, axis=-1),
        mk("MatMul", ["n1", "wq"], ["q"]), mk("MatMul", ["n1", "wk"], ["k"]), mk("MatMul", ["n1", "wv"], ["v"]),
        mk("RotaryEmbedding", ["q", "position_ids", "cos", "sin"], ["q_rot"], domain=ms, num_heads=HEADS),
        mk("RotaryEmbedding", ["k", "position_ids", "cos", "sin"], ["k_rot"], domain=ms, num_heads=KV_HEADS),
        mk("GroupQueryAttention", ["q_rot", "k_rot", "v", "", "", "seqlens_k", "total_seq"],
           ["attn", "present_key", "present_value"], domain=ms, num_heads=HEADS, kv_num_heads=KV_HEADS),
        mk("MatMul", ["attn", "wo"], ["o"]),
        mk("SkipSimplifiedLayerNormalization", ["o", "x", "ln2"], ["n2", "", "", "res"], domain=ms, epsilon=1e-5),
        mk("MatMulNBits", ["n2", "up_q", "up_s", "up_z"], ["up"], domain=ms, K=H, N=FFN, bits=4, block_size=32),
        mk("FastGelu", ["up"], ["act"], domain=ms),
        mk("MatMul", ["act", "down"], ["mlp"]),
        mk("SkipSimplifiedLayerNormalization", ["mlp", "res", "ln3"], ["y"], domain=ms, epsilon=1e-5),
    ]
    inputs = [helper.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", H]),
              helper.make_tensor_value_info("attention_mask", TP.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("position_ids", TP.INT64, ["batch", "seq"])]
    graph = helper.make_graph(nodes, "genai", inputs, [helper.make_tensor_value_info("y", TP.FLOAT, ["batch", "seq", H])],
                              [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    return _save(graph, path, {"": opset, ms: 1})


def _genai_feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(5).normal(size=(2, 7, H)).astype(np.float32),
            "attention_mask": np.ones((2, 7), np.int64), "position_ids": np.tile(np.arange(7), (2, 1))}


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.float64(a) - b) / np.linalg.norm(np.float64(b)))


# ---------------------------------------------------------------------------------------------------------------
# graphs without value_info


@pytest.mark.parametrize("opset", [17, 19, 21, 23])
def test_helper_graph_compiles_with_calibrated_and_qdq_quantization(tmp_path, opset):
    """Used to fail with 'Model input (n) does not have type information' (gptq: its layer-by-layer runner feeds
    untyped values to ORT) and, at opset 17, a ValueError (format=qdq converted the graph after collecting its
    layers)."""
    path = helper_block(tmp_path / "m.onnx", opset)
    for passes in ("quant4(algo=gptq)", "quant4(format=qdq)"):
        result = modelsurgeon.compile(path, passes, progress=False)
        assert result.report.verified and result.report.final.rel_l2 < 0.15, passes
        assert result.report.rows[1].notes["layers_4bit"] == 2, passes
    assert result.model.opset_imports[""] == max(opset, 21)


def test_weights_listed_as_inputs_are_constants(tmp_path):
    """IR-3 graphs list every initializer as a graph input too (a default a caller could override), so the
    quantizers left those layers alone; the compile drops weights from the inputs (IR 4) and quantizes them, and the
    compiled model's inputs are the ones a caller feeds."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=(8,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "ir3",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["n", 16]), helper.make_tensor_value_info("w", TP.FLOAT, [16, 8]),
         helper.make_tensor_value_info("b", TP.FLOAT, [8])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["n", 8])], initializer=[w, b])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    path = tmp_path / "ir3.onnx"
    onnx.save(proto, path)
    result = modelsurgeon.compile(str(path), "quant8", progress=False)
    out = onnx.load(result.save(tmp_path / "q.onnx"))
    assert [i.name for i in out.graph.input] == ["x"] and out.ir_version >= 4
    assert result.report.rows[1].notes["layers"] == 1
    assert any(i.data_type == TP.INT8 for i in out.graph.initializer)


def test_helper_graph_spquant(tmp_path):
    path = helper_block(tmp_path / "m.onnx", 21)
    result = modelsurgeon.compile(path, "spquant", progress=False)
    assert result.report.rows[1].notes["layers_sparse"] == 2 and result.report.final.rel_l2 < 0.6


def _stripped(reference_onnx, tmp_path, kind: str, opset: int) -> tuple[str, onnx.ModelProto]:
    original = onnx.load(reference_onnx(kind, opset))
    stripped = onnx.ModelProto()
    stripped.CopyFrom(original)
    del stripped.graph.value_info[:]
    path = tmp_path / f"{kind}{opset}.onnx"
    onnx.save(stripped, path)
    return str(path), original


def test_complete_types_restores_what_the_exporter_declared(reference_onnx, tmp_path):
    path, original = _stripped(reference_onnx, tmp_path, "llama", 18)
    model = ir.load(path)
    assert any(v.dtype is None for n in model.graph for v in n.outputs)
    result = value_types.complete_types(model)
    assert result.modified and result.observed == 0 and result.untyped == []
    assert value_types.incomplete(model) == []
    declared = {vi.name: vi for vi in original.graph.value_info}
    values = {v.name: v for n in model.graph for v in n.outputs}
    for name, vi in declared.items():
        if name not in values:  # value_info of initializers
            continue
        assert int(values[name].dtype) == vi.type.tensor_type.elem_type, name
        assert len(values[name].shape) == len(vi.type.tensor_type.shape.dim), name
    assert not value_types.complete_types(model).modified  # nothing left to do


def test_inferred_shapes_follow_a_rewrite(tmp_path):
    """A pass that narrows a layer updates the shapes it knows of; the ones inferred here are inferred again."""
    model = ir.load(helper_block(tmp_path / "m.onnx", 21))
    value_types.complete_types(model)
    values = {v.name: v for n in model.graph for v in n.outputs}
    assert str(values["r"].shape) == "[batch,seq,128]"
    for name, array in (("W1", _weights()(H, 96)), ("b1", _weights()(96)), ("W2", _weights()(96, H))):
        model.graph.initializers[name].const_value = ir.tensor(array, name=name)
        model.graph.initializers[name].shape = ir.Shape(array.shape)
    assert value_types.complete_types(model).inferred == 3  # h, hb, r
    assert str(values["r"].shape) == "[batch,seq,96]" and structural_problems(model) == []


def test_an_ort_run_types_what_shape_inference_cannot(reference_onnx, tmp_path, monkeypatch):
    path, _ = _stripped(reference_onnx, tmp_path, "llama", 18)
    model = ir.load(path)
    monkeypatch.setattr(value_types, "_from_shape_inference", lambda model, missing, previous: 0)
    result = value_types.complete_types(model)
    outputs = [v for n in model.graph for v in n.outputs]
    assert result.observed == sum(1 for v in outputs if not v.is_graph_output()) and result.untyped == []
    assert all(v.dtype is not None and v.shape is not None for v in outputs)
    assert {v.dtype for v in outputs} >= {ir.DataType.FLOAT, ir.DataType.INT64}


def test_stripped_exports_find_their_blocks_and_quantize(reference_onnx, tmp_path):
    """Used to fail with: fold-norms 'no transformer blocks were found' (llama, opset 18), and a SerdeError from
    AWQ's inserted Mul copying an untyped input's type (bert, opset 23)."""
    llama, _ = _stripped(reference_onnx, tmp_path, "llama", 18)
    folded = modelsurgeon.compile(llama, "fold-norms", progress=False)
    assert folded.report.rows[1].modified and folded.report.final.rel_l2 < 1e-4
    bert, _ = _stripped(reference_onnx, tmp_path, "bert", 23)
    awq = modelsurgeon.compile(bert, "quant4(algo=awq)", progress=False)
    assert awq.report.verified and awq.report.final.rel_l2 < 0.15


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime's operators


@pytest.mark.parametrize("opset", [21, 22])
def test_genai_graph_passes_the_structural_checks(tmp_path, opset):
    """Used to fail with 'ONNX checker: No Op registered for SimplifiedLayerNormalization with domain_version of 22'."""
    model = ir.load(genai_block(tmp_path / "m.onnx", opset))
    assert structural_problems(model) == []
    value_types.complete_types(model)
    shapes = {v.name: v.shape for n in model.graph for v in n.outputs}
    assert str(shapes["n1"]) == str(shapes["attn"]) == str(shapes["y"]) == "[batch,seq,64]"
    assert str(shapes["up"]) == "[batch,seq,128]"


def test_contrib_nodes_are_still_validated(tmp_path):
    proto = onnx.load(genai_block(tmp_path / "m.onnx"))
    nbits = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
    nbits.attribute.remove(next(a for a in nbits.attribute if a.name == "N"))
    problems = structural_problems(ir.from_proto(proto))
    assert problems == ["ONNX checker: Required attribute 'N' is missing (MatMulNBits node)"]


def test_genai_graph_cleans_up_and_quantizes(tmp_path):
    path = genai_block(tmp_path / "m.onnx")
    feeds = _genai_feeds()
    expected = run_model(ir.load(path), feeds)["y"]
    cleaned = modelsurgeon.compile(path, "cleanup", progress=False)
    np.testing.assert_allclose(run_model(cleaned.model, feeds)["y"], expected, rtol=1e-5, atol=1e-5)
    for passes in ("quant8", "quant4(algo=gptq)"):
        try:
            result = modelsurgeon.compile(path, passes, progress=False)
        except UserError as exc:  # refusing is allowed, in one line naming the op
            assert "\n" not in str(exc) and any(op in str(exc) for op in ("GroupQueryAttention", "RotaryEmbedding"))
            continue
        assert result.report.verified, passes
        assert _rel(run_model(result.model, feeds, accuracy_level=0)["y"], expected) < 0.1, passes


def test_kv_cache_decoders_calibrate_and_verify_with_an_empty_cache():
    """A decoder exported with a KV cache (past_key_values.N.key/value [batch, kv_heads, past, head_dim], a mask over
    past + seq) gets made-up and text inputs with an empty past, as a generation loop's first step: before, the mask
    took the past's made-up length and ONNX Runtime refused the model, so every pass refused it."""
    from modelsurgeon.calibration import empty_past_dims, from_token_ids, input_signature, synthesize
    from modelsurgeon.models import corpus

    path = corpus.entry("llama/dynamo18-kv").path()
    model = ir.load(path)
    assert empty_past_dims(input_signature(model)) == {"past"}
    made_up = synthesize(model, num_samples=2, seq_len=8).arrays
    text = from_token_ids(model, np.ones((2, 8), np.int64)).arrays
    for arrays in (made_up, text):
        assert arrays["past_key_values.0.key"].shape == (2, 2, 0, 16) and arrays["attention_mask"].shape == (2, 8)
    result = modelsurgeon.compile(str(path), "quant4", progress=False)
    assert result.report.rows[-1].rel_l2 < 0.5


def test_a_model_that_runs_one_sample_at_a_time_is_calibrated_that_way():
    """torch's opset-23 export fuses rotary embeddings into RotaryEmbedding with cos/sin of batch 1, which ONNX Runtime
    1.32 refuses for a batch of 2: the compile verifies and calibrates one sample per run instead of refusing."""
    from modelsurgeon.capture import ONE_SAMPLE_PER_RUN
    from modelsurgeon.models import corpus

    path = corpus.entry("llama/dynamo23").path()
    ids = np.ones((2, 8), np.int64)
    with pytest.raises(Exception, match="RotaryEmbedding"):
        run_model(str(path), {"input_ids": ids})
    result = modelsurgeon.compile(str(path), "slice(sparsity=0.25)", progress=False)
    assert result.model.meta.get(ONE_SAMPLE_PER_RUN)
    assert run_model(result.model, {"input_ids": ids[:1]})["logits"].shape == (1, 8, 512)
    unverified = modelsurgeon.compile(str(path), "quant8", verify=False, progress=False)  # calibrates too
    assert unverified.model.meta.get(ONE_SAMPLE_PER_RUN)
