"""Pass manager: --passes parsing, pipeline files, requirements, ordering, options, analyses."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import modelsurgeon
from modelsurgeon.analysis import AnalysisManager, register_analysis
from modelsurgeon.errors import UserError, VerificationError
from modelsurgeon.pass_api import Option, Pass, PassResult, Stage, register_pass
from modelsurgeon.pipeline import build_pipeline, load_pipeline_file, parse_passes


def tiny_model() -> ir.Model:
    """y = relu(x @ W + b) @ W2, fixed small shapes."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("W", TensorProto.FLOAT, [8, 16], rng.standard_normal((8, 16)).astype(np.float32).ravel())
    b = helper.make_tensor("b", TensorProto.FLOAT, [16], rng.standard_normal(16).astype(np.float32))
    w2 = helper.make_tensor("W2", TensorProto.FLOAT, [16, 4], rng.standard_normal((16, 4)).astype(np.float32).ravel())
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h0"]), helper.make_node("Add", ["h0", "b"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "W2"], ["y"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w, b, w2])
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


# --- test passes registered once for this module -------------------------------------------------------------
@register_pass
class _Needy(Pass):
    name = "test-needy"
    requires = ("test-prereq",)

    def run(self, model, ctx):
        return PassResult(model, False)


@register_pass
class _Prereq(Pass):
    name = "test-prereq"

    def run(self, model, ctx):
        return PassResult(model, False)


@register_pass
class _Quant(Pass):
    name = "test-quant"
    stage = Stage.QUANTIZE
    options = {"bits": Option(int, 4, "bits", choices=(4, 8)), "ratio": Option(float, 0.5, "ratio",
                                                                             check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)")}

    def run(self, model, ctx):
        return PassResult(model, False)


@register_pass
class _ScaleOutputs(Pass):
    """Multiplies the first weight by `factor` (changes outputs unless factor == 1)."""

    name = "test-scale"
    options = {"factor": Option(float, 1.0), "exact_claim": Option(bool, False)}

    def run(self, model, ctx):
        w = model.graph.initializers["W2"]
        w.const_value = ir.tensor(w.const_value.numpy() * self.config["factor"])
        return PassResult(model, self.config["factor"] != 1.0)


@register_pass
class _ClaimsExact(_ScaleOutputs):
    name = "test-claims-exact"
    exact = True


@register_pass
class _Breaks(Pass):
    """Leaves a node reading a value that nothing produces."""

    name = "test-breaks"

    def run(self, model, ctx):
        node = next(n for n in model.graph if n.op_type == "Relu")
        node.replace_input_with(0, ir.Value(name="dangling", type=ir.TensorType(ir.DataType.FLOAT)))
        return PassResult(model, True)


_COUNTS = {"n": 0}


@register_analysis("test-count")
def _count_analysis(model, ctx):
    _COUNTS["n"] += 1
    return len(model.graph)


@register_pass
class _ReadsAnalysis(Pass):
    name = "test-reads"
    analyses = ("test-count",)
    options = {"modify": Option(bool, False), "keep": Option(bool, False)}

    def run(self, model, ctx):
        ctx.analysis("test-count")
        return PassResult(model, self.config["modify"])

    @property
    def preserves(self):  # instance-level: preserve when asked
        return ("test-count",) if self.config["keep"] else ()


# --- parsing --------------------------------------------------------------------------------------------------
def test_parse_passes_names_and_options():
    assert parse_passes("slice(sparsity=0.25),quant4(block=32,algo=gptq)") == [
        ("slice", {"sparsity": "0.25"}), ("quant4", {"block": "32", "algo": "gptq"})]
    assert parse_passes(" cleanup , dce ") == [("cleanup", {}), ("dce", {})]
    assert parse_passes("share(correct=lowrank(8),groups=2)") == [("share", {"correct": "lowrank(8)", "groups": "2"})]
    # a pipeline written over several lines (a shell script): line breaks and indentation between passes
    assert parse_passes("prune(ffn=0.3),\n    heal(mode=e2e,\n  rank=8)\t,\nquant4") == [
        ("prune", {"ffn": "0.3"}), ("heal", {"mode": "e2e", "rank": "8"}), ("quant4", {})]


@pytest.mark.parametrize("bad", ["", "slice(", "slice(sparsity)", "slice(a=1,a=2)", "3d", "slice) x", "a(b=1)c",
                                 "slice,\n  3d"])
def test_parse_passes_rejects_malformed(bad):
    with pytest.raises(UserError) as e:
        parse_passes(bad)
    assert "\n" not in str(e.value)


def test_unknown_pass_and_option_list_valid_ones():
    with pytest.raises(UserError, match="valid passes: .*cleanup"):
        build_pipeline(parse_passes("nosuchpass"))
    with pytest.raises(UserError, match="unknown option 'bitz'; valid options: bits, ratio"):
        build_pipeline(parse_passes("test-quant(bitz=4)"))
    with pytest.raises(UserError, match="must be one of 4, 8"):
        build_pipeline(parse_passes("test-quant(bits=3)"))
    with pytest.raises(UserError, match="must be a int"):
        build_pipeline(parse_passes("test-quant(bits=four)"))
    with pytest.raises(UserError, match=r"must be in \[0, 1\)"):
        build_pipeline(parse_passes("test-quant(ratio=1.5)"))


def test_options_are_typed():
    (p, _cleanup) = build_pipeline(parse_passes("test-quant(bits=8,ratio=0.25)"))
    assert p.config == {"bits": 8, "ratio": 0.25}
    assert repr(p) == "test-quant(bits=8,ratio=0.25)"


def test_requirements_inserted_once_before_user():
    names = [p.name for p in build_pipeline(parse_passes("test-needy"))]
    assert names == ["test-prereq", "test-needy", "cleanup"]
    names = [p.name for p in build_pipeline(parse_passes("test-prereq,test-needy"), cleanup=False)]
    assert names == ["test-prereq", "test-needy"]


def test_quantizing_pass_must_come_last_with_the_right_order_in_the_message():
    with pytest.raises(UserError) as e:
        build_pipeline(parse_passes("test-quant,test-needy"))
    msg = str(e.value)
    assert "cannot run after quantizing pass 'test-quant'" in msg
    assert "test-prereq,test-needy,test-quant" in msg
    build_pipeline(parse_passes("test-needy,test-quant,cleanup"))  # cleanup may follow quantization


def test_pipeline_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"passes": ["dce", {"name": "test-quant", "options": {"bits": 8}}]}))
    specs = load_pipeline_file(f)
    assert specs == [("dce", {}), ("test-quant", {"bits": 8})]
    assert build_pipeline(specs)[1].config["bits"] == 8
    f.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_pipeline_file(f)
    f.write_text(json.dumps([{"options": {}}]))
    with pytest.raises(UserError):
        load_pipeline_file(f)


# --- manager --------------------------------------------------------------------------------------------------
def test_analysis_cached_until_a_modifying_pass_invalidates_it():
    _COUNTS["n"] = 0
    modelsurgeon.compile(tiny_model(), "test-reads,test-reads", cleanup=False, verify=False)
    assert _COUNTS["n"] == 1  # second pass reuses the cached analysis
    _COUNTS["n"] = 0
    modelsurgeon.compile(tiny_model(), "test-reads(modify=true),test-reads", cleanup=False, verify=False)
    assert _COUNTS["n"] == 2  # invalidated by the modifying pass
    _COUNTS["n"] = 0
    modelsurgeon.compile(tiny_model(), "test-reads(modify=true,keep=true),test-reads", cleanup=False, verify=False)
    assert _COUNTS["n"] == 1  # the modifying pass preserved it


def test_analysis_manager_invalidate_keeps_preserved():
    am = AnalysisManager()
    model = tiny_model()
    from modelsurgeon.context import PassContext

    ctx = PassContext(model=model, analyses=am)
    assert am.get("test-count", model, ctx) == 4
    am.invalidate(("test-count",))
    assert am.cached() == ["test-count"]
    am.invalidate(())
    assert am.cached() == []


def test_verification_reports_error_per_pass():
    result = modelsurgeon.compile(tiny_model(), "test-scale(factor=1.01)", cleanup=False)
    row = result.report.rows[-1]
    assert row.modified and row.rel_l2 == pytest.approx(0.01, rel=1e-3)
    assert row.cosine == pytest.approx(1.0, abs=1e-6)
    assert set(row.per_output) == {"y"}


def test_max_error_names_the_pass_that_crossed_it():
    with pytest.raises(VerificationError, match="pass 'test-scale'.*exceeds --max-error 0.005"):
        modelsurgeon.compile(tiny_model(), "test-scale(factor=1.01)", max_error=0.005)
    modelsurgeon.compile(tiny_model(), "test-scale(factor=1.001)", max_error=0.005)


def test_exact_pass_that_changes_outputs_is_caught():
    with pytest.raises(VerificationError, match="test-claims-exact.*exact rewrite changed the outputs"):
        modelsurgeon.compile(tiny_model(), "test-claims-exact(factor=1.1)")
    modelsurgeon.compile(tiny_model(), "test-claims-exact(factor=1.0)")


def test_broken_graph_is_caught_even_without_verify_run():
    for verify in (True, False):
        with pytest.raises(VerificationError, match="test-breaks"):
            modelsurgeon.compile(tiny_model(), "test-breaks", verify=verify)


def test_symbolic_dims_are_bound_for_verification():
    result = modelsurgeon.compile(tiny_model(), "cleanup")
    assert result.report.rows[-1].max_abs == 0.0
    assert result.report.rows[0].macs == 8 * 16 + 16 * 4  # one sample: batch bound to 1 for MACs


def test_input_structural_problem_is_not_blamed_on_a_pass(tmp_path):
    """An input that ORT runs but strict shape inference rejects (an output declared narrower than computed):
    the compile warns once and checks passes for new problems only (it used to stop at 'cleanup broke the model')."""
    w = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
                          [onnx.numpy_helper.from_array(w, "W")])
    path = tmp_path / "declared-too-narrow.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    result = modelsurgeon.compile(str(path), "cleanup", progress=False)
    assert result.report.rows[-1].rel_l2 == 0.0
    with pytest.raises(VerificationError, match="quant4"):  # a pass that does break something is still named
        modelsurgeon.compile(str(path), "quant4(lm_head=true)", max_error=1e-9, progress=False)
