"""What a compression pass is: declared options, requirements, invalidations, ordering stage, and a registry.

A pass is a class with a `name`, typed `options`, and `run(model, ctx) -> PassResult`. It rewrites the
`onnx_ir.Model` in place (or returns a new one) and says whether anything changed, in the spirit of
`onnx_ir.passes`. The manager (modelsurgeon.manager) reads the declarations to build and check pipelines:

- `requires`: passes that must run earlier (added automatically, e.g. slice needs fold-norms),
- `analyses`: analyses the pass reads through `ctx.analysis(name)` (cached until invalidated),
- `preserves`: analyses still valid after the pass changed the model (everything else is invalidated),
- `stage`: STRUCTURE passes (pruning, slicing, ...) must precede QUANTIZE passes, and both precede FUSE passes;
  CLEANUP may go anywhere.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import onnx_ir as ir

from modelsurgeon.errors import UserError

if TYPE_CHECKING:
    from modelsurgeon.context import PassContext


class Stage(enum.IntEnum):
    STRUCTURE = 0
    QUANTIZE = 1
    CLEANUP = 2  # may run anywhere
    FUSE = 3  # after every STRUCTURE and QUANTIZE pass (fusions hide the decomposed form analyses read)


@dataclasses.dataclass(frozen=True)
class Option:
    """A pass option: its type, default, help, and optional allowed choices or validator."""

    type: type | tuple[type, ...]
    default: Any
    help: str = ""
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error message or None

    def parse(self, pass_name: str, key: str, raw: Any) -> Any:
        value = _coerce(raw, self.type)
        if value is _INVALID:
            tname = self.type.__name__ if isinstance(self.type, type) else "/".join(t.__name__ for t in self.type)
            raise UserError(f"{pass_name}: option {key}={raw!r} must be a {tname}")
        if self.choices is not None and value not in self.choices:
            raise UserError(f"{pass_name}: option {key}={raw!r} must be one of {', '.join(map(str, self.choices))}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise UserError(f"{pass_name}: option {key}={raw!r}: {problem}")
        return value


_INVALID = object()


def _coerce(raw: Any, typ: type | tuple[type, ...]) -> Any:
    types = typ if isinstance(typ, tuple) else (typ,)
    if raw is None and type(None) in types:
        return None
    for t in types:
        if t is type(None):
            continue
        if isinstance(raw, t) and not (t is int and isinstance(raw, bool)):
            return raw
        if t is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            s = raw.strip()
            try:
                if t is bool:
                    if s.lower() in ("true", "1", "yes", "on"):
                        return True
                    if s.lower() in ("false", "0", "no", "off"):
                        return False
                    continue
                if t is int:
                    return int(s)
                if t is float:
                    return float(s)
                if t is str:
                    return s
            except ValueError:
                continue
    return _INVALID


@dataclasses.dataclass
class PassResult:
    """What a pass did: the (possibly new) model, whether it changed, and notes for the report."""

    model: ir.Model
    modified: bool
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)  # "node: reason" for layers left alone


class Pass:
    """Base class of modelsurgeon passes. Subclasses set the class attributes and implement `run`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    requires: ClassVar[tuple[str, ...]] = ()
    analyses: ClassVar[tuple[str, ...]] = ()
    preserves: ClassVar[tuple[str, ...]] = ()
    stage: ClassVar[Stage] = Stage.STRUCTURE
    exact: ClassVar[bool] = False  # an exact rewrite: verification expects float-tolerance equality
    needs_calibration: ClassVar[bool] = False
    recovers: ClassVar[bool] = False  # recovers quality lost by the passes before it (heal): the quality floor waits

    def __init__(self, **opts: Any):
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise UserError(f"{self.name}: unknown option '{unknown[0]}'; valid options: {valid}")
        self.config = {k: o.default for k, o in self.options.items()}
        for key, raw in opts.items():
            self.config[key] = self.options[key].parse(self.name, key, raw)
        self.validate()

    def validate(self) -> None:
        """Cross-option checks; raise UserError with what to change."""

    def run(self, model: ir.Model, ctx: "PassContext") -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.config.items() if v != self.options[k].default}
        args = ",".join(f"{k}={v}" for k, v in changed.items())
        return f"{self.name}({args})" if args else self.name


_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipelines under `cls.name`."""
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise RuntimeError(f"two passes named {cls.name!r}")
    _PASSES[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    import modelsurgeon.passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(_PASSES.items()))


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise UserError(f"unknown pass '{name}'; valid passes: {', '.join(passes)}")
    return passes[name]
