"""The fuse pass: each fusion puts ONNX Runtime's fused op in place of the decomposed subgraph, with the same outputs."""

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import modelsurgeon
from modelsurgeon.errors import UserError
from modelsurgeon.model_io import load
from modelsurgeon.calibration import synthesize
from modelsurgeon.runtime import run_model


def ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.all_nodes())


def _model(nodes, inputs, outputs, inits) -> ir.Model:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


def rms_residual_model() -> ir.Model:
    """y = RMSNorm(a + b) * scale, written out as Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul; also outputs a + b."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "scale"),
             onnx.numpy_helper.from_array(np.float32(2.0), "two"), onnx.numpy_helper.from_array(np.float32(1e-6), "eps"),
             onnx.numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    nodes = [helper.make_node("Add", ["a", "b"], ["h"]),
             helper.make_node("Pow", ["h", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1, noop_with_empty_axes=0),  # as torch writes it
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Reciprocal", ["rms"], ["inv"]),
             helper.make_node("Mul", ["h", "inv"], ["n"]),
             helper.make_node("Mul", ["n", "scale"], ["y"])]
    io = [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["b", "s", 16]) for k in ("a", "b")]
    outs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["b", "s", 16]) for k in ("y", "h")]
    return _model(nodes, io, outs, inits)


def erf_gelu_model() -> ir.Model:
    """y = 0.5 * x * (1 + erf(x / sqrt(2))) after a MatMul."""
    rng = np.random.default_rng(1)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
             onnx.numpy_helper.from_array(np.float32(np.sqrt(2.0)), "sqrt2"),
             onnx.numpy_helper.from_array(np.float32(1.0), "one"), onnx.numpy_helper.from_array(np.float32(0.5), "half")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Div", ["h", "sqrt2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]),
             helper.make_node("Mul", ["h", "e1"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])], inits)


def _feeds(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in model.graph.inputs:
        shape = [d if isinstance(d, int) else 3 for d in v.shape]
        feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _assert_same(a: dict, b: dict, rtol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        err = np.linalg.norm((a[k] - b[k]).astype(np.float64)) / max(np.linalg.norm(a[k].astype(np.float64)), 1e-30)
        assert err < rtol, (k, err)


def test_residual_rms_norm_becomes_skip_simplified_layer_normalization():
    model = rms_residual_model()
    feeds = _feeds(model)
    ref = run_model(model, feeds)
    result = modelsurgeon.compile(model, "fuse", cleanup=False)
    got = ops(result.model)
    assert got["SkipSimplifiedLayerNormalization"] == 1
    assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal"} & set(got)
    _assert_same(ref, run_model(result.model, feeds))
    assert result.report.rows[-1].notes["fused"] == {"SkipSimplifiedLayerNormalization": 1}


def unscaled_rms_model(form: str, scale_after: bool, opset: int) -> ir.Model:
    """y = (a + b) / Sqrt(ReduceMean((a + b)^2) + eps) [* scale]: an RMS norm as slice and fold_norms leave it (no gain,
    or the gain as a separate Mul), dividing, multiplying by a Reciprocal, or by 1 / Sqrt (TorchScript's rsqrt)."""
    rng = np.random.default_rng(3)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "scale"),
             onnx.numpy_helper.from_array(np.float32(2.0), "two"), onnx.numpy_helper.from_array(np.float32(1e-5), "eps")]
    mean = (helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1) if opset >= 18
            else helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1))
    if opset >= 18:
        inits.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    inits.append(onnx.numpy_helper.from_array(np.float32(1.0), "one"))
    norm = {"divide": [helper.make_node("Div", ["h", "rms"], ["n"])],
            "reciprocal": [helper.make_node("Reciprocal", ["rms"], ["inv"]), helper.make_node("Mul", ["h", "inv"], ["n"])],
            "one_over": [helper.make_node("Div", ["one", "rms"], ["inv"]), helper.make_node("Mul", ["inv", "h"], ["n"])]}[form]
    tail = [helper.make_node("Mul", ["scale", "n"], ["y"])] if scale_after else [helper.make_node("Identity", ["n"], ["y"])]
    nodes = [helper.make_node("Add", ["a", "b"], ["h"]), helper.make_node("Pow", ["h", "two"], ["sq"]), mean,
             helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]), *norm, *tail]
    io = [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["b", "s", 16]) for k in ("a", "b")]
    outs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["b", "s", 16]) for k in ("y", "h")]
    g = helper.make_graph(nodes, "g", io, outs, inits)
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))


@pytest.mark.parametrize("form, scale_after, opset", [("divide", False, 18), ("reciprocal", False, 18),
                                                      ("divide", True, 17), ("reciprocal", True, 18),
                                                      ("one_over", True, 18)])
def test_rms_norms_that_divide_or_have_no_gain_fuse_too(form, scale_after, opset):
    model = unscaled_rms_model(form, scale_after, opset)
    feeds = _feeds(model)
    ref = run_model(model, feeds)
    result = modelsurgeon.compile(model, "fuse", cleanup=False)
    got = ops(result.model)
    assert got["SkipSimplifiedLayerNormalization"] == 1, got
    assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div", "Mul"} & set(got)
    _assert_same(ref, run_model(result.model, feeds), rtol=1e-5)


def test_sliced_kv_decoder_norms_fuse_and_decode_the_same(corpus_model):
    """slice folds the norms' gains away and leaves them dividing: they still become SkipSimplifiedLayerNormalization
    (SmolLM2 after slice: 749 -> 384 nodes), and the fused decoder computes what the unfused one does."""
    path = corpus_model("llama/dynamo18-kv")
    original = load(path)
    calib = synthesize(original, num_samples=4, seq_len=8, seed=0)
    plain = modelsurgeon.compile(path, "slice(sparsity=0.25)", calibration=calib, progress=False, fuse=False)
    assert ops(plain.model)["ReduceMean"] >= 5  # the decomposed, gain-free norms slice leaves
    fused = modelsurgeon.compile(plain.model, "fuse", progress=False)
    got = ops(fused.model)
    assert got["SkipSimplifiedLayerNormalization"] == 4 and got["SimplifiedLayerNormalization"] == 1
    assert "ReduceMean" not in got and got["GroupQueryAttention"] == 2
    for past, seq, batch in ((0, 7, 2), (9, 1, 2)):
        feeds = _decode_feeds(original, past, seq, batch)
        _assert_same(run_model(plain.model, feeds), run_model(fused.model, feeds))


def test_optimum_decoder_norms_fuse_and_decode_the_same(corpus_model):
    """Optimum's TorchScript export writes RMSNorm with `1 / Sqrt(...)` (rsqrt): its norms fuse like torch dynamo's."""
    path = corpus_model("llama/optimum-past")
    original = load(path)
    fused = modelsurgeon.compile(path, "fuse", progress=False)
    got = ops(fused.model)
    assert got["SkipSimplifiedLayerNormalization"] == 4 and got["SimplifiedLayerNormalization"] == 1
    assert "ReduceMean" not in got and "Sqrt" not in got
    for past, seq, batch in ((0, 7, 2), (9, 1, 2)):
        feeds = _decode_feeds(original, past, seq, batch)
        _assert_same(run_model(original, feeds), run_model(fused.model, feeds))


def test_erf_gelu_becomes_gelu():
    model = erf_gelu_model()
    feeds = _feeds(model)
    ref = run_model(model, feeds)
    result = modelsurgeon.compile(model, "fuse", cleanup=False)
    assert ops(result.model)["Gelu"] == 1 and "Erf" not in ops(result.model)
    _assert_same(ref, run_model(result.model, feeds))


def test_nothing_to_fuse_leaves_the_model_unchanged():
    rng = np.random.default_rng(2)
    w = onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    model = _model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], [w])
    result = modelsurgeon.compile(model, "fuse", cleanup=False)
    row = result.report.rows[-1]
    assert not row.modified and row.notes["fused"] == "nothing to fuse"
    assert [n.op_type for n in result.model.graph] == ["MatMul", "Relu"]


def test_fuse_runs_after_quantization_only():
    with pytest.raises(UserError, match="cannot run after fusing pass 'fuse'.*fuse last"):
        modelsurgeon.compile(rms_residual_model(), "fuse,quant4")


def _decode_feeds(model: ir.Model, past: int, seq: int, batch: int = 2) -> dict[str, np.ndarray]:
    """One decode step with `past` cached positions (random cache), masks of ones."""
    rng = np.random.default_rng(3)
    feeds = {}
    for v in model.graph.inputs:
        if v.name == "input_ids":
            feeds[v.name] = rng.integers(0, 500, size=(batch, seq)).astype(np.int64)
        elif v.name == "attention_mask":
            feeds[v.name] = np.ones((batch, past + seq), np.int64)
        elif v.name == "position_ids":
            feeds[v.name] = np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))
        else:  # past_key_values.N.key / value [batch, kv heads, past, head size]
            feeds[v.name] = rng.standard_normal((batch, v.shape[1], past, v.shape[3])).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", ["llama/dynamo18-kv", "qwen2/dynamo18-kv"])
def test_kv_cache_decoder_gets_group_query_attention_and_decodes_the_same(corpus_model, name):
    path = corpus_model(name)
    result = modelsurgeon.compile(path, "fuse")
    got = ops(result.model)
    assert got["GroupQueryAttention"] == 2 and got["SkipSimplifiedLayerNormalization"] == 4
    assert got["SimplifiedLayerNormalization"] == 1
    assert sum(got.values()) < sum(ops(load(path)).values()) / 3
    original = load(path)
    # prompt, one decode step, a chunk after a cache (batch 1: ONNX Runtime's GroupQueryAttention refuses a batch of
    # several rows with both a cache and several new tokens, as in GenAI's models)
    for past, seq, batch in ((0, 7, 2), (9, 1, 2), (9, 4, 1)):
        feeds = _decode_feeds(original, past, seq, batch)
        _assert_same(run_model(original, feeds), run_model(result.model, feeds))


def test_rotary_without_attention_fusion_broadcasts_positions(corpus_model):
    """phi3 (as many KV heads as heads) gets RotaryEmbedding + MultiHeadAttention; its position_ids come from a
    Range ([1, S]) and must serve a batch of 2."""
    path = corpus_model("phi3/dynamo18")
    result = modelsurgeon.compile(path, "fuse")
    got = ops(result.model)
    assert got["RotaryEmbedding"] == 4 and got["MultiHeadAttention"] == 2
    original = load(path)
    feeds = {"input_ids": np.random.default_rng(4).integers(0, 500, size=(2, 6)).astype(np.int64)}
    _assert_same(run_model(original, feeds), run_model(result.model, feeds))


def test_encoder_gets_attention_skip_layer_norm_and_bias_gelu(corpus_model):
    result = modelsurgeon.compile(corpus_model("bert/dynamo18"), "fuse")
    got = ops(result.model)
    assert got["Attention"] == 2 and got["SkipLayerNormalization"] == 4 and got["BiasGelu"] == 2
    assert result.report.rows[-2].rel_l2 < 1e-5  # the fuse row, verified against the input


def test_invalid_attention_fusion_falls_back_to_norms(corpus_model):
    """onnxscript's attention fusion gives GPT-2's [B*S, D] Gemm input rank 3: the pass keeps attention decomposed,
    says so, and still fuses the norms."""
    result = modelsurgeon.compile(corpus_model("gpt2/dynamo18"), "fuse")
    row = next(r for r in result.report.rows if r.name == "fuse")
    assert row.modified and row.notes["fused"].get("SkipLayerNormalization") == 4
    assert "MultiHeadAttention" not in ops(result.model)
    assert any("attention left decomposed" in s for s in row.skipped)


def test_fusions_find_norms_and_attention_around_4bit_projections(corpus_model):
    result = modelsurgeon.compile(corpus_model("llama/dynamo18"), "quant4,fuse")
    got = ops(result.model)
    # q/k/v and gate/up packed: 4 products a layer (qkv, o, gate_up, down) instead of 7, and the head
    assert got["MatMulNBits"] == 9 and got["GroupQueryAttention"] == 2 and got["SkipSimplifiedLayerNormalization"] == 4
    fuse_row = next(r for r in result.report.rows if r.name == "fuse")
    quant_row = next(r for r in result.report.rows if r.name.startswith("quant4"))
    assert abs(fuse_row.rel_l2 - quant_row.rel_l2) < 1e-4  # fusion adds no error to quantization's


_QUANTIZED = {"MatMulNBits": "quant4(block=16)",  # asymmetric, zero points
              # our op with every optional input: zero points, outliers, 8-bit scale codes, tiles of 8 columns
              "SparseQuantMatMul": "spquant(sparsity=0.5,block=16,tile=8,min_saving=0,symmetric=false,outliers=0.03,"
                                   "scale_bits=8)"}


def _projections_model(op: str) -> ir.Model:
    """Three projections of one activation (q, k, v widths 16, 8, 8), each read by its own op; quantized to `op`
    (MatMulNBits or SparseQuantMatMul) unless it is MatMul."""
    rng = np.random.default_rng(5)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((32, n)).astype(np.float32), f"w{i}")
             for i, n in enumerate((16, 8, 8))]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"p{i}"]) for i in range(3)]
    nodes += [helper.make_node("Relu", ["p0"], ["y0"]), helper.make_node("Tanh", ["p1"], ["y1"]),
              helper.make_node("Neg", ["p2"], ["y2"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 32])],
                   [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", "s", n])
                    for i, n in enumerate((16, 8, 8))], inits)
    if op != "MatMul":
        model = modelsurgeon.compile(model, _QUANTIZED[op], fuse=False, cleanup=False, progress=False).model
    return model


@pytest.mark.parametrize("op", ["MatMul", "MatMulNBits", "SparseQuantMatMul"])
def test_sibling_projections_are_packed_into_one_product_and_a_split(op):
    from modelsurgeon.passes._packed_projections import pack_projections

    model = _projections_model(op)
    nbits = op != "MatMul"
    assert ops(model)[op] == 3
    feeds = _feeds(model)
    ref = run_model(model, feeds, accuracy_level=0)
    packed = model.clone()
    assert pack_projections(packed) == 1
    got = ops(packed)
    assert got[op] == 1 and got["Split"] == 1
    product = next(n for n in packed.graph if n.op_type == op)
    assert (product.attributes["N"].value if nbits else product.inputs[1].shape[1]) == 32
    out = run_model(packed, feeds, accuracy_level=0)
    for k in ref:  # every column computed as before: equal to float summation order
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-5)
    used = {v.name for n in packed.graph for v in n.inputs if v is not None}
    assert set(packed.graph.initializers) <= used  # the separate weights are gone, not left behind unused
    assert not {"w0", "w1", "w2"} & set(packed.graph.initializers)


def test_kv_decoder_fused_by_default_reads_packed_qkv_and_skips_norm_statistics(corpus_model):
    """compile() appends fuse: GroupQueryAttention reads one packed q/k/v product (GenAI's form), and the norms'
    unused mean / inverse-std outputs are not produced (unnamed)."""
    path = corpus_model("llama/dynamo18-kv")
    result = modelsurgeon.compile(path, "quant4")
    assert [r.name for r in result.report.rows][-2:] == ["fuse", "cleanup"]
    gqa = [n for n in result.model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.inputs[1] is None and n.inputs[2] is None for n in gqa)
    assert gqa[0].inputs[0].producer().op_type == "MatMulNBits"
    assert gqa[0].inputs[0].producer().attributes["N"].value == 64 + 2 * 2 * 16  # 4 heads + 2 x 2 KV heads of 16
    for n in result.model.graph:
        if n.op_type == "SkipSimplifiedLayerNormalization":
            assert [o.name for o in n.outputs][1:3] == ["", ""] and n.outputs[3].name
    plain = modelsurgeon.compile(path, "quant4", fuse=False)
    assert "fuse" not in [r.name for r in plain.report.rows] and "GroupQueryAttention" not in ops(plain.model)
    original = load(path)
    for past, seq, batch in ((0, 7, 2), (9, 1, 2)):
        feeds = _decode_feeds(original, past, seq, batch)
        _assert_same(run_model(plain.model, feeds, accuracy_level=0), run_model(result.model, feeds, accuracy_level=0),
                     rtol=1e-4)


def test_genai_folder_is_fused_again_after_canonicalize(corpus_model):
    """A GenAI graph (another exporter's fused form): canonicalize splits its SkipSimplifiedLayerNormalization for
    the analyses, and the default fuse puts it back, so a structural pass leaves GenAI's op set."""
    path = corpus_model("llama/genai-fp32")
    before = ops(load(generate_model_file(path)))
    result = modelsurgeon.compile(path, "drop-blocks(n=1)")
    after = ops(result.model)
    assert after["SkipSimplifiedLayerNormalization"] >= 1 and after["GroupQueryAttention"] == 1
    assert before["GroupQueryAttention"] == 2
    assert not {"Pow", "ReduceMean", "Sqrt"} & set(after)


def generate_model_file(path):
    from modelsurgeon.runtime.generate import model_file

    return model_file(path)


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_kv_decoder_fuses_to_genai_form_and_generates_the_same_tokens(smollm2_kv, tmp_path):
    """SmolLM2 exported by torch's dynamo exporter with its KV cache: the default fuse leaves GenAI's op set and about
    its node count (GenAI's builder: 343), and greedy decoding with the cache gives the unfused model's tokens."""
    from modelsurgeon.runtime.generate import Decoder, greedy

    path = smollm2_kv
    result = modelsurgeon.compile(path, "cleanup", num_samples=4, seq_len=32)
    got = ops(result.model)
    assert got["GroupQueryAttention"] == 30 and got["SkipSimplifiedLayerNormalization"] == 60
    assert sum(got.values()) <= 1.5 * 343
    fused = tmp_path / "fused.onnx"
    result.save(fused)
    prompt = np.array([[1, 504, 2365, 6354, 16438, 27003, 690, 260, 3125, 314]], np.int64)
    assert greedy(Decoder(str(fused)), prompt, 12).tolist() == greedy(Decoder(str(path)), prompt, 12).tolist()


def test_cli_fuses_by_default_and_no_fuse_keeps_the_exporters_ops(cli, corpus_model, tmp_path):
    path = corpus_model("llama/dynamo18-kv")
    for flags, fused in (((), True), (("--no-fuse",), False)):
        out = tmp_path / f"out{len(flags)}.onnx"
        code, stdout, err = cli("compile", path, "--passes", "quant4", "-o", out, *flags)
        assert code == 0, err
        assert ("GroupQueryAttention" in ops(load(out))) == fused
        assert any(line.startswith("fuse ") for line in stdout.splitlines()) == fused
