"""ONNX Runtime side of modelsurgeon: sessions, the custom operator library, benchmarking and evaluation."""

from modelsurgeon.runtime.session import make_session, run_model

__all__ = ["make_session", "run_model"]
