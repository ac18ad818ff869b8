"""The compile report: one row per pass (and the input), as a readable table or JSON."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from modelsurgeon.stats import human, human_bytes


@dataclasses.dataclass
class PassRow:
    name: str
    nodes: int
    parameters: int
    bytes: int
    macs: int | None
    max_abs: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    seconds: float = 0.0
    modified: bool = False
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)
    per_output: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Report:
    input: str
    rows: list[PassRow] = dataclasses.field(default_factory=list)
    verified: bool = True
    calibration: str | None = None
    output: str | None = None

    @property
    def final(self) -> PassRow:
        return self.rows[-1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": self.input, "output": self.output, "verified": self.verified, "calibration": self.calibration,
            "passes": [dataclasses.asdict(r) for r in self.rows],
            "summary": {
                "parameters": [self.rows[0].parameters, self.final.parameters],
                "bytes": [self.rows[0].bytes, self.final.bytes],
                "macs": [self.rows[0].macs, self.final.macs],
                "rel_l2": self.final.rel_l2, "cosine": self.final.cosine, "max_abs": self.final.max_abs,
            },
        }

    def write_json(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps(self.as_dict(), indent=2, default=str))

    def table(self) -> str:
        head = ["pass", "nodes", "params", "size", "MACs", "max abs err", "rel L2", "cosine", "time"]
        lines = [head]
        for r in self.rows:
            lines.append([
                r.name + ("" if r.modified or r.name == "(input)" else " (no change)"), str(r.nodes), human(r.parameters),
                human_bytes(r.bytes), human(r.macs),
                _num(r.max_abs), _num(r.rel_l2), _num(r.cosine, cos=True), f"{r.seconds:.2f}s" if r.name != "(input)" else "",
            ])
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        out = []
        for j, row in enumerate(lines):
            out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
            if j == 0:
                out.append("  ".join("-" * w for w in widths))
        first, last = self.rows[0], self.final
        if len(self.rows) > 1:
            out.append("")
            out.append(f"size {human_bytes(first.bytes)} -> {human_bytes(last.bytes)} ({_ratio(last.bytes, first.bytes)}), "
                       f"params {human(first.parameters)} -> {human(last.parameters)} ({_ratio(last.parameters, first.parameters)}), "
                       f"MACs {human(first.macs)} -> {human(last.macs)} ({_ratio(last.macs, first.macs)})")
        if not self.verified:
            out.append("outputs not verified (--no-verify)")
        for r in self.rows:
            if r.skipped:
                out.append(f"{r.name}: skipped {len(r.skipped)} layer(s): " + "; ".join(r.skipped[:8])
                           + (" ..." if len(r.skipped) > 8 else ""))
        return "\n".join(out)


def _num(x: float | None, cos: bool = False) -> str:
    if x is None:
        return "-"
    if cos:
        return f"{x:.6f}"
    return f"{x:.2e}"


def _ratio(a: int | None, b: int | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.1%}"
