"""The task-aware quality line of a compile report, and the gate that stops a compile whose model became unusable.

Every verification run (one per pass, on samples the passes did not calibrate on) also scores the model with one
number chosen from its outputs:

| metric | when | value |
|---|---|---|
| `ppl` | logits [batch, tokens, vocab] and a token-id input [batch, tokens] | perplexity ratio: next-token perplexity of the model over the original's, on the same windows |
| `cosine` | an output named sentence_embedding, embeddings, pooler_output, last_hidden_state, ... | mean cosine per sample of the model's and the original's embedding (rank 3 mean-pooled over the attention mask) |
| `top1` | a float output [batch, classes] named logits, probabilities, scores, class..., pred... | share of samples whose top-1 class is the original's |
| `rel-l2` | anything else | relative L2 error of the worst output |

The gate (`Gate`) warns at the first pass that takes the model past 2x perplexity or under 0.9 cosine / top-1
agreement, and stops the compile (`DegradedError`, exit 1, nothing written) at a hard floor (10x, 0.5, 0.3, or
`min_quality`) unless `allow_degraded`. It judges the model after each pass against the original, so the pass
blamed is the one at which the compiled model crossed the line, not necessarily the one that did most damage.

What it cannot tell: whether data is real. Synthesized inputs turn the gate off (random token ids have no
perplexity that means anything; random pixels no class), and so do windows on which the original model predicts no
better than a quarter of its vocabulary (random ids given as --calib, or a random-weight model): the line then says
why it shows the relative L2 error instead. Perplexity ignores attention masks (windows cut from text have none
to honour), and `ppl` takes any rank-3 logits for a causal LM's (a masked LM's next-token perplexity is no measure).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from modelsurgeon.errors import UserError, VerificationError

log = logging.getLogger("modelsurgeon")

METRICS = ("ppl", "cosine", "top1", "rel-l2")
LABELS = {"ppl": "perplexity ratio", "cosine": "embedding cosine", "top1": "top-1 agreement", "rel-l2": "relative L2"}
WARN = {"ppl": 2.0, "cosine": 0.9, "top1": 0.9}  # a pass past these gets a warning
FLOOR = {"ppl": 10.0, "cosine": 0.5, "top1": 0.3}  # ... and past these stops the compile
EMBEDDING_NAMES = ("sentence_embedding", "embeddings", "text_embeds", "image_embeds", "pooler_output",
                   "last_hidden_state")
CLASS_HINTS = ("logit", "prob", "score", "class", "pred")  # a plain "output" or "y" may be a regression
CHANCE_SHARE = 4  # an original whose perplexity exceeds vocab / CHANCE_SHARE does not model the data


class DegradedError(VerificationError):
    """A pass took the model past the quality floor: exit 1, nothing written."""

    def __init__(self, pass_name: str, what: str):
        self.pass_name = pass_name
        self.what = what
        UserError.__init__(self, f"pass '{pass_name}' degraded the model past the quality floor: {what}")


def _ids_name(feeds: dict[str, np.ndarray]) -> str | None:
    for name, v in feeds.items():
        lname = name.lower()
        if (np.issubdtype(v.dtype, np.integer) and v.ndim == 2
                and not any(w in lname for w in ("mask", "position", "type", "segment"))):
            return name
    return None


def _float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def _lm_output(outputs: dict[str, np.ndarray], ids: np.ndarray | None) -> str | None:
    if ids is None:
        return None
    names = sorted(outputs, key=lambda n: n != "logits")
    return next((n for n in names if _float(outputs[n]) and outputs[n].ndim == 3 and outputs[n].shape[:2] == ids.shape
                 and outputs[n].shape[2] > 1 and "logit" in n.lower()), None)


def _embedding_output(outputs: dict[str, np.ndarray]) -> str | None:
    return next((n for n in EMBEDDING_NAMES if n in outputs and _float(outputs[n]) and outputs[n].ndim in (2, 3)), None)


def _class_output(outputs: dict[str, np.ndarray], batch: int | None, named: bool = True) -> str | None:
    """A float output [batch, classes]; with `named`, one whose name says so (`CLASS_HINTS`)."""
    return next((n for n, a in outputs.items() if _float(a) and a.ndim == 2 and a.shape[1] > 1
                 and (batch is None or a.shape[0] == batch) and n not in EMBEDDING_NAMES
                 and (not named or any(h in n.lower() for h in CLASS_HINTS))), None)


def _pool(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    x = x.astype(np.float64)
    if x.ndim == 2:
        return x
    if mask is None or mask.shape != x.shape[:2]:
        return x.mean(axis=1)
    m = mask.astype(np.float64)[..., None]
    return (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


@dataclasses.dataclass
class Quality:
    """The quality metric of one compile: which output it reads, the original's outputs it compares with, and
    whether a gate may act on it (`gate_off` says why not)."""

    kind: str
    output: str | None
    feeds: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    data: str  # which samples the figures come from
    ids: str | None = None
    reference_nll: float = 0.0
    tokens: int = 0
    reference_ppl: float | None = None
    note: str = ""  # why the line shows another metric than the task's, or why the gate is off
    gate_off: str = ""

    @property
    def label(self) -> str:
        return LABELS[self.kind]

    def value(self, outputs: dict[str, np.ndarray]) -> float:
        """The model's quality against the original on the verification samples (1.0 for the original itself)."""
        if self.kind == "ppl":
            from modelsurgeon.runtime.evaluate import next_token_nll

            nll, _ = next_token_nll(outputs[self.output], self.feeds[self.ids])
            return float(np.exp(min((nll - self.reference_nll) / max(self.tokens, 1), 700.0)))
        if self.kind == "cosine":
            mask = next((v for k, v in self.feeds.items() if "mask" in k.lower() and np.ndim(v) == 2), None)
            e, r = _pool(outputs[self.output], mask), _pool(self.reference[self.output], mask)
            en, rn = np.linalg.norm(e, axis=1), np.linalg.norm(r, axis=1)
            cos = np.where((en > 0) & (rn > 0), np.sum(e * r, axis=1) / np.maximum(en * rn, 1e-300),
                           (en == rn).astype(np.float64))
            return float(np.mean(cos))
        if self.kind == "top1":
            return float(np.mean(outputs[self.output].argmax(axis=-1) == self.reference[self.output].argmax(axis=-1)))
        from modelsurgeon.verify import compare_arrays

        errs = [compare_arrays(r, outputs[k]).rel_l2 for k, r in self.reference.items() if k in outputs and _float(r)]
        return max(errs) if errs else 0.0

    def describe(self) -> dict[str, Any]:
        return {"metric": self.kind, "label": self.label, "output": self.output, "data": self.data,
                "reference_perplexity": self.reference_ppl, "tokens": self.tokens or None, "note": self.note or None,
                "gate": "off: " + self.gate_off if self.gate_off else "on"}


def choose(feeds: dict[str, np.ndarray], reference: dict[str, np.ndarray], *, requested: str | None = None,
           real_data: bool = True, data: str = "") -> Quality:
    """The quality metric for a model from its verification feeds and the original's outputs on them: `requested`
    (one of METRICS), else chosen from the outputs' names and shapes (module docstring)."""
    if requested is not None and requested not in METRICS:
        raise UserError(f"--quality {requested}: unknown; choose one of {', '.join(METRICS)}")
    ids_name = _ids_name(feeds)
    ids = feeds.get(ids_name) if ids_name else None
    batch = next((len(v) for v in feeds.values() if np.ndim(v)), None)
    found = {"ppl": _lm_output(reference, ids), "cosine": _embedding_output(reference),
             "top1": _class_output(reference, batch, named=requested != "top1")}
    if requested in ("ppl", "cosine", "top1") and found[requested] is None:
        want = {"ppl": "logits [batch, tokens, vocab] and a token-id input [batch, tokens]",
                "cosine": f"an embedding output ({', '.join(EMBEDDING_NAMES)})",
                "top1": "a float output [batch, classes] (logits)"}[requested]
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in reference.items())
        raise UserError(f"--quality {requested} needs {want}; the model outputs {shapes}; choose another --quality")
    if requested is None:
        requested = next((k for k in ("ppl", "cosine", "top1") if found[k] is not None), "rel-l2")
    q = Quality(requested, found.get(requested), feeds, reference, data)
    if q.kind == "ppl":
        from modelsurgeon.runtime.evaluate import next_token_nll

        q.ids = ids_name
        q.reference_nll, q.tokens = next_token_nll(reference[q.output], ids)
        vocab = reference[q.output].shape[-1]
        q.reference_ppl = float(np.exp(min(q.reference_nll / max(q.tokens, 1), 700.0)))
        if not real_data:
            q.note = ("perplexity not shown: the verification windows are random token ids, on which no perplexity "
                      "means anything (pass --calib text with --tokenizer)")
        elif q.reference_ppl > vocab / CHANCE_SHARE:
            q.note = (f"perplexity not shown: the original model's is {q.reference_ppl:.3g} on these windows, no better "
                      f"than chance over a quarter of its {vocab} tokens, so they are not text it models")
        if q.note:
            q.kind, q.output, q.ids = "rel-l2", None, None
            q.gate_off = q.note.split(": ", 1)[1]
    if not q.gate_off:
        if not real_data:
            q.gate_off = "the verification inputs are synthesized (pass --calib real inputs to gate on quality)"
        elif q.kind == "rel-l2":
            q.gate_off = "no task metric for these outputs (--max-error bounds the relative L2 error)"
    return q


@dataclasses.dataclass
class Gate:
    """Judges the model after each pass against the original: warns at the pass that takes it past the warning
    level, stops at the pass that takes it past the floor (unless `allow_degraded`: then warns, and the report lists
    the pass). Each level blames one pass, the first to cross it; later passes are judged again only if the model
    came back above the level. A pass followed by a recovery pass (heal) is judged after the recovery: past the floor
    it is warned at once, not stopped; past the warning level alone it is not warned yet. Either level still blames it
    when the recovery did not bring the model back."""

    quality: Quality
    floor: float | None = None  # min_quality: the floor in the metric's own unit (largest ratio for ppl)
    allow_degraded: bool = False
    degraded: list[str] = dataclasses.field(default_factory=list)
    _below: dict[str, bool] = dataclasses.field(default_factory=lambda: {"warn": False, "floor": False})
    # level ("warn", "floor") -> the pass that took the model past it, which a recovery pass after it may bring back
    _pending: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        kind = self.quality.kind
        if self.floor is not None:
            if kind not in FLOOR:
                raise UserError(f"--min-quality needs a quality metric with a floor (ppl, cosine or top1); this "
                                f"compile measures {LABELS[kind]} ({self.quality.gate_off or 'see --quality'})")
            if self.quality.gate_off:
                raise UserError(f"--min-quality cannot act: the quality gate is off ({self.quality.gate_off})")
            if kind == "ppl" and not self.floor >= 1:
                raise UserError(f"--min-quality for perplexity is the largest ratio to the original's (such as 10), "
                                f"at least 1, not {self.floor:g}")
            if kind != "ppl" and not 0 < self.floor <= 1:
                raise UserError(f"--min-quality for {LABELS[kind]} is a value in (0, 1] such as 0.5, not {self.floor:g}")

    @property
    def active(self) -> bool:
        return not self.quality.gate_off and self.quality.kind in FLOOR

    def _past(self, value: float, level: float) -> bool:
        if not np.isfinite(value):
            return True
        return value > level if self.quality.kind == "ppl" else value < level

    def _fmt(self, value: float) -> str:
        return f"{value:.3g}x the original's perplexity" if self.quality.kind == "ppl" else \
            f"{self.quality.label} {value:.3f}"

    def judge(self, pass_name: str, value: float | None, advice: str, recovery: str | None = None) -> None:
        """Check the model after pass `pass_name` scoring `value`: warn, raise DegradedError, or nothing. `recovery`:
        the recovery pass later in the pipeline, if any (the floor then waits for it)."""
        if not self.active or value is None:
            return
        kind = self.quality.kind
        floor = FLOOR[kind] if self.floor is None else self.floor
        unit = "x" if kind == "ppl" else ""
        where = f"on {self.quality.data}"
        below_floor, below_warn = self._past(value, floor), self._past(value, WARN[kind])
        if below_warn and recovery is not None:
            new = [lv for lv, past in (("warn", True), ("floor", below_floor))
                   if past and lv not in self._pending and not self._below[lv]]
            self._pending.update((lv, pass_name) for lv in new)
            if "floor" in new:
                log.warning("%s took the model past the quality floor: %s %s (floor %g%s); %s comes later, so the "
                            "floor is judged after it", pass_name, self._fmt(value), where, floor, unit, recovery)
            elif new:  # a warning now would advise the heal that is already coming
                log.info("%s left the model at %s %s (warning level %g%s); %s comes later, so the model is judged "
                         "after it", pass_name, self._fmt(value), where, WARN[kind], unit, recovery)
            return
        crossed_floor = below_floor and not self._below["floor"]
        crossed_warn = below_warn and not self._below["warn"] and not below_floor
        pending, self._pending = self._pending, {}
        culprit = pending.get("floor" if crossed_floor else "warn", pass_name)
        after = "" if culprit == pass_name else f" after {pass_name}"
        if culprit != pass_name:
            advice = f"give {pass_name} more steps or calibration data, or try milder options for {culprit}"
        self._below.update(floor=below_floor, warn=below_warn)
        if crossed_floor:
            what = f"{self._fmt(value)} {where}{after and after + ', which did not bring it back'} (floor " \
                   f"{floor:g}{unit})"
            if not self.allow_degraded:
                raise DegradedError(culprit, f"{what}; {advice}, set the floor with --min-quality, or keep the "
                                             "model anyway with --allow-degraded")
            self.degraded.append(culprit)
            log.warning("%s degraded the model past the quality floor: %s; kept (--allow-degraded)", culprit, what)
        elif crossed_warn:
            log.warning("%s left the model at %s %s%s (warning level %g%s): %s", culprit, self._fmt(value), where,
                        after, WARN[kind], unit, advice)
