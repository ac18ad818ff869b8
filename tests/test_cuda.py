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


pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not _cuda_available(), reason="needs onnxruntime-gpu and a CUDA device")]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


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
    cpu = make_session(result.model, providers=["CPUExecutionProvider"], custom_ops=False)
    gpu = make_session(result.model, providers=[CUDA, "CPUExecutionProvider"], custom_ops=False)
    assert gpu.get_providers()[0] == CUDA
    for name, want, got in zip([o.name for o in cpu.get_outputs()], cpu.run(None, feeds), gpu.run(None, feeds)):
        assert got.shape == want.shape
        assert _rel(got, want) < tol, (passes, name, _rel(got, want))
