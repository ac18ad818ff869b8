"""prune on torchvision's twelve (issue 15 item 4), and the channel rules and rounding that make it reach them.

`ratio` is a fraction of the MACs: each of the twelve must lose 25-35% of its MACs (measured by the compile report on
an ORT run, not the pass's own estimate) at prune(ratio=0.3), verified. The small graphs check the rules it needed
by dead channels (zero what will be pruned, prune it, the outputs must not move), as tests/test_prune.py does.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import modelsurgeon
from modelsurgeon.analyses.channel_deps import channel_groups
from modelsurgeon.channel_surgery import PrunePlan, apply_plan
from modelsurgeon.models import corpus
from modelsurgeon.passes.prune import rounding_step, solve_channel_ratio
from modelsurgeon.runtime.session import run_model

from tests.test_prune import assert_close, kill, make_model, random_keep

RNG = np.random.default_rng(0)


def w(name, shape):
    return helper.make_tensor(name, TensorProto.FLOAT, shape, RNG.standard_normal(shape).astype(np.float32).ravel())


def ints(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], list(values))


def fvi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def dead_channel_check(model: ir.Model, feeds, kinds: dict[str, float], tol=1e-5):
    """Prune randomly chosen indices of every prunable group of `kinds` after zeroing them: outputs must not move."""
    groups = channel_groups(model)
    keep = random_keep(groups, kinds)
    assert keep, groups.describe()
    kill(model, keep, groups)
    ref = run_model(model, feeds)
    stats = apply_plan(model, PrunePlan(channel_groups(model), keep))
    assert_close(ref, run_model(model, feeds), tol)
    return groups, stats


# ------------------------------------------------------------------------------------------ the rules

def test_slice_off_index_boundaries_freezes_only_its_axis():
    """torch.roll of a [batch, 2 x 3, C] tensor: Slices at offset 4 of a 2 x 3 axis. The sliced axis is frozen; the
    32 hidden units are still prunable (the Slice used to freeze every axis it touched)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Reshape", ["h", "s4"], ["h4"]), helper.make_node("Reshape", ["h4", "s3"], ["h3"]),
             helper.make_node("Slice", ["h3", "a0", "a4", "ax1"], ["p"]),
             helper.make_node("Slice", ["h3", "a4", "a6", "ax1"], ["q"]),
             helper.make_node("Concat", ["q", "p"], ["r"], axis=1), helper.make_node("Relu", ["r"], ["t"]),
             helper.make_node("MatMul", ["t", "w2"], ["y"])]
    inits = [w("w1", [16, 32]), w("w2", [32, 16]), ints("s4", [2, 2, 3, 32]), ints("s3", [2, 6, 32]),
             ints("a0", [0]), ints("a4", [4]), ints("a6", [6]), ints("ax1", [1])]
    model = make_model(nodes, [fvi("x", [2, 6, 16])], [fvi("y", [2, 6, 16])], inits)
    groups, stats = dead_channel_check(model, {"x": RNG.standard_normal((2, 6, 16)).astype(np.float32)}, {"ffn": 0.25})
    assert [g.size for g in groups.groups if g.prunable] == [32]
    assert not groups.unknown_ops
    assert any("does not fall on index boundaries" in r for rs in groups.atoms.frozen.values() for r in rs)


def test_scatter_nd_ties_the_updates_to_the_data_channels():
    """ScatterND writes rows of updates into data: the trailing (channel) axes of both are one index space."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["d"]), helper.make_node("MatMul", ["u", "w3"], ["upd"]),
             helper.make_node("ScatterND", ["d", "idx", "upd"], ["s"]), helper.make_node("Relu", ["s"], ["t"]),
             helper.make_node("MatMul", ["t", "w2"], ["y"])]
    idx = helper.make_tensor("idx", TensorProto.INT64, [2, 1], [1, 3])
    inits = [w("w1", [16, 32]), w("w3", [16, 32]), w("w2", [32, 8]), idx]
    model = make_model(nodes, [fvi("x", [4, 16]), fvi("u", [2, 16])], [fvi("y", [4, 8])], inits)
    feeds = {"x": RNG.standard_normal((4, 16)).astype(np.float32), "u": RNG.standard_normal((2, 16)).astype(np.float32)}
    groups, _ = dead_channel_check(model, feeds, {"ffn": 0.25})
    (g,) = [g for g in groups.groups if g.prunable]
    assert {m.value.name for m in g.members} >= {"w1", "w3", "w2"}


def test_identity_gather_of_as_strided_is_rewired():
    """torch exports as_strided of a contiguous [2, 32] tensor as Gather(Reshape(x, [-1]), 32 i + j): the analysis
    sees the identity, so the 32 channels stay prunable, and the rewrite reads x instead (the offsets were for 32)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Reshape", ["h", "flat"], ["f"]),
             helper.make_node("Range", ["zero", "two", "one"], ["rows"]),
             helper.make_node("Mul", ["rows", "c32"], ["rows32"]),
             helper.make_node("Unsqueeze", ["rows32", "ax1"], ["rows2d"]),
             helper.make_node("Add", ["rows2d", "cols"], ["idx"]),
             helper.make_node("Gather", ["f", "idx"], ["g"], axis=0), helper.make_node("Relu", ["g"], ["t"]),
             helper.make_node("MatMul", ["t", "w2"], ["y"])]
    scalar = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [], [v])  # noqa: E731
    inits = [w("w1", [16, 32]), w("w2", [32, 8]), ints("flat", [-1]), scalar("zero", 0), scalar("two", 2),
             scalar("one", 1), scalar("c32", 32), ints("ax1", [1]),
             helper.make_tensor("cols", TensorProto.INT64, [1, 32], list(range(32)))]
    model = make_model(nodes, [fvi("x", [2, 16])], [fvi("y", [2, 8])], inits)
    groups, stats = dead_channel_check(model, {"x": RNG.standard_normal((2, 16)).astype(np.float32)}, {"ffn": 0.25})
    assert [g.size for g in groups.groups if g.prunable] == [32] and not groups.unknown_ops
    assert stats["attributes_rewritten"] == 1 and not any(n.op_type == "Gather" for n in model.graph)


def test_split_of_a_channel_shuffle_says_why_it_freezes():
    """ShuffleNet's later units split a shuffle of a shuffle at an offset inside a product: frozen, with the reason."""
    from modelsurgeon.analyses.channel_deps import Builder
    from modelsurgeon.analyses.channel_index_rules import _split  # noqa: F401 - the rule under test

    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]),
             helper.make_node("Reshape", ["a", "s5"], ["a5"]), helper.make_node("Transpose", ["a5"], ["t5"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t5", "s4"], ["sh"]),  # shuffle of 2 groups of 6: channels 6 x 2
             helper.make_node("Split", ["sh", "halves"], ["p", "q"], axis=1),  # at 6 of 6 x 2: fine
             helper.make_node("Split", ["p", "thirds"], ["p1", "p2"], axis=1),  # at 3 of 3 x 2: cuts the product
             helper.make_node("Concat", ["p1", "p2", "q"], ["y"], axis=1)]
    inits = [w("w1", [12, 4, 1, 1]), ints("s5", [1, 2, 6, 2, 2]), ints("s4", [1, 12, 2, 2]), ints("halves", [6, 6]),
             ints("thirds", [3, 3])]
    model = make_model(nodes, [fvi("x", [1, 4, 2, 2])], [fvi("y", [1, 12, 2, 2])], inits)
    b = Builder(model)
    b.run()
    assert list(b.unknown_ops) == ["Split not understood"]
    reasons = [r for rs in b.atoms.frozen.values() for r in rs]
    assert any("a channel shuffle cannot be split at 0" in r for r in reasons), reasons


def test_grouped_conv_rounds_whole_groups():
    """RegNet-style block, 10 groups of 16: multiple=8 rounds the total (groups x width), not the width, so 30% of
    the channels keeps 12 per group (120 = 15 x 8), where rounding the width to 8 would halve it."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["b"], group=10, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["b1"]), helper.make_node("Conv", ["b1", "w3"], ["y"])]
    inits = [w("w1", [160, 8, 1, 1]), w("w2", [160, 16, 3, 3]), w("w3", [8, 160, 1, 1])]
    model = make_model(nodes, [fvi("x", [1, 8, 6, 6])], [fvi("y", [1, 8, 6, 6])], inits)
    groups = channel_groups(model)
    widths = [g for g in groups.groups if g.prunable and g.size == 16]  # inputs and outputs of each group
    assert len(widths) == 2 and all(rounding_step(groups, g, 8) == 4 and rounding_step(groups, g, 1) == 1 for g in widths)
    result = modelsurgeon.compile(model, "prune(channels=0.3)", progress=False)
    conv = next(n for n in result.model.graph if n.op_type == "Conv" and n.attributes.get("group") is not None)
    assert conv.attributes["group"].value == 10 and tuple(conv.inputs[1].const_value.shape) == (120, 12, 3, 3)


def test_ratio_is_a_mac_target_and_a_shortfall_warns(reference_onnx, caplog):
    """prune(ratio=r) removes about r of the MACs (the report's own count, from an ORT run); when frozen channels
    leave too little, the notes and the log say how far off it is."""
    result = modelsurgeon.compile(reference_onnx("resnet"), "prune(ratio=0.3,multiple=1)", progress=False)
    before, row = result.report.rows[0], result.report.rows[1]
    assert 0.25 <= 1 - row.macs / before.macs <= 0.35
    assert row.notes["macs_requested"] == 0.3 and abs(row.notes["macs_removed"] - 0.3) < 0.05
    assert "warning" not in row.notes
    # a big input->output MatMul (frozen: model input and output channels) beside a small prunable branch
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["y0"]), helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y1"]),
             helper.make_node("Add", ["y0", "y1"], ["y"])]
    inits = [w("w0", [64, 64]), w("w1", [64, 16]), w("w2", [16, 64])]
    model = make_model(nodes, [fvi("x", [2, 64])], [fvi("y", [2, 64])], inits)
    with caplog.at_level("WARNING", logger="modelsurgeon"):
        result = modelsurgeon.compile(model, "prune(ratio=0.3,multiple=1)", progress=False)
    notes = result.report.rows[1].notes
    assert notes["macs_removed"] < 0.25 and "where 30.0% was asked" in notes["warning"]
    assert any("where 30.0% was asked" in r.getMessage() for r in caplog.records)


def test_solve_channel_ratio_brackets_the_target():
    steps = lambda r: 1 - (1 - round(r * 10) / 10) ** 2  # noqa: E731 - a CNN's MACs at 10% steps of channels
    assert solve_channel_ratio(steps, 0.36) == pytest.approx(0.2, abs=0.05)
    assert solve_channel_ratio(lambda r: 0.1 * r, 0.3) == 0.6  # unreachable: stops at twice the target


# ------------------------------------------------------------------------------------------ the twelve

# What the channel analysis still does not understand, per model (everything else must be understood).
KNOWN_UNKNOWN = {"shufflenet_v2_x1_0": {"Split not understood"}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(corpus.TORCHVISION))
def test_prune_torchvision_reaches_the_mac_target(name):
    try:
        path = corpus.entry(f"tv-{name}/{corpus.TV_EXPORTER}").path()
    except corpus.Unavailable as exc:
        pytest.skip(str(exc))
    groups = channel_groups(ir.load(str(path)))
    assert set(groups.unknown_ops) <= KNOWN_UNKNOWN.get(name, set()), groups.unknown_ops
    result = modelsurgeon.compile(str(path), "prune(ratio=0.3)", progress=False)  # verified, or it raises
    before, after = result.report.rows[0], result.report.rows[1]
    removed = 1 - after.macs / before.macs
    assert 0.25 <= removed <= 0.35, f"{name}: {removed:.3f} of the MACs removed"
    assert after.notes["groups_pruned"] > 0 and "warning" not in after.notes
