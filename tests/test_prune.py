"""prune and the channel_groups analysis: index mappings checked by numbers.

The central check is *dead channels*: zero every weight slice that belongs to chosen indices of a group (so
those channels carry exact zeros everywhere), then prune exactly those indices. Any index bookkeeping error
(a wrong Concat offset, a Reshape that splits heads the wrong way, a Slice bound not moved, a head count not
updated) changes the outputs; a correct rewrite reproduces them to float round-off.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import modelsurgeon
from modelsurgeon.analyses.channel_deps import channel_groups, constant_array, is_constant
from modelsurgeon.channel_surgery import PrunePlan, apply_plan
from modelsurgeon.errors import UserError
from modelsurgeon.passes.prune import keep_count
from modelsurgeon.runtime.session import run_model

LIGHT = pathlib.Path(importlib.util.find_spec("onnx").submodule_search_locations[0]) / "backend/test/data/light"


# ------------------------------------------------------------------------------------------ helpers

def load(path) -> ir.Model:
    return ir.load(str(path))


def kill(model: ir.Model, keep: dict[int, np.ndarray], groups=None) -> None:
    """Zero every constant slice at the positions that `keep` removes (in place)."""
    groups = groups or channel_groups(model)
    plan = PrunePlan(groups, keep)
    for value, lay in groups.layouts.items():
        if lay is None or not is_constant(value) or value.const_value is None:
            continue
        masks = plan.axis_masks(value)
        if not any(m is not None for m in masks):
            continue
        arr = np.array(constant_array(value))
        for axis, m in enumerate(masks):
            if m is not None:
                index = [slice(None)] * arr.ndim
                index[axis] = ~m
                arr[tuple(index)] = 0
        value.const_value = ir.tensor(arr, name=value.name)


def random_keep(groups, kinds: dict[str, float], seed: int = 0) -> dict[int, np.ndarray]:
    """Keep masks removing `ratio` of every prunable group of the given kinds, at random indices."""
    rng = np.random.default_rng(seed)
    keep = {}
    for g in groups.groups:
        if g.kind in kinds and g.prunable:
            k = keep_count(g.size, kinds[g.kind])
            if k < g.size:
                mask = np.zeros(g.size, bool)
                mask[rng.choice(g.size, k, replace=False)] = True
                keep[g.leaf] = mask
    return keep


def outputs(model: ir.Model, feeds) -> dict[str, np.ndarray]:
    return run_model(model, feeds)


def assert_close(ref: dict, got: dict, tol: float = 1e-5):
    assert ref.keys() == got.keys()
    for k in ref:
        assert ref[k].shape == got[k].shape, k
        err = np.linalg.norm(got[k] - ref[k]) / max(np.linalg.norm(ref[k]), 1e-12)
        assert err < tol, f"{k}: relative L2 {err:.3g}"


def make_model(nodes, inputs, outputs_, inits, opset=18) -> ir.Model:
    g = helper.make_graph(nodes, "g", inputs, outputs_, inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10 if opset >= 23 else 8
    return ir.serde.deserialize_model(proto)


def weight(name, shape, rng):
    return helper.make_tensor(name, TensorProto.FLOAT, shape, rng.standard_normal(shape).astype(np.float32).ravel())


def fvi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# ------------------------------------------------------------------------------------------ dead channels on the reference models

DEAD_CASES = [
    ("llama", 18, {"heads": 0.5, "ffn": 0.3, "hidden": 0.25}),
    ("resnet-bn", 18, {"channels": 0.3}),
    ("llama", 23, {"heads": 0.5, "ffn": 0.3, "hidden": 0.25}),
    ("bert", 18, {"heads": 0.25, "ffn": 0.3}),
    ("bert", 23, {"heads": 0.25, "ffn": 0.3}),
    ("opt", 18, {"heads": 0.25, "ffn": 0.3}),
    ("resnet", 18, {"channels": 0.3}),
    ("mlp", 18, {"ffn": 0.4}),
]


@pytest.mark.parametrize("kind,opset,ratios", DEAD_CASES, ids=[f"{k}{o}" for k, o, _ in DEAD_CASES])
def test_pruning_dead_channels_is_exact(reference_onnx, kind, opset, ratios):
    """The pass (magnitude importance) finds the zeroed channels and removing them leaves outputs unchanged."""
    from modelsurgeon.models import reference

    cfg = {"keep_batchnorm": True} if kind == "resnet-bn" else {}
    kind = kind.replace("-bn", "")
    model = load(reference_onnx(kind, opset=opset, **cfg))
    if cfg:
        assert any(n.op_type == "BatchNormalization" for n in model.graph)
    keep = random_keep(channel_groups(model), ratios)
    assert keep, "nothing to prune"
    kill(model, keep)
    feeds = reference.example_inputs(kind, batch=2, seq=7) if kind != "resnet" else reference.example_inputs(kind, batch=2)
    ref = outputs(model, feeds)
    spec = "prune(" + ",".join(f"{k}={v}" for k, v in ratios.items()) + ",multiple=1)"
    result = modelsurgeon.compile(model, spec, progress=False)
    row = result.report.rows[1]
    assert row.modified and row.notes["groups_pruned"] == len(keep)
    assert result.report.rows[-1].parameters < result.report.rows[0].parameters
    assert_close(ref, outputs(result.model, feeds))
    for a, b in zip(result.model.graph.inputs, model.graph.inputs):
        assert a.shape == b.shape


@pytest.mark.parametrize("opset", [18, 23])
def test_head_dim_and_rotary_pairs_exact(reference_onnx, opset):
    """Pruning inside heads: rotary halves stay paired (one group), Slice bounds move, the scale is kept."""
    from modelsurgeon.models import reference

    model = load(reference_onnx("llama", opset=opset))
    groups = channel_groups(model)
    head_dims = [g for g in groups.groups if g.kind == "head_dim"]
    rotary = [g for g in head_dims if any("q_proj" in m.value.name for m in g.members)]
    assert len(rotary) == 1 and rotary[0].size == 8  # half of head_dim 16, shared by q and k of every layer
    assert {m.value.name for m in rotary[0].members} >= {"layers.0.self_attn.k_proj.weight.T", "layers.1.self_attn.q_proj.weight.T"}
    keep = random_keep(groups, {"head_dim": 0.25, "head_group": 0.5}, seed=3)
    kill(model, keep, groups)
    feeds = reference.example_inputs("llama", batch=2, seq=9)
    ref = outputs(model, feeds)
    apply_plan(model, PrunePlan(groups, keep))
    assert_close(ref, outputs(model, feeds))
    q = model.graph.initializers["layers.0.self_attn.q_proj.weight.T"].const_value
    assert q.shape[1] == 2 * 1 * 12  # 2 kv heads x 1 query head per kv head x head size 2 * 6 (rotary pairs)


def test_ratio_zero_changes_nothing(reference_onnx):
    result = modelsurgeon.compile(reference_onnx("llama", opset=18), "prune(ratio=0)", progress=False)
    row = result.report.rows[1]
    assert not row.modified
    assert row.rel_l2 == 0.0
    assert row.parameters == result.report.rows[0].parameters


# ------------------------------------------------------------------------------------------ the eight (nine) light models

LIGHT_MODELS = sorted(p.stem.replace("light_", "") for p in LIGHT.glob("light_*.onnx"))


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_models_lose_macs_and_run(name):
    """30% of channels: the manager verifies checker, strict shape inference, an ORT run and output shapes."""
    result = modelsurgeon.compile(LIGHT / f"light_{name}.onnx", "prune(channels=0.3,multiple=1)", progress=False)
    before, after = result.report.rows[0].macs, result.report.rows[-1].macs
    assert after <= 0.8 * before, f"{name}: MACs {before} -> {after}"
    out = result.model.graph.outputs[0]
    ref = onnx.load(LIGHT / f"light_{name}.onnx").graph.output[0]
    assert [d for d in out.shape] == [d.dim_value for d in ref.type.tensor_type.shape.dim]


# ------------------------------------------------------------------------------------------ index mappings on small graphs

def test_concat_split_offsets_exact():
    """Two producers concatenated, split at a boundary inside the second, consumed separately."""
    rng = np.random.default_rng(0)
    inits = [weight("W1", [6, 8], rng), weight("W2", [6, 8], rng), weight("V1", [5, 3], rng), weight("V2", [11, 3], rng),
             helper.make_tensor("split", TensorProto.INT64, [2], [5, 11])]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("MatMul", ["x", "W2"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Split", ["r", "split"], ["s1", "s2"], axis=1),
             helper.make_node("MatMul", ["s1", "V1"], ["y1"]), helper.make_node("MatMul", ["s2", "V2"], ["y2"]),
             helper.make_node("Add", ["y1", "y2"], ["y"])]
    model = make_model(nodes, [fvi("x", ["n", 6])], [fvi("y", ["n", 3])], inits)
    groups = channel_groups(model)
    ffn = [g for g in groups.groups if g.kind == "ffn"]
    # W1's 8 columns: 5 to V1, 3 to V2 -> two groups; W2's 8 columns -> one group
    assert sorted(g.size for g in ffn) == [3, 5, 8]
    keep = random_keep(groups, {"ffn": 0.4}, seed=1)
    kill(model, keep, groups)
    feeds = {"x": rng.standard_normal((4, 6)).astype(np.float32)}
    ref = outputs(model, feeds)
    apply_plan(model, PrunePlan(groups, keep))
    assert_close(ref, outputs(model, feeds))
    split = [n for n in model.graph if n.op_type == "Split"][0]
    assert list(constant_array(split.inputs[1])) == [keep_count(5, 0.4), keep_count(3, 0.4) + keep_count(8, 0.4)]


def test_grouped_depthwise_shuffle_flatten_exact():
    """Grouped conv, channel shuffle (Reshape/Transpose/Reshape), depthwise conv, Flatten into Gemm."""
    rng = np.random.default_rng(0)
    inits = [weight("C1", [12, 3, 3, 3], rng), weight("B1", [12], rng), weight("C2", [16, 6, 1, 1], rng),
             weight("DW", [16, 1, 3, 3], rng), weight("FC", [5, 16 * 4 * 4], rng), weight("FB", [5], rng),
             helper.make_tensor("s1", TensorProto.INT64, [5], [0, 2, 8, 4, 4]),
             helper.make_tensor("s2", TensorProto.INT64, [4], [0, 16, 4, 4])]
    nodes = [helper.make_node("Conv", ["x", "C1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "C2"], ["c2"], group=2),
             helper.make_node("Reshape", ["c2", "s1"], ["sh1"]),
             helper.make_node("Transpose", ["sh1"], ["sh2"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["sh2", "s2"], ["sh3"]),
             helper.make_node("Conv", ["sh3", "DW"], ["c3"], group=16, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c3"], ["r3"]),
             helper.make_node("Flatten", ["r3"], ["f"]),
             helper.make_node("Gemm", ["f", "FC", "FB"], ["y"], transB=1)]
    model = make_model(nodes, [fvi("x", [2, 3, 4, 4])], [fvi("y", [2, 5])], inits)
    groups = channel_groups(model)
    assert not groups.unknown_ops
    keep = random_keep(groups, {"channels": 0.5}, seed=2)
    assert len(keep) >= 2
    kill(model, keep, groups)
    feeds = {"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32)}
    ref = outputs(model, feeds)
    apply_plan(model, PrunePlan(groups, keep))
    assert_close(ref, outputs(model, feeds))
    # after the shuffle, channel c = 2 * k + g: keeping channels per group prunes rows of C2 in both groups
    assert model.graph.initializers["FC"].const_value.shape[1] % 16 == 0


def test_groupnorm_convtranspose_einsum_exact():
    """Whole GroupNorm groups (tied to the groups of a grouped ConvTranspose), then Einsum."""
    rng = np.random.default_rng(0)
    inits = [weight("C1", [8, 4, 3, 3], rng), weight("S", [8], rng), weight("B", [8], rng),
             weight("CT", [8, 3, 2, 2], rng), weight("CB", [6], rng), weight("E", [6, 5], rng)]
    nodes = [helper.make_node("Conv", ["x", "C1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("GroupNormalization", ["c1", "S", "B"], ["gn"], num_groups=2),
             helper.make_node("ConvTranspose", ["gn", "CT", "CB"], ["ct"], group=2, strides=[2, 2]),
             helper.make_node("Relu", ["ct"], ["r"]),
             helper.make_node("Einsum", ["r", "E"], ["y"], equation="nchw,cd->nhwd")]
    model = make_model(nodes, [fvi("x", [2, 4, 5, 5])], [fvi("y", [2, 10, 10, 5])], inits, opset=21)
    groups = channel_groups(model)
    assert not groups.unknown_ops, groups.unknown_ops
    by_size = {g.size: g for g in groups.groups if g.prunable}
    assert set(by_size) == {2, 3, 4}  # groups, output channels per group, channels per GroupNorm group
    keep = {by_size[2].leaf: np.array([False, True]), by_size[3].leaf: np.array([True, False, True])}
    kill(model, keep, groups)
    feeds = {"x": rng.standard_normal((2, 4, 5, 5)).astype(np.float32)}
    ref = outputs(model, feeds)
    apply_plan(model, PrunePlan(groups, keep))
    assert_close(ref, outputs(model, feeds))
    ops = {n.op_type: n for n in model.graph}
    assert ops["GroupNormalization"].attributes["num_groups"].value == 1
    assert ops["ConvTranspose"].attributes["group"].value == 1
    assert model.graph.initializers["E"].const_value.shape == (2, 5)


def test_split_by_num_outputs_exact():
    rng = np.random.default_rng(0)
    inits = [weight("W", [4, 8], rng), weight("V1", [4, 3], rng), weight("V2", [4, 3], rng)]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Split", ["a"], ["s1", "s2"], axis=1, num_outputs=2),
             helper.make_node("MatMul", ["s1", "V1"], ["y1"]), helper.make_node("MatMul", ["s2", "V2"], ["y2"]),
             helper.make_node("Add", ["y1", "y2"], ["y"])]
    model = make_model(nodes, [fvi("x", ["n", 4])], [fvi("y", ["n", 3])], inits)
    groups = channel_groups(model)
    keep = {g.leaf: np.array([True, False, False, True]) if g.size == 4 else None for g in groups.groups if g.prunable}
    keep = {k: v for k, v in keep.items() if v is not None}
    assert len(keep) == 2
    keep[next(iter(keep))] = np.array([True, True, False, True])
    kill(model, keep, groups)
    feeds = {"x": rng.standard_normal((3, 4)).astype(np.float32)}
    ref = outputs(model, feeds)
    apply_plan(model, PrunePlan(groups, keep))
    assert_close(ref, outputs(model, feeds))
    split = [n for n in model.graph if n.op_type == "Split"][0]
    assert "num_outputs" not in split.attributes and list(constant_array(split.inputs[1])) == [3, 2]


def test_attention_op_gqa_3d_exact():
    """ONNX Attention (opset 23) with 3-D inputs: kv heads carry their query heads; head counts are rewritten."""
    rng = np.random.default_rng(0)
    h, qh, kvh, hd = 16, 4, 2, 4
    inits = [weight("Wq", [h, qh * hd], rng), weight("Wk", [h, kvh * hd], rng), weight("Wv", [h, kvh * hd], rng),
             weight("Wo", [qh * hd, h], rng)]
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"]), helper.make_node("MatMul", ["x", "Wk"], ["k"]),
             helper.make_node("MatMul", ["x", "Wv"], ["v"]),
             helper.make_node("Attention", ["q", "k", "v"], ["a"], q_num_heads=qh, kv_num_heads=kvh, is_causal=1),
             helper.make_node("MatMul", ["a", "Wo"], ["y"])]
    model = make_model(nodes, [fvi("x", ["b", "s", h])], [fvi("y", ["b", "s", h])], inits, opset=23)
    groups = channel_groups(model)
    kinds = sorted(g.kind for g in groups.groups if g.prunable)
    assert kinds == ["head_dim", "head_dim", "head_group", "heads"]
    keep = random_keep(groups, {"heads": 0.5, "head_group": 0.5, "head_dim": 0.25}, seed=4)
    kill(model, keep, groups)
    feeds = {"x": rng.standard_normal((2, 5, h)).astype(np.float32)}
    ref = outputs(model, feeds)
    apply_plan(model, PrunePlan(groups, keep))
    assert_close(ref, outputs(model, feeds))
    att = [n for n in model.graph if n.op_type == "Attention"][0]
    assert (att.attributes["q_num_heads"].value, att.attributes["kv_num_heads"].value) == (1, 1)
    assert att.attributes["scale"].value == pytest.approx(0.5)  # 1/sqrt(original head size 4)


def test_unknown_op_freezes_and_is_never_elementwise():
    rng = np.random.default_rng(0)
    inits = [weight("W1", [4, 8], rng), weight("W2", [8, 8], rng), weight("W3", [8, 3], rng)]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("LpNormalization", ["a"], ["b"], axis=1),
             helper.make_node("MatMul", ["b", "W2"], ["c"]), helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("MatMul", ["d", "W3"], ["y"])]
    model = make_model(nodes, [fvi("x", ["n", 4])], [fvi("y", ["n", 3])], inits)
    groups = channel_groups(model)
    assert groups.unknown_ops == {"unknown op LpNormalization": 1}
    by_member = {m.value.name: g for g in groups.groups for m in g.members if m.axis == 1 and m.value.name in ("W1", "W2")}
    assert not by_member["W1"].prunable and "unknown op LpNormalization" in by_member["W1"].frozen[0]
    assert by_member["W2"].prunable
    result = modelsurgeon.compile(model, "prune(ffn=0.5,multiple=1)", progress=False)
    assert result.model.graph.initializers["W1"].const_value.shape == (4, 8)
    assert result.model.graph.initializers["W2"].const_value.shape == (8, 4)
    assert any("unknown op LpNormalization" in s for s in result.report.rows[1].skipped)
    assert "unknown op LpNormalization x1" in groups.describe()


def test_shared_initializer_couples_its_users():
    rng = np.random.default_rng(0)
    inits = [weight("W", [4, 8], rng), weight("V1", [8, 3], rng), weight("V2", [8, 3], rng)]
    nodes = [helper.make_node("MatMul", ["x1", "W"], ["a"]), helper.make_node("MatMul", ["x2", "W"], ["b"]),
             helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Tanh", ["b"], ["tb"]),
             helper.make_node("MatMul", ["ra", "V1"], ["y1"]), helper.make_node("MatMul", ["tb", "V2"], ["y2"])]
    model = make_model(nodes, [fvi("x1", ["n", 4]), fvi("x2", ["n", 4])], [fvi("y1", ["n", 3]), fvi("y2", ["n", 3])], inits)
    groups = channel_groups(model)
    ffn = [g for g in groups.groups if g.kind == "ffn"]
    assert len(ffn) == 1 and {m.value.name for m in ffn[0].members} == {"W", "V1", "V2"}
    result = modelsurgeon.compile(model, "prune(ffn=0.25,multiple=1)", progress=False)
    inits = result.model.graph.initializers
    assert inits["W"].const_value.shape == (4, 6) and inits["V1"].const_value.shape == (6, 3)
    assert inits["V2"].const_value.shape == (6, 3)


def test_describe_and_graph(reference_onnx):
    groups = channel_groups(load(reference_onnx("opt", opset=18)))
    text = groups.describe()
    assert "heads:" in text and "ffn:" in text and "frozen" in text
    assert "layers.0.fc1.weight" in text
    edges = list(groups.graph.edges(data=True))
    assert any(d["mapping"].startswith("reshape split") for _, _, d in edges)
    assert any(d["op"] == "MatMul" for _, _, d in edges)


# ------------------------------------------------------------------------------------------ options

def test_options_and_rounding(reference_onnx):
    with pytest.raises(UserError, match="say how much"):
        modelsurgeon.compile(reference_onnx("mlp"), "prune", progress=False)
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        modelsurgeon.compile(reference_onnx("mlp"), "prune(ffn=1.5)", progress=False)
    assert keep_count(128, 0.3, 8) == 88 and keep_count(5, 0.99) == 1 and keep_count(6, 0.3, 8) == 4
    result = modelsurgeon.compile(reference_onnx("opt"), "prune(ffn=0.3)", progress=False)  # default multiple=8
    fc1 = result.model.graph.initializers["layers.0.fc1.weight.T"].const_value
    assert fc1.shape[1] % 8 == 0 and fc1.shape[1] < 256
    result = modelsurgeon.compile(reference_onnx("mlp"), "prune(ratio=0.99,multiple=1)", progress=False)
    assert all(min(v.const_value.shape, default=1) >= 1 for v in result.model.graph.initializers.values())
    assert result.report.rows[1].notes["ffn_kept"] == "2/128"  # one unit kept in each of the two layers


# ------------------------------------------------------------------------------------------ importance and reconstruction

def _calib(kind, n=16, seq=16, seed=1):
    from modelsurgeon.models import reference

    return reference.example_inputs(kind, batch=n, seq=seq, seed=seed)


@pytest.mark.parametrize("kind,spec", [("opt", "ffn=0.5"), ("resnet", "channels=0.4")])
def test_reconstruct_reduces_error(reference_onnx, kind, spec):
    calib = _calib(kind, n=32)
    errs = {}
    for rec in (False, True):
        result = modelsurgeon.compile(reference_onnx(kind), f"prune({spec},reconstruct={rec})", calibration=calib,
                                      progress=False, allow_degraded=True)  # random weights: top-1 is fragile
        errs[rec] = result.report.rows[1].rel_l2
        if rec:
            assert result.report.rows[1].notes["layers_refit"] >= 2
    assert errs[True] < 0.8 * errs[False], errs


def test_refit_memory_bounds_the_samples_it_holds(corpus_model, monkeypatch, caplog):
    """Optimum's BERT: past `refit_memory` the refit uses the first samples that fit, and says so; it then equals
    a refit given only those samples, and the live bytes it predicts per sample are the ones its runners hold."""
    from modelsurgeon import segment_runner

    path = str(corpus_model("bert/optimum"))
    rng = np.random.default_rng(0)
    n, seq = 24, 16
    calib = {"input_ids": rng.integers(5, 500, (n, seq)), "attention_mask": np.ones((n, seq), np.int64),
             "token_type_ids": np.zeros((n, seq), np.int64)}
    held, predicted = [], []
    advance, measure = segment_runner.SegmentRunner.advance, segment_runner.live_bytes_per_sample

    def advance_and_weigh(self, stop, name):
        out = advance(self, stop, name)
        held.append(sum(a.nbytes for st in self.state for a in st.values()))
        return out
    monkeypatch.setattr(segment_runner.SegmentRunner, "advance", advance_and_weigh)
    monkeypatch.setattr(segment_runner, "live_bytes_per_sample", lambda *a: predicted.append(measure(*a)) or predicted[-1])
    spec = "prune(heads=0.5,ffn=0.5,multiple=1,reconstruct=true{})"

    def weights(data, extra=""):
        result = modelsurgeon.compile(path, spec.format(extra), calibration=data, progress=False, allow_degraded=True,
                                      holdout=0)
        return result.report.rows[1].notes, {k: v.const_value.numpy() for k, v in result.model.graph.initializers.items()}

    with caplog.at_level("WARNING", logger="modelsurgeon"):
        notes, bounded = weights(calib, ",refit_memory=0.000001")
    assert notes["refit_samples"] == 8 and notes["layers_refit"] >= 1
    assert "refit on the first 8 of 24 calibration samples" in notes["refit_note"] and "refit_memory" in caplog.text
    _, first8 = weights({k: v[:8] for k, v in calib.items()})
    assert bounded.keys() == first8.keys() and all(np.array_equal(bounded[k], first8[k]) for k in bounded)
    held.clear()
    notes, everything = weights(calib)
    assert notes["refit_samples"] == 24 and "refit_note" not in notes
    assert any(not np.array_equal(everything[k], first8[k]) for k in first8)
    steps = len(held) // 2  # the original's runner and the pruned model's advance in turn
    most = max(a + b for a, b in zip(held[0::2][:steps], held[1::2][:steps]))
    assert most == pytest.approx(predicted[-1] * n, rel=0.05), (most, predicted[-1] * n)


def test_activation_importance_follows_activations():
    """Wanda: a channel fed by an input feature that is tiny on the calibration data is unimportant, however
    large its weights. Magnitude keeps channels 0-3 (larger consumer rows); activation keeps 4-7."""
    rng = np.random.default_rng(0)
    w1 = np.zeros((4, 8), np.float32)
    w1[0, :4] = 1.0  # channels 0-3 read input feature 0 only
    w1[1:, 4:] = rng.standard_normal((3, 4)).astype(np.float32)
    w1 /= np.linalg.norm(w1, axis=0, keepdims=True)
    w2 = rng.standard_normal((8, 3)).astype(np.float32)
    w2 /= np.linalg.norm(w2, axis=1, keepdims=True)
    w2[:4] *= 1.5
    inits = [helper.make_tensor("W1", TensorProto.FLOAT, [4, 8], w1.ravel()),
             helper.make_tensor("W2", TensorProto.FLOAT, [8, 3], w2.ravel())]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("MatMul", ["a", "W2"], ["y"])]
    x = rng.standard_normal((64, 4)).astype(np.float32)
    x[:, 0] *= 0.01
    kept = {}
    for imp in ("magnitude", "activation"):
        model = make_model(nodes, [fvi("x", ["n", 4])], [fvi("y", ["n", 3])], inits)
        result = modelsurgeon.compile(model, f"prune(ffn=0.5,importance={imp},multiple=1)", calibration={"x": x}, progress=False)
        w2_new = result.model.graph.initializers["W2"].const_value.numpy()
        kept[imp] = sorted(int(np.argmin(np.abs(w2 - row).sum(axis=1))) for row in w2_new)
    assert kept == {"magnitude": [0, 1, 2, 3], "activation": [4, 5, 6, 7]}
