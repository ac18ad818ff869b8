"""quant4 / quant8 and their numerics (compiler/quantize.py): packings decode exactly, ORT kernels compute what
the numpy reference says, GPTQ/AWQ beat RTN on real activations, the passes rewrite reference models as
documented, folds are exact, and bad options fail with one line."""

from __future__ import annotations

import collections
import logging

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelsurgeon
from modelsurgeon import quantize as Q
from modelsurgeon.calibration import synthesize
from modelsurgeon.capture import capture
from modelsurgeon.errors import UserError
from modelsurgeon.passes import _quant_graph as G
from modelsurgeon.runtime.session import make_session, run_model

logging.getLogger("modelsurgeon").setLevel(logging.ERROR)
RNG = np.random.default_rng(0)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _session_run(model_proto: onnx.ModelProto, feeds, accuracy_level=0):
    return make_session(model_proto.SerializeToString(), accuracy_level=accuracy_level).run(None, feeds)[0]


# ---------------------------------------------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matmulnbits_packing_round_trips(bits, block, symmetric):
    k, n = 3 * block + 7, 5  # odd K: the last block is partial
    bq = Q.quantize_rtn(RNG.standard_normal((k, n)).astype(np.float32), bits, block, symmetric)
    b, scales, zp = Q.pack_matmulnbits(bq)
    nb = -(-k // block)
    assert b.dtype == np.uint8 and b.shape == (n, nb, block * bits // 8)
    assert scales.shape == (n * nb,)
    assert (zp is None) == symmetric
    if zp is not None:
        assert zp.shape == (n * -(-nb * bits // 8),)
    back = Q.unpack_matmulnbits(b, scales, zp, k, n, bits, block)
    np.testing.assert_array_equal(back.codes, bq.codes)
    np.testing.assert_array_equal(back.scales, bq.scales)
    np.testing.assert_array_equal(back.zero_points, bq.zero_points)
    np.testing.assert_array_equal(back.dequantize(), bq.dequantize())


@pytest.mark.parametrize("count", [1, 7, 64])
@pytest.mark.parametrize("signed", [False, True])
def test_nibble_packing_round_trips(count, signed):
    values = RNG.integers(-8, 8, count) if signed else RNG.integers(0, 16, count)
    packed = Q.pack_nibbles(values)
    assert packed.size == (count + 1) // 2
    np.testing.assert_array_equal(Q.unpack_nibbles(packed, count, signed), values)


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_codes_ranges_and_rounding(symmetric):
    w = RNG.standard_normal((100, 12)).astype(np.float32)
    bq = Q.quantize_rtn(w, 4, 32, symmetric)
    assert bq.codes.max() <= 15 and bq.scales.shape == (4, 12)
    if symmetric:
        assert np.all(bq.zero_points == 8)
    err = np.abs(bq.dequantize() - w)
    step = np.repeat(np.abs(bq.scales), 32, axis=0)[:100]
    # min-max ranges: every weight rounds to nearest; symmetric blocks give the side opposite the largest
    # magnitude 7 steps instead of 8, so only there (code 15) can a weight be clipped
    inner = bq.codes < 15 if symmetric else np.ones_like(err, bool)
    assert np.all(err[inner] <= step[inner] / 2 + 1e-6)
    if not symmetric:
        return
    # symmetric: the largest-magnitude weight of each block is represented exactly (it maps to code 0)
    for blk in range(4):
        rows = slice(blk * 32, min(100, blk * 32 + 32))
        idx = np.abs(w[rows]).argmax(axis=0)
        np.testing.assert_allclose(bq.dequantize()[rows][idx, range(12)], w[rows][idx, range(12)], rtol=1e-5)


def test_gptq_without_correlations_is_rtn():
    """With a diagonal H there is nothing to compensate: GPTQ must give RTN's codes, whatever the visiting order."""
    w = RNG.standard_normal((96, 10)).astype(np.float32)
    h = np.diag(RNG.uniform(0.5, 2.0, 96))  # distinct energies: act-order permutes the channels
    for act_order in (False, True):
        g = Q.gptq(w, h, 4, 32, False, damp=0.01, act_order=act_order, clip_search=False)
        np.testing.assert_array_equal(g.codes, Q.quantize_rtn(w, 4, 32, False).codes)


def _correlated_problem(k=256, n=64, rows=1024, seed=1):
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + 0.4 * rng.standard_normal((k, k)) / np.sqrt(k)
    x = (rng.standard_normal((rows, k)) @ mix) * np.exp(rng.standard_normal(k) * 0.7)
    return rng.standard_normal((k, n)).astype(np.float32) * 0.05, x.astype(np.float32)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_and_awq_reduce_output_error(symmetric):
    w, x = _correlated_problem()
    h = x.T.astype(np.float64) @ x
    rtn = Q.relative_output_error(w, Q.quantize_rtn(w, 4, 32, symmetric).dequantize(), h)
    gptq = Q.relative_output_error(w, Q.gptq(w, h, 4, 32, symmetric).dequantize(), h)
    res = Q.awq_search([w], h, np.abs(x).mean(0), 4, 32, symmetric)
    awq = Q.relative_output_error(w, res.quantized[0].dequantize() / res.scales[:, None], h)
    assert gptq < 0.7 * rtn and awq < 0.8 * rtn
    assert res.error <= res.error_unscaled + 1e-9


def test_inverse_cholesky_is_the_upper_factor_of_the_inverse():
    from scipy import linalg

    a = RNG.standard_normal((300, 60))
    h = a.T @ a
    u = Q._inverse_cholesky_upper(h)
    np.testing.assert_allclose(u, linalg.cholesky(np.linalg.inv(h), lower=False), rtol=1e-8, atol=1e-10)


def test_range_observer_methods():
    x = RNG.standard_normal(100_000).astype(np.float32)
    x[:3] = 50.0  # a few outliers
    obs = Q.RangeObserver()
    obs.observe_minmax(x)
    obs.observe_histogram(x)
    assert obs.range("minmax") == (pytest.approx(x.min()), pytest.approx(50.0))
    lo, hi = obs.range("percentile", 99.9)
    assert -4 < lo < -2.5 and 2.5 < hi < 4
    lo, hi = obs.range("entropy")
    assert 2.5 < hi < 8 and lo == -hi
    relu = np.maximum(x, 0)
    obs = Q.RangeObserver()
    obs.observe_minmax(relu)
    obs.observe_histogram(relu)
    assert obs.range("entropy")[0] == 0.0
    scale, zp = Q.activation_qparams(0.0, 6.0)
    assert zp == 0 and scale == pytest.approx(6 / 255)


# ---------------------------------------------------------------------------------------------------------------
# the kernels compute what the packings say


def _nbits_model(bq, k, n, bias=None, accuracy_level=0):
    b, scales, zp = Q.pack_matmulnbits(bq)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["A", "B", "S", "", "", ""]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "Z"))
        inputs[3] = "Z"
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        inputs[5] = "bias"
    while not inputs[-1]:
        inputs.pop()
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bq.bits,
                            block_size=bq.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("bits,block,symmetric,bias", [(4, 32, False, True), (4, 16, True, False), (4, 128, False, False),
                                                       (8, 32, True, True), (8, 64, False, False)])
def test_matmulnbits_kernel_matches_numpy(bits, block, symmetric, bias):
    k, n = 100, 24  # K not a multiple of the block
    bq = Q.quantize_rtn(RNG.standard_normal((k, n)).astype(np.float32), bits, block, symmetric)
    b = RNG.standard_normal(n).astype(np.float32) if bias else None
    a = RNG.standard_normal((2, 3, k)).astype(np.float32)
    y = _session_run(_nbits_model(bq, k, n, b), {"A": a})
    ref = a @ bq.dequantize() + (0 if b is None else b)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_blocked_dequantizelinear_int4_matches_numpy(symmetric):
    k, n, block = 70, 9, 32  # odd element count: the last byte holds one nibble
    bq = Q.quantize_rtn(RNG.standard_normal((k, n)).astype(np.float32), 4, block, symmetric)
    values, scales, zp = Q.onnx_blocked(bq)
    vtype = ml_dtypes.int4 if symmetric else ml_dtypes.uint4
    tensors = [ir.serde.serialize_tensor(ir.tensor(values.astype(vtype), name="W"))]
    tensors.append(numpy_helper.from_array(scales, "S"))
    dq_inputs = ["W", "S"]
    if zp is not None:
        tensors.append(ir.serde.serialize_tensor(ir.tensor(zp.astype(ml_dtypes.uint4), name="Z")))
        dq_inputs.append("Z")
    # the raw bytes ONNX stores decode to the intended values
    raw = np.frombuffer(tensors[0].raw_data, np.uint8)
    np.testing.assert_array_equal(Q.unpack_nibbles(raw, k * n, symmetric).reshape(k, n), values)
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["Wd"], axis=0, block_size=block),
             helper.make_node("MatMul", ["A", "Wd"], ["Y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    a = RNG.standard_normal((4, k)).astype(np.float32)
    np.testing.assert_allclose(_session_run(model, {"A": a}), a @ bq.dequantize(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# passes on reference models


@pytest.fixture(scope="session")
def llama():
    from modelsurgeon.models import reference

    path = reference.export("llama")
    return path, synthesize(ir.load(path), num_samples=8, seq_len=16, seed=3)


@pytest.fixture(scope="session")
def opt():
    from modelsurgeon.models import reference

    path = reference.export("opt")
    return path, synthesize(ir.load(path), num_samples=8, seq_len=16, seed=3)


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def _initial(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def test_quant4_rtn_rewrites_every_linear_and_decodes_to_rtn(llama):
    path, calib = llama
    original = ir.load(path)
    weights = {n.outputs[0].name: n.inputs[1].const_value.numpy() for n in original.graph
               if n.op_type == "MatMul" and n.inputs[1].const_value is not None}
    result = modelsurgeon.compile(str(path), passes="quant4", calibration=calib, progress=False, fuse=False)
    model, row = result.model, result.report.rows[1]
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == 15  # 7 per block and the LM head, at 8 bits by default under rtn
    assert row.notes["layers_4bit"] == 14 and len(row.notes["layers_8bit"]) == 1
    assert not any("output head" in s for s in row.skipped)
    assert [s for s in row.skipped if "two activations" in s] == [G.activation_products_note(4)]  # attention
    assert result.report.final.bytes < 0.75 * result.report.rows[0].bytes
    assert result.report.final.rel_l2 < 0.3
    for node in nbits:  # decode what was written and compare with an independent RTN of the original weight
        k, n = node.attributes["K"].value, node.attributes["N"].value
        bits = node.attributes["bits"].value
        assert bits == (8 if G.is_output_head(node) else 4)
        zp = _initial(model, node.inputs[3].name) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        got = Q.unpack_matmulnbits(_initial(model, node.inputs[1].name), _initial(model, node.inputs[2].name), zp,
                                   k, n, bits, 32)
        w = weights[node.outputs[0].name]
        np.testing.assert_array_equal(got.codes, Q.quantize_rtn(w, bits, 32, False).codes)
    floating = modelsurgeon.compile(str(path), passes="quant4(lm_head=float)", calibration=calib, progress=False,
                                    fuse=False)
    assert _ops(floating.model)["MatMulNBits"] == 14
    assert any("output head kept in float" in s for s in floating.report.rows[1].skipped)
    # an untied table stays float under embeddings=auto, and the report says so
    assert _ops(model)["GatherBlockQuantized"] == 0 and any("embedding table kept in float" in s for s in row.skipped)


@pytest.mark.parametrize("algo, bits", [("rtn", 8), ("gptq", 4)])
def test_quant4_head_defaults_per_algorithm(llama, algo, bits):
    """lm_head=auto: 8 bits under round to nearest, 4 under gptq (docs/quant.md measures both on SmolLM2)."""
    path, calib = llama
    model = modelsurgeon.compile(str(path), passes=f"quant4(algo={algo})", calibration=calib, progress=False,
                                 fuse=False).model
    heads = [n for n in model.graph if n.op_type == "MatMulNBits" and G.is_output_head(n)]
    assert [n.attributes["bits"].value for n in heads] == [bits]


def test_quant4_qdq_format_computes_the_same_as_matmulnbits(llama):
    path, calib = llama
    feeds = synthesize(ir.load(path), num_samples=2, seq_len=8, seed=9).arrays
    qdq = modelsurgeon.compile(str(path), passes="quant4(format=qdq,symmetric=true)", calibration=calib, progress=False)
    nbits = modelsurgeon.compile(str(path), passes="quant4(accuracy_level=0,symmetric=true)", calibration=calib, progress=False)
    assert qdq.model.opset_imports[""] >= 21
    dqs = [n for n in qdq.model.graph if n.op_type == "DequantizeLinear"]
    types = collections.Counter(n.inputs[0].const_value.dtype for n in dqs)
    assert types == {ir.DataType.INT4: 14, ir.DataType.INT8: 1}  # the head at 8 bits
    a = run_model(qdq.model, feeds, accuracy_level=0)["logits"]
    b = run_model(nbits.model, feeds)["logits"]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _gemm_model(k=40, n=12, alpha=0.5, beta=2.0):
    w = RNG.standard_normal((n, k)).astype(np.float32)
    c = RNG.standard_normal(n).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", transB=1, alpha=alpha, beta=beta)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(c, "C")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), w, c


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_quant4_gemm_transb_alpha_beta_bias(fmt):
    proto, w, c = _gemm_model()
    x = RNG.standard_normal((5, 40)).astype(np.float32)
    opts = "accuracy_level=0,lm_head=true,block=16" + (",format=qdq" if fmt == "qdq" else "")
    model = modelsurgeon.compile(proto, passes=f"quant4({opts})", example_inputs=None, progress=False,
                                 calibration={"x": x}).model
    expected_w = Q.quantize_rtn(0.5 * w.T, 4, 16, False).dequantize()
    y = run_model(model, {"x": x}, accuracy_level=0)["y"]
    np.testing.assert_allclose(y, x @ expected_w + 2.0 * c, rtol=1e-5, atol=1e-5)


def test_quant4_gptq_and_awq_on_reference_llama(llama):
    path, calib = llama
    rtn = modelsurgeon.compile(str(path), passes="quant4(keep8=0,algo=rtn,clip_search=false)", calibration=calib, progress=False)
    for algo in ("gptq", "awq"):
        result = modelsurgeon.compile(str(path), passes=f"quant4(algo={algo})", calibration=calib, progress=False)
        notes = result.report.rows[1].notes
        assert notes["layers_4bit"] == (15 if algo == "gptq" else 14)  # lm_head=auto: 4 bits under gptq, else 8
        assert notes["error_basis"] == "calibration activations"
        assert notes["calibration_segments"] <= 10  # one segment per group of layers sharing an input (+ none re-run)
        assert result.report.final.rel_l2 < 0.3
        if algo == "awq":  # pre-RMSNorm: q/k/v and gate/up scales fold into the norm gains, down into up_proj
            assert notes["awq_folded"] >= 4
    assert rtn.report.final.rel_l2 < 0.3


def _insert_inverse(model: ir.Model, value: ir.Value, factor: np.ndarray, consumers) -> None:
    """Undo a fold after it: consumers read value * (1/factor) through a new Mul."""
    inv = ir.Value(name=f"{value.name}_undo", const_value=ir.tensor((1.0 / factor).astype(np.float32)))
    inv.const_value.name = inv.name
    model.graph.register_initializer(inv)
    mul = ir.Node("", "Mul", [value, inv], name=f"{value.name}_undo_mul")
    model.graph.insert_before(consumers[0], mul)
    for node in consumers:
        for i, v in enumerate(node.inputs):
            if v is value:
                node.replace_input_with(i, mul.outputs[0])


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_channel_scale_folds_are_exact(kind, llama, opt):
    """Every fold the AWQ path can make (norm gains, Mul by a gain, MatMul/Add/Relu producers) scales exactly."""
    from modelsurgeon.passes import _quant_graph as G

    path, calib = llama if kind == "llama" else opt
    feeds = calib.head(2)
    reference = run_model(ir.load(path), feeds)
    model = ir.load(path)
    namer = G.Namer(model)
    linears, _ = G.find_linears(model, fuse_bias=False)
    folded = []
    for group in G.group_by_input(linears):
        x = group[0].x
        factor = np.random.default_rng(len(folded)).uniform(0.5, 2.0, group[0].shape[0])
        fold = G.plan_channel_scale(model, namer, x, factor, {id(l.node) for l in group})
        if fold is None:
            continue
        fold.apply()
        _insert_inverse(model, x, factor, [l.node for l in group])
        folded.append(x.producer().op_type)
    assert len(folded) >= 4, folded
    if kind == "opt":
        assert "LayerNormalization" in folded and "Relu" in folded  # fc2 folds through Relu and fc1's bias Add
    else:
        assert "Mul" in folded
    got = run_model(model, feeds)
    for name, ref in reference.items():
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-4)


def test_quant4_keep8_include_exclude_head_embeddings(llama):
    path, calib = llama
    result = modelsurgeon.compile(str(path), passes="quant4(keep8=2,lm_head=true,embeddings=true)", fuse=False,
                                  calibration=calib, progress=False)
    model, notes = result.model, result.report.rows[1].notes
    bits = collections.Counter(n.attributes["bits"].value for n in model.graph if n.op_type == "MatMulNBits")
    assert bits == {4: 13, 8: 2} and len(notes["layers_8bit"]) == 2
    assert _ops(model)["GatherBlockQuantized"] == 1 and notes["embeddings"] == 1
    only_q = modelsurgeon.compile(str(path), passes=r"quant4(include=q_proj,exclude=^layers\.1\.)", calibration=calib,
                                  fuse=False,
                                  progress=False)
    assert _ops(only_q.model)["MatMulNBits"] == 1


def test_untied_table_narrower_than_a_block_is_quantized_with_embeddings_true(llama):
    """A table width that is not a multiple of `block` (64 wide, block 128) ends in a shorter block, as K does."""
    path, calib = llama
    original = ir.load(path)
    gather = next(n for n in original.graph if n.op_type == "Gather" and n.inputs[0].const_value is not None)
    table = gather.inputs[0].const_value.numpy()
    model = modelsurgeon.compile(str(path), passes="quant4(embeddings=true,block=128)", calibration=calib,
                                 progress=False, fuse=False).model
    lookup = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    model.graph.outputs.append(lookup.outputs[0])
    ids = np.array([[0, 5, 255, 17]], np.int64)
    got = run_model(model, {"input_ids": ids})[lookup.outputs[0].name]
    expected = Q.quantize_rtn(table.T, 4, 128, False).dequantize().T[ids]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_quant4_options_fail_with_one_line():
    from modelsurgeon.passes.quant4 import Quant4Pass

    for opts in ({"block": 48}, {"block": 512}, {"algo": "hqq"}, {"keep8": -1}, {"format": "int4"}, {"damp": 2.0},
                 {"include": "q_proj("}, {"lm_head": 3}, {"lm_head": "bf16"}, {"embeddings": "tied"}):
        with pytest.raises(UserError) as err:
            Quant4Pass(**opts)
        assert "\n" not in str(err.value)
    assert Quant4Pass(algo="gptq").needs_calibration and not Quant4Pass().needs_calibration


def test_quant4_keep8_larger_than_the_model(llama):
    path, calib = llama
    with pytest.raises(UserError, match="keep8"):
        modelsurgeon.compile(str(path), passes="quant4(keep8=99)", calibration=calib, progress=False)


def test_layerwise_runner_follows_rewrites(llama):
    from modelsurgeon.layerwise import LayerwiseRunner

    path, calib = llama
    model = ir.load(path)
    mms = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    late = mms[-2].inputs[0].name  # the input of a late layer
    ref = capture(model, [late], calib, batch_size=4)[late]
    runner = LayerwiseRunner(model, calib, batch_size=4)
    early = runner.values([mms[0].inputs[0].name])  # computes only the first segment
    assert runner.nodes_run < len(model.graph) / 4 and len(early) == 2
    got = np.concatenate([b[late] for b in runner.values([late])])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # a layer not yet computed is rewritten: what comes after it sees the rewrite
    runner2 = LayerwiseRunner(model, calib, batch_size=4)
    runner2.values([mms[0].inputs[0].name])
    zero = ir.Value(name="zeros_w", const_value=ir.tensor(np.zeros(mms[3].inputs[1].const_value.shape, np.float32)))
    zero.const_value.name = "zeros_w"
    model.graph.register_initializer(zero)
    mms[3].replace_input_with(1, zero)
    changed = np.concatenate([b[late] for b in runner2.values([late])])
    assert _rel(changed, ref) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# quant8


@pytest.fixture(scope="session")
def resnet():
    from modelsurgeon.models import reference

    path = reference.export("resnet")
    return path, synthesize(ir.load(path), num_samples=16, seed=3)


def _optimized_ops(model: ir.Model, tmp_path) -> collections.Counter:
    import onnxruntime as ort

    from modelsurgeon.runtime.session import session_options

    so = session_options()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def test_quant8_static_conv_becomes_qlinearconv(resnet, tmp_path):
    path, calib = resnet
    result = modelsurgeon.compile(str(path), passes="quant8(calibrate=minmax)", calibration=calib, progress=False)
    ops = _optimized_ops(result.model, tmp_path)
    assert ops["QLinearConv"] == 9 and ops["QGemm"] == 1 and ops["Conv"] == 0
    weights = [n for n in result.model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
               and n.inputs[0].const_value.dtype == ir.DataType.INT8]
    assert len(weights) == 10 and all(n.attributes["axis"].value in (0, 1) for n in weights)  # per channel
    assert result.report.final.rel_l2 < 0.1
    assert result.report.final.bytes < 0.45 * result.report.rows[0].bytes  # int8 weights + graph overhead of a tiny model


def test_quant8_static_and_dynamic_on_transformer(opt, tmp_path):
    path, calib = opt
    static = modelsurgeon.compile(str(path), passes="quant8", calibration=calib, progress=False)
    assert _optimized_ops(static.model, tmp_path)["MatMulIntegerToFloat"] == 13  # 6 per block + LM head
    assert any("also read by other nodes" in s for s in static.report.rows[1].skipped)  # the tied embedding
    assert any("two activations" in s for s in static.report.rows[1].skipped)
    assert static.report.final.rel_l2 < 0.1
    dynamic = modelsurgeon.compile(str(path), passes="quant8(dynamic=true)", progress=False)
    assert _ops(dynamic.model)["DynamicQuantizeMatMul"] == 13
    assert dynamic.report.final.rel_l2 < 0.1


def test_quant8_embeddings_int8_per_column():
    from modelsurgeon.models import reference

    path = reference.export("bert")
    calib = synthesize(ir.load(path), num_samples=8, seq_len=16, seed=3)
    result = modelsurgeon.compile(str(path), passes="quant8(dynamic=true)", calibration=calib, progress=False)
    model = result.model
    tables = {n.inputs[0].name: n.inputs[0].const_value.numpy() for n in model.graph
              if n.op_type == "Gather" and n.inputs[0].const_value is not None}
    word = next(v for k, v in tables.items() if k.startswith("embeddings.word"))
    assert word.dtype == np.int8 and result.report.rows[1].notes["embeddings"] == 2  # word + position tables
    original = ir.load(path).graph.initializers
    name = next(k for k in tables if k.startswith("embeddings.word"))
    scale = model.graph.initializers[name.replace("_int8", "_scale")].const_value.numpy()
    w = original[name.replace("_int8", "")].const_value.numpy()
    assert np.all(np.abs(word * scale - w) <= scale / 2 + 1e-7)  # per-column int8, round to nearest
    assert result.report.final.rel_l2 < 0.05


def test_quant8_dynamic_leaves_conv_float_and_says_so(resnet):
    path, calib = resnet
    result = modelsurgeon.compile(str(path), passes="quant8(dynamic=true)", calibration=calib, progress=False)
    assert _ops(result.model)["Conv"] == 9 and _ops(result.model)["DynamicQuantizeMatMul"] == 1
    assert sum("dynamic int8 covers MatMul/Gemm only" in s for s in result.report.rows[1].skipped) == 9


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_quant8_calibration_methods_run(resnet, method):
    path, calib = resnet
    result = modelsurgeon.compile(str(path), passes=f"quant8(calibrate={method})", calibration=calib, progress=False)
    assert result.report.rows[1].notes["calibrate"] == method and result.report.final.cosine > 0.5


def test_quant8_options_fail_with_one_line():
    from modelsurgeon.passes.quant8 import Quant8Pass

    for opts in ({"ops": "Conv|LSTM"}, {"calibrate": "mse"}, {"percentile": 50.0}):
        with pytest.raises(UserError) as err:
            Quant8Pass(**opts)
        assert "\n" not in str(err.value)
    assert Quant8Pass().needs_calibration and not Quant8Pass(dynamic=True).needs_calibration


# ---------------------------------------------------------------------------------------------------------------
# real activations


@pytest.fixture(scope="session")
def minilm_layer_inputs():
    from modelsurgeon.models import real

    path = real.minilm_onnx()
    model = ir.load(path)
    layers = {}
    for node in model.graph:
        w = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
        if w is not None and w.name and w.name.startswith("bert.encoder.layer.1.") and w.const_value is not None \
                and ".key." not in w.name and ".value." not in w.name:  # q/k/v share an input: q stands for them
            layers[w.name] = (node.inputs[0].name, w.const_value.numpy())
    names = sorted({x for x, _ in layers.values()})

    def activations(seed):
        feeds = real.minilm_inputs(real.sentences(48, seed=seed), max_length=64)
        data = capture(model, names, modelsurgeon.calibration.CalibrationData(feeds, "text"))
        mask = feeds["attention_mask"].astype(bool)
        return {n: a[mask].astype(np.float32) for n, a in data.items()}  # real tokens only

    return layers, activations(0), activations(1)


@pytest.mark.real
@pytest.mark.parametrize("block,symmetric", [(32, False), (128, True)])
def test_gptq_and_awq_beat_rtn_on_real_activations(minilm_layer_inputs, block, symmetric):
    """Fit on one set of sentences, measure each layer's output error on other sentences."""
    layers, calib, held_out = minilm_layer_inputs
    assert len(layers) == 4
    for name, (x_name, w) in layers.items():
        xc, xe = calib[x_name], held_out[x_name]
        h_cal = xc.T.astype(np.float64) @ xc
        h_eval = xe.T.astype(np.float64) @ xe
        rtn = Q.relative_output_error(w, Q.quantize_rtn(w, 4, block, symmetric).dequantize(), h_eval)
        gptq = Q.relative_output_error(w, Q.gptq(w, h_cal, 4, block, symmetric).dequantize(), h_eval)
        res = Q.awq_search([w], h_cal, np.abs(xc).mean(0), 4, block, symmetric)
        awq = Q.relative_output_error(w, res.quantized[0].dequantize() / res.scales[:, None], h_eval)
        assert gptq < 0.9 * rtn, (name, gptq, rtn)
        assert awq < rtn, (name, awq, rtn)


def test_quant4_after_lowrank_quantizes_both_factors(llama):
    """lowrank's new intermediate values are typed, and an untyped activation takes its weight's type: both factors
    of every factored layer are quantized (once both were skipped as 'activation type None')."""
    path, calib = llama
    result = modelsurgeon.compile(path, passes="lowrank(ratio=0.3),quant4", calibration=calib, progress=False)
    row = result.report.rows[2]
    assert not [s for s in row.skipped if "activation type" in s]
    quantized = [n.name for n in result.model.graph if n.op_type == "MatMulNBits" and "lowrank" in n.name]
    left = [n for n in result.model.graph if n.op_type == "MatMul" and "lowrank" in n.name and n.inputs[1].is_initializer()]
    assert sum(".lowrank_0" in n for n in quantized) >= 6 and sum(".lowrank_1" in n for n in quantized) >= 5
    for n in left:  # only factors narrower than the smallest block stay in float, and the report says so
        k = n.inputs[1].const_value.shape[0]
        assert k < 16 and any(s.startswith(n.name) and f"K={k} is below" in s for s in row.skipped)
    feeds = synthesize(result.model, num_samples=2, seq_len=9, seed=1).arrays
    assert np.all(np.isfinite(run_model(result.model, feeds)["logits"]))


@pytest.mark.parametrize("symmetric, head, block", [(False, "true", 32), (True, "true", 32), (False, "auto", 32),
                                                    (True, "8", 32), (False, "true", 128)])
def test_tied_table_is_stored_once_in_the_heads_bits(symmetric, head, block):
    """A quantized head tied to the table (lm_head=true or 4: 4 bits; auto under rtn, or 8: 8 bits; embeddings=auto
    by default): the lookup reads the head's packed codes (no float table, no second copy), and what it returns is
    exactly those codes dequantized. Its scales are the head's, reshaped by a node (not a second copy in the file)."""
    from modelsurgeon.models import reference

    path = reference.export("llama", 18, tie=True)
    calib = synthesize(ir.load(path), num_samples=8, seq_len=16, seed=3)
    # block=128 is wider than the table (64): the lookup's rows end in padding that a Slice drops
    result = modelsurgeon.compile(path, passes=f"quant4(lm_head={head},symmetric={str(symmetric).lower()},block={block})",
                                  calibration=calib, progress=False)
    model = result.model
    lookup = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    head_node = next(n for n in model.graph if n.op_type == "MatMulNBits" and lookup.inputs[0] is n.inputs[1])
    bits = 4 if head == "true" else 8
    assert head_node.attributes["bits"].value == lookup.attributes["bits"].value == bits
    assert not [v for v in model.graph.initializers.values()
                if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size >= 256 * 64]
    b = lookup.inputs[0].const_value.numpy()
    v, nb, width = b.shape
    codes = (np.stack([b & 0x0F, b >> 4], axis=-1) if bits == 4 else b).reshape(v, nb, -1).astype(np.float32)
    zp = 2.0 ** (bits - 1) if symmetric else lookup.inputs[3].const_value.numpy().astype(np.float32)
    reshape = lookup.inputs[2].producer()
    assert reshape.op_type == "Reshape" and reshape.inputs[0] is head_node.inputs[2]
    scales = head_node.inputs[2].const_value.numpy().reshape(v, nb, 1)
    table = ((codes - zp) * scales).reshape(v, -1)[:, :64]
    merged = lookup.outputs[0].uses()[0].node.outputs[0]
    if block > 64:
        merged = merged.uses()[0].node.outputs[0]
    model.graph.outputs.append(merged)
    ids = np.array([[0, 5, 255, 17], [3, 3, 100, 42]], np.int64)
    got = run_model(model, {"input_ids": ids})
    np.testing.assert_array_equal(got[merged.name], table[ids])
    assert head_node.inputs[1].name == lookup.inputs[0].name and got["logits"].shape == (2, 4, 256)


@pytest.mark.parametrize("source", ["llama-tied/optimum", "llama-tied/genai-fp32"])
def test_tied_heads_of_other_exporters_share_their_codes_with_the_lookup(corpus_model, source):
    """Optimum's TorchScript export stores a tied head as a copy of the table, GenAI's builder gathers rows of
    Transpose(head weight): quant4 first writes both ties as dynamo does (exact), so the lookup reads the head's
    codes and neither the table nor its copy is left in float."""
    path = corpus_model(source)
    calib = synthesize(ir.load(path), num_samples=4, seq_len=8, seed=3)
    result = modelsurgeon.compile(path, passes="quant4(lm_head=true)", calibration=calib, progress=False)
    model = result.model
    lookup = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.inputs[1] is lookup.inputs[0])
    vocab, width = lookup.inputs[0].const_value.shape[0], head.attributes["K"].value
    assert not [v for v in model.graph.initializers.values() if v.const_value is not None
                and v.const_value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)
                and v.const_value.size >= vocab * width // 2]
    assert result.report.final.bytes < 0.5 * result.report.rows[0].bytes


def test_tied_head_stays_float_under_qdq_by_default():
    """format=qdq has no quantized Gather, so a quantized tied head would store the table twice: lm_head=auto keeps
    it in float there (the model gets smaller, not larger), and lm_head=8 quantizes it when asked."""
    from modelsurgeon.models import reference

    path = reference.export("llama", 18, tie=True)
    calib = synthesize(ir.load(path), num_samples=4, seq_len=8, seed=3)
    auto = modelsurgeon.compile(path, passes="quant4(format=qdq)", calibration=calib, progress=False, fuse=False)
    assert any("tied to the embedding table kept in float under format=qdq" in s for s in auto.report.rows[1].skipped)
    assert auto.report.final.bytes < auto.report.rows[0].bytes
    asked = modelsurgeon.compile(path, passes="quant4(format=qdq,lm_head=8)", calibration=calib, progress=False,
                                 fuse=False)
    assert len([n for n in asked.model.graph if n.op_type == "DequantizeLinear"]) == \
        len([n for n in auto.model.graph if n.op_type == "DequantizeLinear"]) + 1


def test_gptq_head_codes_serve_the_lookup_only_when_they_reconstruct_the_table():
    """A tied head's gptq codes are shared with the lookup only when their error on the table is within 4x (squared)
    of round to nearest's: GPTQ moves the head's error where its input has little energy, which the lookup does not
    discount (SmolLM2 after slice: 180 perplexity shared, against 142 with the lookup's own 4-bit table)."""
    from types import SimpleNamespace

    from modelsurgeon.passes.quant4 import Quant4Pass, _Layer

    w = RNG.standard_normal((64, 96)).astype(np.float32)
    lin = SimpleNamespace(weight=w, name="head")
    p = Quant4Pass(algo="gptq")
    rtn = Q.quantize_rtn(w, 4, 32, False)
    skipped: list[str] = []
    assert p._fit_for_lookup(_Layer(lin, w, None, [], codes=rtn), skipped) and not skipped
    # codes whose error is piled on the trailing input channels, as GPTQ leaves them under an anisotropic Hessian
    push = np.r_[np.zeros((32, 96)), 0.3 * RNG.standard_normal((32, 96))].astype(np.float32)
    skewed = Q.quantize_rtn(w + push, 4, 32, False)
    assert Q.quantized_relative_error(w, skewed, None) > 4 * Q.quantized_relative_error(w, rtn, None)
    assert not p._fit_for_lookup(_Layer(lin, w, None, [], codes=skewed), skipped)
    assert len(skipped) == 1 and "worse" in skipped[0] and "own 4-bit table" in skipped[0]
