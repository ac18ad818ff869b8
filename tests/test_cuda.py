"""The CUDA provider path: compiled models run on ONNX Runtime's CUDA provider and match the CPU provider.

Needs onnxruntime-gpu and a CUDA device; skipped otherwise (CI has neither). Our custom operator has no CUDA
kernel yet: its nodes run on the CPU provider beside the CUDA ones (ORT places them), or as the in-model ONNX
function, which CUDA runs like any other subgraph.
"""

from __future__ import annotations

import numpy as np
import pytest

import modelsurgeon
from modelsurgeon.calibration import synthesize
from modelsurgeon.runtime.session import make_session

CUDA = "CUDAExecutionProvider"


def _cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover
        return False
    return CUDA in ort.get_available_providers()


needs_cuda = pytest.mark.skipif(not _cuda_available(), reason="needs onnxruntime-gpu and a CUDA device")
pytestmark = pytest.mark.cuda


def test_cuda_sessions_ask_for_full_float32():
    """ORT's CUDA provider defaults to TF32 products (1e-3 relative error against the CPU on the tests' models,
    measured on an H200), which would fail exact rewrites' verification: sessions made here turn it off, and a
    caller's own options win. Runs without a GPU: it checks the providers argument make_session passes on."""
    from modelsurgeon.runtime.session import provider_list

    assert provider_list(None) == ["CPUExecutionProvider"]
    assert provider_list([CUDA, "CPUExecutionProvider"]) == [(CUDA, {"use_tf32": "0"}), "CPUExecutionProvider"]
    assert provider_list([(CUDA, {"use_tf32": "1", "device_id": "0"})]) == [(CUDA, {"use_tf32": "1", "device_id": "0"})]


def _assert_cuda_matches_cpu(model, feeds, tol, label, custom_ops=False):
    """`model` on CUDA (first provider) and on the CPU, same feeds: every output of the same shape and within `tol`
    (relative L2). accuracy_level 0: the CPU provider's fusion of QDQ 4-bit weights into MatMulNBits would otherwise
    quantize the activations to int8 (ORT's default level 4), which CUDA does not. Returns the CUDA session."""
    cpu = make_session(model, providers=["CPUExecutionProvider"], custom_ops=custom_ops, accuracy_level=0)
    gpu = make_session(model, providers=[CUDA, "CPUExecutionProvider"], custom_ops=custom_ops, accuracy_level=0)
    assert gpu.get_providers()[0] == CUDA
    for out, want, got in zip(cpu.get_outputs(), cpu.run(None, feeds), gpu.run(None, feeds)):
        assert got.shape == want.shape, (label, out.name)
        if want.size:
            assert _rel(got, want) < tol, (label, out.name, _rel(got, want))
    return gpu


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@needs_cuda
@pytest.mark.parametrize("kind,passes,tol", [
    ("llama", "cleanup", 1e-4),
    ("llama", "slice(sparsity=0.25)", 1e-4),
    ("llama", "quant4(block=32,accuracy_level=0)", 1e-3),
    ("llama", "quant4(block=32,format=qdq)", 1e-3),
    ("opt", "prune(heads=0.5,ffn=0.3)", 1e-4),
    ("resnet", "quant8", 5e-2),
    ("llama", "spquant(sparsity=0.5,accuracy_level=0)", 1e-3),
])
def test_compiled_models_run_on_cuda_like_on_cpu(reference_onnx, kind, passes, tol):
    path = reference_onnx(kind, 18 if "qdq" not in passes else 23)
    model = modelsurgeon.load(path)
    calib = synthesize(model, num_samples=8, seq_len=16, seed=0)
    result = modelsurgeon.compile(model, passes=passes, calibration=calib, progress=False)
    feeds = synthesize(result.model, num_samples=2, seq_len=11, seed=5).arrays
    _assert_cuda_matches_cpu(result.model, feeds, tol, passes)


# Graphs this project did not shape: other exporters' layouts and com.microsoft ops (GroupQueryAttention,
# MatMulNBits, SkipSimplifiedLayerNormalization) after `fuse`, which the compile appends. CUDA's GroupQueryAttention
# takes float16 only, so on these float32 graphs ORT places it on the CPU provider beside the CUDA nodes.
@needs_cuda
@pytest.mark.parametrize("name,passes,tol", [
    ("llama/dynamo18-kv", "drop-blocks(n=1),quant4(block=32,accuracy_level=0)", 1e-3),
    ("qwen2/torchscript", "prune(heads=0.5,ffn=0.3)", 1e-4),
    ("gpt2/dynamo18", "lowrank(ratio=0.5)", 1e-4),
    ("bert/optimum", "quant8", 5e-2),
    ("llama/optimum-past", "slice(sparsity=0.25),quant4(block=32,accuracy_level=0)", 1e-3),
    ("llama/genai-fp32", "drop-blocks(n=1),quant4(block=32,accuracy_level=0)", 1e-3),
    # GenAI's MatMulNBits carry accuracy_level=4: the CPU provider quantizes their activations to int8, CUDA does not
    ("llama/genai-int4", "drop-blocks(n=1)", 2e-2),
])
def test_corpus_models_run_on_cuda_like_on_cpu(corpus_model, name, passes, tol):
    result = modelsurgeon.compile(str(corpus_model(name)), passes, num_samples=4, progress=False)
    feeds = synthesize(result.model, num_samples=1, seq_len=9, seed=5).arrays
    _assert_cuda_matches_cpu(result.model, feeds, tol, f"{name}: {passes}")


@needs_cuda
def test_compile_verifies_each_pass_on_cuda(reference_onnx):
    """The pass manager's verification (each pass run against the reference) on the CUDA provider: the exact
    rewrites (cleanup, fuse) must match to float tolerance there too, and the lossy one reports its error."""
    path = reference_onnx("llama", 18)
    result = modelsurgeon.compile(str(path), "cleanup,prune(heads=0.5,ffn=0.3)", num_samples=4, progress=False,
                                  providers=[CUDA, "CPUExecutionProvider"])
    rows = result.report.rows  # the input, then each pass; rel_l2 is measured against the input
    assert [row.name.split("(")[0] for row in rows[1:]] == ["cleanup", "prune", "fuse", "cleanup"]
    assert rows[1].rel_l2 < 1e-5 and 0 < rows[2].rel_l2 < 1
    assert abs(rows[3].rel_l2 - rows[2].rel_l2) < 1e-4 * rows[2].rel_l2  # fuse is exact


@needs_cuda
def test_spquant_kernel_runs_beside_cuda(reference_onnx):
    """With our custom-op library registered (it has CPU kernels only), ORT places SparseQuantMatMul on the CPU
    provider and the rest on CUDA; the outputs match the CPU-only session."""
    from modelsurgeon.runtime.custom_ops import library_path, session_path

    if not library_path():
        pytest.skip("the custom-op library is not built")
    model = modelsurgeon.load(reference_onnx("llama", 18))
    calib = synthesize(model, num_samples=8, seq_len=16, seed=0)
    result = modelsurgeon.compile(model, passes="spquant(sparsity=0.5,accuracy_level=0)", calibration=calib,
                                  progress=False)
    feeds = synthesize(result.model, num_samples=2, seq_len=11, seed=5).arrays
    gpu = _assert_cuda_matches_cpu(result.model, feeds, 1e-4, "spquant with the library", custom_ops=True)
    assert session_path(gpu) == "kernel"
