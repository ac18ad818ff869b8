"""The context a pass runs in: calibration data, cached analyses, verification inputs, logging, progress."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Iterator

import onnx_ir as ir

from modelsurgeon.analysis import AnalysisManager
from modelsurgeon.calibration import CalibrationData

log = logging.getLogger("modelsurgeon")


@dataclasses.dataclass
class PassContext:
    model: ir.Model  # the model being compiled, as it stands before the current pass
    calibration: CalibrationData | None = None
    analyses: AnalysisManager = dataclasses.field(default_factory=AnalysisManager)
    progress: bool = True
    seed: int = 0
    providers: list[str] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the model as it stood when the compile began: its structure cloned, its tensors shared (passes replace
    # initializers, never write into their tensors), so it costs no copy of the weights; heal matches it
    original: ir.Model | None = None

    def __post_init__(self) -> None:
        if self.original is None and self.model is not None:
            self.original = self.model.clone()

    def analysis(self, name: str) -> Any:
        return self.analyses.get(name, self.model, self)

    def require_calibration(self, pass_name: str) -> CalibrationData:
        if self.calibration is None:
            from modelsurgeon.errors import UserError

            raise UserError(f"{pass_name} needs calibration data; pass --calib FILE (or calibration= in Python)")
        return self.calibration

    def progress_bar(self, iterable: Iterable, desc: str, total: int | None = None) -> Iterator:
        from modelsurgeon.progress import progress

        return progress(iterable, desc=desc, total=total, enabled=self.progress)
