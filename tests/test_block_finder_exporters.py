"""The block finder sees every exporter's decoders (issue 15): TorchScript/Optimum (no-op Casts, Shape readers,
legacy GELU), fp16 (norms wrapped in Casts), GPT-2's Conv1D (Reshape -> Gemm -> Reshape, fused qkv), and ONNX
Runtime GenAI (skip norms, GroupQueryAttention, MatMulNBits, tied tables gathered through a Transpose or 4-bit).

Corpus models export on first use (cached); a model whose exporter is not installed is skipped with its reason
(and fails under CI=true, as tests/test_corpus.py does).
"""

from __future__ import annotations


import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from modelsurgeon import model_io
from modelsurgeon.analyses.blocks import find_blocks
from modelsurgeon.canonical import canonicalize
from modelsurgeon.value_types import complete_types

DECODERS = ("llama", "llama-tied", "qwen2", "phi3", "gemma", "gpt2")
EXPORTERS = ("dynamo18", "dynamo23-kv", "torchscript", "fp16", "optimum", "optimum-past", "genai-fp32", "genai-int4")
PAIRS = [(a, e) for a in DECODERS for e in EXPORTERS if not (a == "gpt2" and e.startswith("genai"))]


def _blocks(path):
    model = model_io.load(path)
    complete_types(model)  # as the pass manager does before any pass
    canonicalize(model)  # as the `canonicalize` pass does before the passes that read the blocks
    return find_blocks(model)


@pytest.mark.slow
@pytest.mark.parametrize("arch,exporter", PAIRS, ids=[f"{a}/{e}" for a, e in PAIRS])
def test_finder_counts_every_layer(corpus_model, arch, exporter):
    from modelsurgeon.models import corpus

    tb = _blocks(corpus_model(f"{arch}/{exporter}"))
    assert tb.problems == []
    cfg = corpus.ARCHS[arch][3]
    assert len(tb.blocks) == cfg.get("num_hidden_layers", cfg.get("n_layer")) == 2
    assert tb.layout == "pre-norm"
    assert tb.d_model == 64
    assert tb.final_norm is not None and tb.lm_head is not None
    for b in tb.blocks:
        assert b.attn_inputs and b.o is not None and b.down is not None and b.up is not None
        assert b.attn_norm.input is b.residual_in or b.attn_norm.input in _views(b.residual_in)
        # every projection reads a d-wide input or writes the d-wide stream
        assert all(lin.in_features == 64 for lin in b.attn_inputs + b.mlp_inputs)
        assert b.o.out_features == 64 and b.down.out_features == 64


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2/genai-fp32", "llama/optimum", "llama/dynamo18"])
def test_finder_labels_low_rank_gate_and_up(corpus_model, name):
    """After lowrank every projection is x @ A @ B: the gate is the one whose second factor feeds the activation
    (GenAI and Optimum name them by path, so no name decides it)."""
    import modelsurgeon
    from modelsurgeon.context import PassContext
    from modelsurgeon.pipeline import build_pipeline, parse_passes

    model = modelsurgeon.load(corpus_model(name))
    ctx = PassContext(model=model, progress=False)
    for p in build_pipeline(parse_passes("lowrank(ratio=0.7,method=svd)"), cleanup=False):
        ctx.model = model
        model = p.run(model, ctx).model
    complete_types(model)
    canonicalize(model)
    tb = find_blocks(model)
    assert tb.problems == [] and len(tb.blocks) == 2
    for b in tb.blocks:
        gate_b = _only_reader(b.gate.output)
        up_b = _only_reader(b.up.output)
        assert gate_b.op_type == up_b.op_type == "MatMul"  # the factors' second halves
        assert any(n.op_type == "Sigmoid" for n, _ in gate_b.outputs[0].uses())
        assert not any(n.op_type == "Sigmoid" for n, _ in up_b.outputs[0].uses())


def _only_reader(v):
    (node, _), = v.uses()
    return node


def _views(v):
    from modelsurgeon.analyses.blocks import views_of

    return views_of(v)


# drop-blocks and slice on one model of each kind of graph (the whole matrix is tests/test_corpus.py's)
CELLS = [
    ("llama/torchscript", "slice"),        # no-op Casts, Shape readers of the norms
    ("gemma/optimum-past", "slice"),       # legacy GELU written out, scaled embedding read by Shape, KV cache
    ("llama-tied/fp16", "slice"),          # RMSNorm inside Cast(float32) ... Cast(float16)
    ("gpt2/torchscript", "slice"),         # Conv1D views, widths read from Shape at run time, fused qkv
    ("gpt2/dynamo18", "slice"),            # Conv1D views with constant shapes, head behind a view
    ("phi3/genai-fp32", "slice"),          # skip norms, GroupQueryAttention with packed qkv
    ("gemma/genai-fp32", "drop-blocks"),   # tied table gathered through a Transpose
    ("llama-tied/genai-int4", "drop-blocks"),  # MatMulNBits, 4-bit tied table (GatherBlockQuantized)
    ("qwen2/optimum", "drop-blocks"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,pass_name", CELLS, ids=[f"{n}:{p}" for n, p in CELLS])
def test_structural_passes_verify(corpus_model, name, pass_name):
    from modelsurgeon.models import corpus

    out = corpus.run_cell(corpus_model(name), corpus.pass_spec(pass_name))
    assert out.expectation() == "verified", out.expectation()
    assert out.modified
    if pass_name == "slice":
        assert out.rel_l2 is not None and np.isfinite(out.rel_l2)


@pytest.mark.slow
@pytest.mark.parametrize("pass_name", ["fold-norms", "share", "slice"])
def test_weight_rewriting_passes_refuse_4bit_projections(corpus_model, pass_name):
    from modelsurgeon.models import corpus

    out = corpus.run_cell(corpus_model("llama/genai-int4"), corpus.pass_spec(pass_name))
    assert out.status == "refused"
    assert "already 4-bit (MatMulNBits)" in out.detail and "then quant4" in out.detail


@pytest.mark.slow
def test_fp16_fold_norms_keeps_float32_normalization(corpus_model):
    """The cast-wrapped norm is replaced by a norm that still computes in float32: error at fp16 round-off."""
    from modelsurgeon.models import corpus

    out = corpus.run_cell(corpus_model("llama/fp16"), corpus.pass_spec("fold-norms"))
    assert out.expectation() == "verified", out.expectation()
    assert out.rel_l2 < 2e-3


# ------------------------------------------------------------------------------------------------------------
# canonical.py on a hand-written graph (no exporter needed)
# ------------------------------------------------------------------------------------------------------------


def _skip_norm_model(bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    d = 8
    inits = [helper.make_tensor("gamma", TensorProto.FLOAT, [d], rng.normal(size=d).astype(np.float32)),
             helper.make_tensor("W", TensorProto.FLOAT, [d, 16], rng.normal(size=(d, 16)).astype(np.float32))]
    ins = ["x", "skip", "gamma"]
    if bias:
        inits.append(helper.make_tensor("b", TensorProto.FLOAT, [d], rng.normal(size=d).astype(np.float32)))
        ins.append("b")
    nodes = [
        helper.make_node("Identity", ["x_in"], ["x"]),
        helper.make_node("SkipSimplifiedLayerNormalization", ins, ["y", "", "", "sum"], domain="com.microsoft",
                         epsilon=1e-5),
        helper.make_node("MatMul", ["y", "W"], ["out"]),
        # a tied table: Gather rows of Transpose(W)
        helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
        helper.make_node("Gather", ["Wt", "ids"], ["rows"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [2, 3, d]),
         helper.make_tensor_value_info("skip", TensorProto.FLOAT, [2, 3, d]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 16]),
         helper.make_tensor_value_info("sum", TensorProto.FLOAT, [2, 3, d]),
         helper.make_tensor_value_info("rows", TensorProto.FLOAT, [2, 3, d])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def _run(proto: onnx.ModelProto, feeds):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("bias", [False, True])
def test_canonicalize_splits_skip_norms_and_untransposes_tied_tables_exactly(bias):
    proto = _skip_norm_model(bias)
    rng = np.random.default_rng(1)
    feeds = {"x_in": rng.normal(size=(2, 3, 8)).astype(np.float32),
             "skip": rng.normal(size=(2, 3, 8)).astype(np.float32),
             "ids": rng.integers(0, 16, size=(2, 3))}
    before = _run(proto, feeds)
    model = ir.serde.deserialize_model(proto)
    assert canonicalize(model) == 2
    ops = [n.op_type for n in model.graph]
    assert "SkipSimplifiedLayerNormalization" not in ops
    assert ops.count("Add") == (2 if bias else 1) and "SimplifiedLayerNormalization" in ops
    # the normalized value and the stream keep the skip norm's output names (heal finds the original's by them)
    norm = next(n for n in model.graph if n.op_type == "SimplifiedLayerNormalization")
    assert norm.outputs[0].name == "y" and norm.inputs[0].name == "sum"
    gather = next(n for n in model.graph if n.op_type == "Gather")
    assert gather.inputs[0].const_value is not None and gather.inputs[0].shape == ir.Shape([16, 8])
    assert "W" not in model.graph.initializers  # stored once, as the table
    after = _run(ir.serde.serialize_model(model), feeds)
    assert [o.shape for o in after] == [o.shape for o in before]
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert canonicalize(model) == 0  # idempotent


def test_passes_that_read_the_blocks_run_canonicalize_first(corpus_model):
    """The block finder only reads; drop-blocks (and share, fold-norms, lowrank, slice through fold-norms) bring in
    the `canonicalize` pass, once, and a GenAI graph's blocks are found only through it."""
    from modelsurgeon.pipeline import build_pipeline, parse_passes

    names = [p.name for p in build_pipeline(parse_passes("drop-blocks(n=1),slice,lowrank"), cleanup=False)]
    assert names == ["canonicalize", "drop-blocks", "fold-norms", "slice", "lowrank"]
    model = model_io.load(corpus_model("llama/genai-fp32"))
    complete_types(model)
    assert not find_blocks(model).blocks  # the fused skip norms hide the residual adds
    canonicalize(model)
    assert len(find_blocks(model).blocks) == 2


def test_canonicalize_ties_back_a_head_stored_as_a_copy_of_the_table(corpus_model):
    """The TorchScript exporter (Optimum) stores a tied head as a second copy of the embedding table; canonicalize
    makes the head read Transpose(table), drops the copy, and the outputs stay the same."""
    path = corpus_model("llama-tied/optimum")
    model = model_io.load(path)
    complete_types(model)
    before = len(model.graph.initializers)
    canonicalize(model)
    assert len(model.graph.initializers) == before - 1
    tb = find_blocks(model)
    assert tb.lm_head.transpose_node is not None and tb.lm_head.weight is tb.embedding.table
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 512, size=(2, 7)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(7), (2, 1))}
    want = ort.InferenceSession(str(path)).run(["logits"], feeds)[0]
    got = ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_canonicalize_keeps_skip_norm_whose_statistics_are_read():
    proto = _skip_norm_model(False)
    node = proto.graph.node[1]
    node.output[1] = "mean"
    proto.graph.output.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, None))
    model = ir.serde.deserialize_model(proto)
    canonicalize(model)
    assert "SkipSimplifiedLayerNormalization" in [n.op_type for n in model.graph]
