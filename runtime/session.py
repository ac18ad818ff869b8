"""ONNX Runtime sessions for IR models, files or bytes, with quiet threading and explicit precision.

Thread spinning is off (the machines we measure on are small and noisy). `accuracy_level` sets
`session.qdq_matmulnbits_accuracy_level`, which decides whether ORT fuses int4 DequantizeLinear+MatMul
into MatMulNBits with int8 activations (4) or keeps fp32 activations (0 = exact dequantized math).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from modelsurgeon.runtime.detached_weights import DetachedModel, detach_weights, is_placeholder

PREPACK_LIMIT = 2**30  # bytes of weights above which sessions do not prepack them


def session_options(threads: int | None = None, accuracy_level: int | None = None, optimization: str = "all"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # fatal only: a failed run raises with the reason, which the caller reports in one line
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


def _session(proto, so, providers, weights: dict[str, np.ndarray] | None = None, base_dir: str | None = None,
             prepack: bool | None = None):
    """A session from a protobuf whose external data is either detached weights or files in `base_dir`.

    Nothing is written to disk: ONNX Runtime reads the remaining external files from `base_dir` in place, and
    uses the detached arrays' buffers as they are (the session keeps them alive)."""
    import onnxruntime as ort

    if prepack is None:  # prepacking holds a second copy of every MatMul weight: past this size memory matters more
        prepack = sum(a.nbytes for a in (weights or {}).values()) <= PREPACK_LIMIT
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if weights:
        so.add_session_config_entry("session.use_external_initializer_file_buffers_directly", "1")
        so.add_external_initializers_from_files_in_memory(list(weights), list(weights.values()),
                                                          [a.nbytes for a in weights.values()])
    if base_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
    elif any(not is_placeholder(loc) for loc in _external_locations(proto)):
        raise ValueError("a model with external data needs base_dir, the folder its data files are in")
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=providers)
    session._modelsurgeon_weights = weights  # ORT reads these buffers for the session's whole life
    return session


# ONNX Runtime's CUDA provider multiplies float32 in TF32 by default (about 1e-3 relative error on the tests' models,
# measured on an H200): the compiler verifies rewrites to float tolerance, so its sessions ask for full float32.
PROVIDER_DEFAULTS: dict[str, dict[str, str]] = {"CUDAExecutionProvider": {"use_tf32": "0"}}


def provider_list(providers: Sequence[Any] | None) -> list[Any]:
    """ONNX Runtime's `providers` argument: names as given (CPU when none), a name with defaults in
    `PROVIDER_DEFAULTS` as `(name, defaults)`; `(name, options)` pairs keep the caller's options over the defaults."""
    out: list[Any] = []
    for entry in providers or ["CPUExecutionProvider"]:
        name, options = (entry, {}) if isinstance(entry, str) else (entry[0], dict(entry[1]))
        merged = {**PROVIDER_DEFAULTS.get(name, {}), **options}
        out.append((name, merged) if merged else name)
    return out


def make_session(model, providers: Sequence[str] | None = None,
                 threads: int | None = None, accuracy_level: int | None = None, optimization: str = "all",
                 custom_ops: bool = True, base_dir: str | None = None, prepack: bool | None = None,
                 profile_prefix: str | None = None, arena: bool = True):
    """An `onnxruntime.InferenceSession` for an IR model, a DetachedModel, an onnx.ModelProto, a path or bytes.

    Weights are never copied to a temporary file: an IR model's large initializers go to ONNX Runtime as
    arrays in place (runtime/detached_weights.py), and a ModelProto's external data is read from `base_dir`.
    `prepack=False` keeps ONNX Runtime from prepacking MatMul weights (a second copy of each, worth it only for
    sessions that run many times); None prepacks up to PREPACK_LIMIT bytes of weights. `profile_prefix` turns on
    ONNX Runtime's profiling (the trace file is the session's `end_profiling()`). `arena=False` allocates outputs
    without ONNX Runtime's CPU arena, which grows in powers of two and stays as long as any output it allocated: for
    sessions whose outputs are kept in bulk (about twice their bytes with the arena)."""
    import onnx
    import onnxruntime as ort

    so = session_options(threads, accuracy_level, optimization)
    so.enable_cpu_mem_arena = arena
    if custom_ops:
        _register_custom_ops(so)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    providers = provider_list(providers)
    if isinstance(model, ir.Model):
        model = detach_weights(model)
    if isinstance(model, DetachedModel):
        return _session(model.proto, so, providers, model.weights, prepack=prepack)
    if isinstance(model, onnx.ModelProto):
        return _session(model, so, providers, base_dir=base_dir, prepack=prepack)
    if isinstance(model, (bytes, bytearray)):
        return ort.InferenceSession(bytes(model), so, providers=providers)
    return ort.InferenceSession(str(model), so, providers=providers)


def run_model(model: Any, feeds: dict[str, np.ndarray], output_names: Sequence[str] | None = None, **session_kwargs) -> dict[str, np.ndarray]:
    """Run once and return outputs by name."""
    sess = model if hasattr(model, "run") and hasattr(model, "get_inputs") else make_session(model, **session_kwargs)
    names = list(output_names) if output_names else [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))
