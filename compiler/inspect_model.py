"""`modelsurgeon inspect`: what a model is made of, as text or JSON."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from modelsurgeon.stats import count_parameters, file_bytes, human, human_bytes, op_histogram


def _shape_text(value: ir.Value) -> str:
    if value.shape is None:
        return "?"
    return "[" + ", ".join(str(d) for d in value.shape) + "]"


def describe_model(model: ir.Model, top: int = 10) -> dict[str, Any]:
    weights = []
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            weights.append((value.const_value.nbytes, value.name, list(value.const_value.shape), str(value.dtype)))
    weights.sort(reverse=True)
    return {
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "opsets": dict(sorted(model.opset_imports.items())),
        "inputs": [{"name": v.name, "dtype": str(v.dtype), "shape": _shape_text(v)} for v in model.graph.inputs
                   if v.name not in model.graph.initializers],
        "outputs": [{"name": v.name, "dtype": str(v.dtype), "shape": _shape_text(v)} for v in model.graph.outputs],
        "nodes": sum(1 for _ in model.graph.all_nodes()),
        "ops": op_histogram(model),
        "parameters": count_parameters(model),
        "bytes": file_bytes(model),
        "functions": [f"{f.domain}::{f.name}" for f in model.functions.values()],
        "largest_weights": [{"name": n, "shape": s, "dtype": d, "bytes": b} for b, n, s, d in weights[:top]],
    }


def format_description(info: dict[str, Any]) -> str:
    lines = []
    lines.append(f"producer: {info['producer'] or '?'}   IR version {info['ir_version']}   opsets: "
                 + ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in info["opsets"].items()))
    lines.append(f"nodes: {info['nodes']}   parameters: {human(info['parameters'])} ({info['parameters']:,})   "
                 f"size: {human_bytes(info['bytes'])}")
    lines.append("inputs:")
    lines += [f"  {v['name']}: {v['dtype']} {v['shape']}" for v in info["inputs"]]
    lines.append("outputs:")
    lines += [f"  {v['name']}: {v['dtype']} {v['shape']}" for v in info["outputs"]]
    lines.append("ops: " + ", ".join(f"{op} x{n}" for op, n in info["ops"].items()))
    if info["functions"]:
        lines.append("functions: " + ", ".join(info["functions"]))
    if info["largest_weights"]:
        lines.append("largest weights:")
        width = max(len(w["name"]) for w in info["largest_weights"])
        for w in info["largest_weights"]:
            lines.append(f"  {w['name'].ljust(width)}  {str(w['shape']):>16}  {w['dtype']:<10} {human_bytes(w['bytes']):>10}")
    return "\n".join(lines)


def analysis_description(model: ir.Model, name: str) -> str | None:
    """`.describe()` of a registered analysis, or None when it is not available or finds nothing."""
    from modelsurgeon.analysis import registered_analyses
    from modelsurgeon.context import PassContext

    if name not in registered_analyses():
        return None
    if name == "blocks":  # what the structural passes see: they run `canonicalize` first (the model is inspect's own)
        from modelsurgeon.canonical import canonicalize

        canonicalize(model)
    ctx = PassContext(model=model, progress=False)
    result = ctx.analysis(name)
    if result is None:
        return None
    text = result.describe() if hasattr(result, "describe") else str(result)
    return text or None
