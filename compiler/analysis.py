"""Analyses: named, cached facts about a model (dependency graph, transformer blocks, ...).

An analysis is a function `fn(model, ctx) -> result` registered under a name. The manager caches each
result until a pass that changed the model does not list the analysis in its `preserves`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import onnx_ir as ir

from modelsurgeon.errors import UserError

if TYPE_CHECKING:
    from modelsurgeon.context import PassContext

AnalysisFn = Callable[[ir.Model, "PassContext"], Any]
_ANALYSES: dict[str, AnalysisFn] = {}
_MODULES = ("modelsurgeon.analyses",)


def register_analysis(name: str) -> Callable[[AnalysisFn], AnalysisFn]:
    def deco(fn: AnalysisFn) -> AnalysisFn:
        _ANALYSES[name] = fn
        return fn

    return deco


def registered_analyses() -> dict[str, AnalysisFn]:
    import importlib

    for mod in _MODULES:
        importlib.import_module(mod)
    return dict(_ANALYSES)


class AnalysisManager:
    """Computes analyses on demand and keeps them until invalidated."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}
        self.computed: list[str] = []  # every computation, in order (tests read it to check caching)

    def get(self, name: str, model: ir.Model, ctx: "PassContext") -> Any:
        if name not in self._cache:
            analyses = registered_analyses()
            if name not in analyses:
                raise UserError(f"unknown analysis '{name}'; known: {', '.join(sorted(analyses))}")
            self._cache[name] = analyses[name](model, ctx)
            self.computed.append(name)
        return self._cache[name]

    def invalidate(self, preserved: tuple[str, ...] | list[str] = ()) -> None:
        self._cache = {k: v for k, v in self._cache.items() if k in preserved}

    def cached(self) -> list[str]:
        return list(self._cache)
