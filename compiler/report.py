"""The compile report: one row per pass (and the input), as a readable table or JSON.

Error and quality figures come from the verification samples that `verified_on` names (held out from the passes'
calibration when there was any); `quality` describes the task metric of the `quality` column (`modelsurgeon.quality`).
"""

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
    quality: float | None = None  # the task metric against the original (Report.quality says which)


@dataclasses.dataclass
class Report:
    input: str
    rows: list[PassRow] = dataclasses.field(default_factory=list)
    verified: bool = True
    calibration: str | None = None
    output: str | None = None
    verified_on: str | None = None  # which samples the error and quality figures come from
    quality: dict[str, Any] | None = None  # the task metric: `Quality.describe()`, plus "degraded": [passes]

    @property
    def final(self) -> PassRow:
        return self.rows[-1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": self.input, "output": self.output, "verified": self.verified, "calibration": self.calibration,
            "verified_on": self.verified_on, "quality": self.quality,
            "passes": [dataclasses.asdict(r) for r in self.rows],
            "summary": {
                "parameters": [self.rows[0].parameters, self.final.parameters],
                "bytes": [self.rows[0].bytes, self.final.bytes],
                "macs": [self.rows[0].macs, self.final.macs],
                "rel_l2": self.final.rel_l2, "cosine": self.final.cosine, "max_abs": self.final.max_abs,
                "quality": self.final.quality,
            },
        }

    def write_json(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps(self.as_dict(), indent=2, default=str))

    def table(self) -> str:
        kind = self.quality["metric"] if self.quality else None
        extra = kind is not None and kind != "rel-l2"  # a relative L2 quality is the rel L2 column already
        head = ["pass", "nodes", "params", "size", "MACs", "max abs err", "rel L2", "cosine"]
        head += [QUALITY_HEADS[kind]] if extra else []
        head += ["time"]
        lines = [head]
        for r in self.rows:
            lines.append([
                r.name + ("" if r.modified or r.name == "(input)" else " (no change)"), str(r.nodes), human(r.parameters),
                human_bytes(r.bytes), human(r.macs),
                _num(r.max_abs), _num(r.rel_l2), _num(r.cosine, cos=True)]
                + ([_quality(kind, r.quality)] if extra else [])
                + [f"{r.seconds:.2f}s" if r.name != "(input)" else ""])
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
        elif self.verified_on:
            out.append(f"errors measured on {self.verified_on}")
        if self.quality:
            out.append(self.quality_line())
        for r in self.rows:
            if r.skipped:
                out.append(f"{r.name}: skipped {len(r.skipped)} layer(s): " + "; ".join(r.skipped[:8])
                           + (" ..." if len(r.skipped) > 8 else ""))
        return "\n".join(out)


    def quality_line(self) -> str:
        """One line: the task metric, the original's and the final model's figures, and whether the gate is on."""
        q, last = self.quality, self.final
        kind = q["metric"]
        text = f"quality ({q['label']}"
        if kind == "ppl":
            text += f"; the original's perplexity {q['reference_perplexity']:.4g} over {q['tokens']} tokens"
        text += f"): {_quality(kind, last.quality)}" if len(self.rows) > 1 else f"): {_quality(kind, self.rows[0].quality)}"
        if q.get("note"):
            text += f"; {q['note']}"
        if q.get("degraded"):
            text += f"; DEGRADED past the floor by {', '.join(q['degraded'])} (kept: --allow-degraded)"
        gate = q.get("gate", "on")
        if gate != "on" and not (q.get("note") and gate.endswith(q["note"].split(": ", 1)[-1])):
            text += f"; gate {gate}"
        return text


QUALITY_HEADS = {"ppl": "ppl ratio", "cosine": "emb cosine", "top1": "top-1 agr"}


def _quality(kind: str | None, x: float | None) -> str:
    if x is None:
        return "-"
    if kind == "ppl":
        return f"{x:.3g}x"
    if kind == "rel-l2":
        return f"{x:.2e}"
    return f"{x:.4f}"


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
