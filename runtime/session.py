"""ONNX Runtime sessions for IR models, files or bytes, with quiet threading and explicit precision.

Thread spinning is off (the machines we measure on are small and noisy). `accuracy_level` sets
`session.qdq_matmulnbits_accuracy_level`, which decides whether ORT fuses int4 DequantizeLinear+MatMul
into MatMulNBits with int8 activations (4) or keeps fp32 activations (0 = exact dequantized math).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

_PROTO_LIMIT = 1_800_000_000


def session_options(threads: int | None = None, accuracy_level: int | None = None, optimization: str = "all"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    if accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    return so


def _register_custom_ops(so) -> str | None:
    """Register our custom-op library if it is built; returns its path or None (then ONNX functions run)."""
    try:
        from modelsurgeon.runtime.custom_ops import library_path
    except ImportError:
        return None
    path = library_path()
    if path:
        so.register_custom_ops_library(str(path))
        # recorded in the session's own options: custom_ops.session_path(session) reads it back
        so.add_session_config_entry("modelsurgeon.custom_ops_library", str(path))
    return path


def _external_locations(proto) -> set[str]:
    import onnx

    return {entry.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for entry in t.external_data if entry.key == "location"}


def write_with_external_data(proto, base_dir: str, folder: str | os.PathLike) -> pathlib.Path:
    """Write `proto` as folder/model.onnx with its external data files (read from `base_dir`) beside it.

    The data files are hard-linked (ORT and the checker refuse paths that leave the model's folder,
    symlinks included); copied where linking is impossible."""
    for loc in _external_locations(proto):
        target = pathlib.Path(folder) / loc
        target.parent.mkdir(parents=True, exist_ok=True)
        source = pathlib.Path(base_dir, loc).resolve()
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    path = pathlib.Path(folder) / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def external_base_dir(model: ir.Model) -> str | None:
    """The folder an IR model's external tensors are read from (None when all data is in memory)."""
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            return value.const_value.base_dir
    return None


def make_session(model, providers: Sequence[str] | None = None,
                 threads: int | None = None, accuracy_level: int | None = None, optimization: str = "all",
                 custom_ops: bool = True, base_dir: str | None = None):
    """An `onnxruntime.InferenceSession` for an IR model, an onnx.ModelProto, a path or serialized bytes.

    A ModelProto whose tensors are external needs `base_dir`, the folder its data files are in."""
    import onnx
    import onnxruntime as ort

    so = session_options(threads, accuracy_level, optimization)
    if custom_ops:
        _register_custom_ops(so)
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    if isinstance(model, ir.Model):
        external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
        proto = None if external else ir.serde.serialize_model(model)
        if proto is not None and proto.ByteSize() < _PROTO_LIMIT:
            return ort.InferenceSession(proto.SerializeToString(), so, providers=providers)
        with tempfile.TemporaryDirectory() as tmp:  # over the protobuf limit or external: go through a file
            path = pathlib.Path(tmp) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            return ort.InferenceSession(str(path), so, providers=providers)
    if isinstance(model, onnx.ModelProto):
        if _external_locations(model):
            if base_dir is None:
                raise ValueError("a ModelProto with external data needs base_dir")
            with tempfile.TemporaryDirectory() as tmp:
                return ort.InferenceSession(str(write_with_external_data(model, base_dir, tmp)), so, providers=providers)
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    if isinstance(model, (bytes, bytearray)):
        return ort.InferenceSession(bytes(model), so, providers=providers)
    return ort.InferenceSession(str(model), so, providers=providers)


def run_model(model: Any, feeds: dict[str, np.ndarray], output_names: Sequence[str] | None = None, **session_kwargs) -> dict[str, np.ndarray]:
    """Run once and return outputs by name."""
    sess = model if hasattr(model, "run") and hasattr(model, "get_inputs") else make_session(model, **session_kwargs)
    names = list(output_names) if output_names else [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))
