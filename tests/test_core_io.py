"""IR loading/saving (external data, atomicity, never overwriting the input) and torch lowering."""

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

import modelsurgeon
from modelsurgeon import model_io
from modelsurgeon.errors import UserError
from modelsurgeon.runtime import run_model


def matmul_model(n=64) -> ir.Model:
    w = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                          [onnx.numpy_helper.from_array(w, "W")])
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


def test_save_with_external_data_roundtrip(tmp_path):
    model = matmul_model()
    out = model_io.save(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size == 64 * 64 * 4
    assert out.stat().st_size < 1000
    x = np.ones((2, 64), np.float32)
    y = run_model(model_io.load(out), {"x": x})["y"]
    np.testing.assert_allclose(y, x @ model.graph.initializers["W"].const_value.numpy(), rtol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]  # no temporary leftovers


def test_large_models_get_external_data_automatically(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    model_io.save(matmul_model(), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 10**9)
    model_io.save(matmul_model(), tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()


def test_missing_external_data_is_a_user_error(tmp_path):
    model_io.save(matmul_model(), tmp_path / "m.onnx", external_data=True)
    os.remove(tmp_path / "m.onnx.data")
    with pytest.raises(UserError, match="external data file 'm.onnx.data'.*missing"):
        model_io.load(tmp_path / "m.onnx")


def test_refuses_to_overwrite_input(tmp_path):
    path = model_io.save(matmul_model(), tmp_path / "m.onnx")
    before = path.read_bytes()
    with pytest.raises(UserError, match="is the input model"):
        modelsurgeon.compile(str(path), "cleanup").save(path)
    assert path.read_bytes() == before


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", boom)
    with pytest.raises(UserError, match="could not write"):
        model_io.save(matmul_model(), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_unknown_domain_refused():
    model = matmul_model()
    node = ir.Node("my.custom.domain", "Frobnicate", inputs=[model.graph.inputs[0]])
    model.graph.append(node)
    with pytest.raises(UserError, match="unknown domain 'my.custom.domain'.*Frobnicate"):
        model_io.check_domains(model)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 5)
        self.b = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("kind", ["module", "graph_module", "exported_program"])
def test_lower_torch_inputs(kind):
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(2, 6)
    obj = {"module": net, "graph_module": torch.fx.symbolic_trace(net),
           "exported_program": torch.export.export(net, (x,))}[kind]
    result = modelsurgeon.compile(obj, "cleanup", example_inputs=(x,))
    got = run_model(result.model, {result.model.graph.inputs[0].name: x.numpy()})
    np.testing.assert_allclose(next(iter(got.values())), net(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_lower_torch_needs_example_inputs():
    with pytest.raises(UserError, match="example inputs"):
        modelsurgeon.compile(_Net(), "cleanup")


@pytest.mark.parametrize("opset", [18, 23])
def test_lower_at_opset(opset):
    model = model_io.from_torch(_Net(), (torch.randn(2, 6),), opset=opset)
    assert model.opset_imports[""] == opset


def test_external_weights_stay_mapped_and_still_run(tmp_path, monkeypatch):
    """Weights in external data are not read on load: verification, capture and MACs read them in place, and the
    output gets a data file of its own."""
    from modelsurgeon.capture import capture
    from modelsurgeon.calibration import synthesize

    monkeypatch.setattr(model_io, "SMALL_TENSOR_BYTES", 1024)  # W (16 KiB) counts as a large weight
    ir.save(matmul_model(), tmp_path / "big.onnx", external_data="big.onnx.data", size_threshold_bytes=0)
    model = model_io.load(tmp_path / "big.onnx")
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)
    data = synthesize(model, num_samples=3)
    got = capture(model, ["y"], data)["y"]
    np.testing.assert_allclose(got, data.arrays["x"] @ model.graph.initializers["W"].const_value.numpy(), rtol=1e-5)
    result = modelsurgeon.compile(str(tmp_path / "big.onnx"), "cleanup")
    assert result.report.rows[0].macs == 64 * 64
    out = result.save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").exists()


EXTERNAL_PIPELINES = ["cleanup", "prune(ratio=0.25,importance=activation,reconstruct=true)", "lowrank(ratio=0.3)",
                      "slice(sparsity=0.25),quant4(algo=gptq)", "spquant", "share(groups=2,correct=lowrank(4)),eora(rank=4)",
                      "drop-blocks(n=1),quant4(algo=awq)", "quant8", "quant4(lm_head=true,embeddings=true)"]


@pytest.fixture(scope="module")
def external_llama(reference_onnx, tmp_path_factory):
    """The reference llama with every tensor, shapes and axes included, in an external data file (as exporters
    with a zero size threshold write them): loaded, its large weights stay memory-mapped from that file."""
    folder = tmp_path_factory.mktemp("external-llama")
    path = folder / "llama.onnx"
    onnx.save(onnx.load(reference_onnx("llama")), path, save_as_external_data=True, location="llama.onnx.data",
              size_threshold=0)
    return path


@pytest.mark.parametrize("passes", EXTERNAL_PIPELINES)
def test_every_pass_runs_on_weights_read_in_place(external_llama, tmp_path, passes, monkeypatch):
    monkeypatch.setattr(model_io, "SMALL_TENSOR_BYTES", 1024)  # the tiny model's weights stay mapped, not read
    before = {p.name: p.read_bytes() for p in external_llama.parent.iterdir()}
    model = model_io.load(external_llama)
    weights = [v for v in model.graph.initializers.values() if v.const_value.nbytes >= 4096]
    assert weights and all(isinstance(v.const_value, ir.ExternalTensor) for v in weights)
    out = modelsurgeon.compile(str(external_llama), passes, progress=False).save(tmp_path / "out.onnx")
    assert {p.name: p.read_bytes() for p in external_llama.parent.iterdir()} == before
    ids = np.random.default_rng(0).integers(0, 256, (1, 16)).astype(np.int64)
    logits = run_model(str(out), {"input_ids": ids})
    assert all(np.all(np.isfinite(v)) for v in logits.values())
