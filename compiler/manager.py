"""The pass manager: runs a pipeline on a model, verifying and measuring after every pass.

After each pass: analyses not preserved are invalidated; the model is checked (ONNX checker, strict
shape inference) and run in ONNX Runtime on sample inputs against the original model; an exact pass
must reproduce its input's outputs to float tolerance; `max_error` (relative L2, worst output) stops the
pipeline at the pass that crosses it. Nothing is written here: `CompileResult.save` does that.

Verification runs on samples the passes never calibrate on: `--eval` data, else calibration samples held back from
the passes (`calibration.load_with_holdout`), else synthesized inputs other than the passes' own. Each run also
scores the model with a task-aware metric (`quality`), which a gate checks after every pass.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import re
import time
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from modelsurgeon import calibration as calib_mod
from modelsurgeon.capture import ONE_SAMPLE_PER_RUN
from modelsurgeon.context import PassContext
from modelsurgeon.errors import UserError, VerificationError
from modelsurgeon.input_dims import INPUT_SHAPES, SOURCE_PATH, guessed_dims, input_shape_example, set_input_shapes
from modelsurgeon.model_folder import FOLDER, describe as describe_folder_model
from modelsurgeon.model_io import as_model, constant_weights, model_bytes, save
from modelsurgeon.pass_api import Pass, Stage
from modelsurgeon.pipeline import build_pipeline, load_pipeline_file, parse_passes
from modelsurgeon.quality import METRICS as QUALITY_METRICS, Gate, choose as choose_quality
from modelsurgeon.report import PassRow, Report
from modelsurgeon.stats import model_stats
from modelsurgeon.value_types import complete_types
from modelsurgeon.verify import REMOVED_OUTPUTS, EXACT_REL_L2, Verifier, exact_bound, structural_problems, worst

log = logging.getLogger("modelsurgeon")

VERIFY_SAMPLES = 2


@dataclasses.dataclass
class CompileResult:
    model: ir.Model
    report: Report
    input_path: str | None = None

    def save(self, path: str | pathlib.Path, external_data: bool | None = None) -> pathlib.Path:
        """Write the model; one compiled from a GenAI or Optimum folder is written as such a folder (`model_folder`)
        unless `path` names an .onnx file."""
        from modelsurgeon import model_folder

        folder = self.model.meta.get(model_folder.FOLDER)
        if folder is not None and not str(path).endswith(".onnx"):
            out = model_folder.write(folder, self.model, path, external_data=external_data, report_rows=self.report.rows[1:],
                                     passes=",".join(r.name for r in self.report.rows[1:]))
        else:
            out = save(self.model, path, external_data=external_data,
                       input_path=folder.model_file if folder is not None else self.input_path)
        self.report.output = str(out)
        return out


def _as_specs(passes: str | Sequence[Any]) -> list:
    if isinstance(passes, str):
        path = pathlib.Path(passes)
        if passes.endswith(".json") and path.exists():
            return load_pipeline_file(path)
        return parse_passes(passes)
    specs: list = []
    for p in passes:
        specs.extend(parse_passes(p) if isinstance(p, str) else [p])
    return specs


def verification_feeds(model: ir.Model, calibration: calib_mod.CalibrationData | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Sample inputs for verification: a few calibration samples, else synthesized with small dimensions."""
    if calibration is not None and calibration.source != "synthesized" and calibration.num_samples:
        from modelsurgeon.capture import batch_size_for

        return calibration.head(min(VERIFY_SAMPLES, batch_size_for(model, VERIFY_SAMPLES)))
    data = calib_mod.synthesize(model, num_samples=VERIFY_SAMPLES, seq_len=calib_mod.DEFAULT_SEQ, seed=seed + 1)
    return data.arrays


def ort_reason(exc: BaseException, limit: int = 240) -> str:
    """The part of an ONNX Runtime error a user can act on: no status prefix, no C++ file and function signature."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Load model from \S+ failed:\s*", "", text)
    text = re.sub(r"\S+\.(?:h|cc|cpp):\d+ (?:[\w:~<>,&* ]+\([^()]*\)\s*)?", "", text)
    return text[:limit].rstrip() or type(exc).__name__


def check_interface(model: ir.Model) -> None:
    """Every graph input and output declares a shape (the ONNX checker, run after every pass, requires one)."""
    for kind, values in (("input", model.graph.inputs), ("output", model.graph.outputs)):
        for value in values:
            if value.shape is None and not value.is_initializer():
                raise UserError(f"the model's {kind} '{value.name}' is declared without a shape, which ONNX requires; "
                                "re-export it with shapes (symbolic dimensions such as 'batch' are fine)")


def _verification_set(model: ir.Model, calib: calib_mod.CalibrationData | None, held: calib_mod.CalibrationData | None,
                      held_from: str, evalset: calib_mod.CalibrationData | None, calibrating: bool,
                      seed: int) -> tuple[dict[str, np.ndarray], str, bool]:
    """Feeds for verification, which samples they are (for the report), and whether they are real data."""
    from modelsurgeon.capture import batch_size_for

    def first(data: calib_mod.CalibrationData, n: int) -> tuple[dict[str, np.ndarray], int]:
        k = min(n, data.num_samples, batch_size_for(model, n))
        return data.head(k), k

    if evalset is not None:
        feeds, k = first(evalset, evalset.num_samples)
        return feeds, f"the first {k} sample(s) of {evalset.source} (--eval)", True
    if held is not None:
        feeds, k = first(held, held.num_samples)
        return feeds, (held_from if k == held.num_samples else f"{k} of the {held_from}"), True
    if calib is not None and calib.source != "synthesized" and calib.num_samples:
        feeds, k = first(calib, VERIFY_SAMPLES)
        whose = "the passes calibrate on them too" if calibrating else "no pass calibrates"
        return feeds, f"the first {k} sample(s) of {calib.source} ({whose})", True
    feeds = verification_feeds(model, calib, seed)
    k = next((len(v) for v in feeds.values() if np.ndim(v)), VERIFY_SAMPLES)
    return feeds, f"{k} synthesized input(s)" + (" (not those the passes calibrate on)" if calibrating else ""), False


def _advice(p: Pass) -> str:
    """How to recover from a pass that degraded the model."""
    from modelsurgeon.pass_api import registered_passes

    hint = {"share": " (correct=lowrank(R) corrects shared blocks)",
            "prune": " (importance=activation ranks channels on the calibration data)"}.get(p.name, "")
    milder = f"try milder options for {p.name}{hint}"
    if "heal" in registered_passes() and p.name != "heal":
        return f"recover with heal after it (--passes '...,{p.name}(...),heal'), or {milder}"
    return f"{milder}, or calibrate on more (and more varied) data"


def _run_hint(model: ir.Model, calib: calib_mod.CalibrationData | None) -> str:
    """How to make a model that fails on made-up inputs run: the sizes of its float inputs that nothing fixed
    (`input_dims`), as an --input-shape to fill in, or real inputs."""
    if calib is not None and calib.source != "synthesized" and calib.num_samples:
        return "fix the model or pass --calib inputs that fit it"
    guessed = guessed_dims(model, calib_mod.empty_past_dims(calib_mod.input_signature(model)))
    if not guessed and model.meta.get(INPUT_SHAPES):
        return "check the sizes given with --input-shape, or pass --calib inputs that fit it"
    if not guessed:
        return "fix the model or pass --calib inputs that fit it"
    names = list(dict.fromkeys(g.split(": ", 1)[0] for g in guessed))
    examples = [f"--input-shape {input_shape_example(model, name)}" for name in names]
    return (f"made-up inputs guessed sizes nothing in the model or its folder fixes ({', '.join(guessed)}): give "
            f"them with {' '.join(examples)}, or pass --calib inputs that fit it")


def _check_runs_without_verification(model: ir.Model, feeds: dict[str, np.ndarray], single: dict[str, np.ndarray],
                                     providers: list[str] | None, pipeline: Sequence[Pass]) -> None:
    """With --no-verify the compile needs ONNX Runtime only for passes that calibrate (they run the model on the
    calibration data): those are refused in one line, naming the op, when ORT cannot run the input model; other
    pipelines go on without ORT (no MACs in the report), with a warning saying so. A model that runs one sample at
    a time only is marked so, as with verification."""
    from modelsurgeon.runtime.session import run_model

    try:
        run_model(model, feeds, providers=providers, accuracy_level=0)
        return
    except Exception as exc:
        reason = ort_reason(exc)
    if _one_sample_verifier(model, feeds, single, providers, reason) is not None:
        return
    calibrating = [p.name for p in pipeline if p.needs_calibration]
    if calibrating:
        raise UserError(f"{calibrating[0]} runs the model in ONNX Runtime on calibration data, but ONNX Runtime cannot "
                        f"run it ({reason}); fix the model, or leave out the passes that calibrate") from None
    log.warning("ONNX Runtime cannot run the input model (%s): compiling without it (--no-verify), so the report "
                "has no MACs", reason)


def _one_sample_verifier(model: ir.Model, feeds: dict[str, np.ndarray], single: dict[str, np.ndarray],
                         providers, reason: str) -> Verifier | None:
    """A Verifier on the first sample alone, for a model that fails on a batch but runs one sample (torch's opset-23
    RotaryEmbedding keeps cos/sin at batch 1, which ONNX Runtime 1.32 refuses for larger batches); marks the model
    so that every pass calibrates one sample per run. None when one sample fails too, or feeds were one already."""
    if all(np.ndim(v) == 0 or len(v) <= 1 for v in feeds.values()):
        return None
    try:
        verifier = Verifier(model, single, providers)
    except Exception:
        return None
    model.meta[ONE_SAMPLE_PER_RUN] = True
    log.warning("the input model runs in ONNX Runtime one sample at a time only (%s): calibrating and verifying "
                "with batches of one", reason[:160])
    return verifier


_DEFAULT_FUSE_MAX_BYTES = 1 << 30


def compile(model: Any, passes: str | Sequence[Any] = "cleanup", *, example_inputs: Any = None,
            calibration: Any = None, tokenizer: str | None = None, num_samples: int = 32, seq_len: int = 128,
            verify: bool = True, max_error: float | None = None, cleanup: bool = True, fuse: bool = True,
            progress: bool = True,
            providers: list[str] | None = None, seed: int = 0, export_opset: int = 18,
            input_shapes: dict[str, Sequence[int]] | None = None, eval_data: Any = None, holdout: int | None = None,
            quality: str | None = None, min_quality: float | None = None,
            allow_degraded: bool = False) -> CompileResult:
    """Compile `model` (path, onnx/IR model or torch module + example_inputs) through `passes`.

    `passes` is a `--passes` string, a JSON pipeline path, or a list of strings, (name, options) pairs
    and Pass instances. `input_shapes` ({input name: sizes}) sizes the dimensions an input leaves symbolic
    for made-up inputs (`input_dims`; a symbolic first axis stays the sample axis). Returns the compiled
    model and its report; call `.save(path)` to write it. `fuse` appends the `fuse` pass (ONNX Runtime's fused ops,
    packed projections) unless the pipeline lists it; `cleanup` appends `cleanup`.

    Verification runs on `eval_data` (loaded like `calibration`), else on `holdout` calibration samples held back
    from the passes (default: a quarter of `num_samples`, at most 8; 0: verify on the calibration samples). Its
    figures include a task metric, `quality` (ppl, cosine, top1 or rel-l2; default chosen from the outputs), which
    gates the compile on real data: a pass past the floor (10x perplexity, cosine 0.5, top-1 agreement 0.3, or
    `min_quality` in the metric's unit) raises `DegradedError` unless `allow_degraded` (`modelsurgeon.quality`).
    """
    input_path = str(model) if isinstance(model, (str, pathlib.Path)) else None
    if max_error is not None and not (math.isfinite(max_error) and max_error > 0):
        raise UserError(f"--max-error must be a positive number (a relative L2 error such as 0.05), not {max_error}")
    if quality is not None and quality not in QUALITY_METRICS:
        raise UserError(f"--quality {quality}: unknown; choose one of {', '.join(QUALITY_METRICS)}")
    if not verify and (quality is not None or min_quality is not None or eval_data is not None):
        raise UserError("--quality, --min-quality and --eval set what verification measures; drop --no-verify")
    if holdout is not None and holdout < 0:
        raise UserError(f"--holdout must be 0 or more samples, not {holdout}")
    pipeline = build_pipeline(_as_specs(passes), cleanup=cleanup, fuse=fuse)
    model = as_model(model, example_inputs, opset=export_opset)
    if any(getattr(p, "by_default", False) for p in pipeline) and model_bytes(model) > _DEFAULT_FUSE_MAX_BYTES:
        # fuse's memory on multi-GB models is not measured (it clones, folds and re-checks): not added unasked there
        pipeline = [p for p in pipeline if not getattr(p, "by_default", False)]
        log.info("fuse is not appended by default above %d GiB of weights; list it in --passes to run it",
                 _DEFAULT_FUSE_MAX_BYTES >> 30)
    constant_weights(model)
    check_interface(model)
    set_input_shapes(model, input_shapes)
    needs_calib = any(p.needs_calibration for p in pipeline)
    calib = held = evalset = None
    held_from = ""
    # verify on samples held back (even when no pass calibrates: every pipeline is then measured on the same ones);
    # synthesized data handed in (CalibrationData's default source) stays whole: verification synthesizes its own
    made_up = isinstance(calibration, calib_mod.CalibrationData) and calibration.source == "synthesized"
    if verify and calibration is not None and not made_up and eval_data is None:
        calib, held, held_from = calib_mod.load_with_holdout(model, calibration, holdout=holdout, tokenizer=tokenizer,
                                                             num_samples=num_samples, seq_len=seq_len, seed=seed,
                                                             warn=needs_calib)
    elif calibration is not None or needs_calib:
        calib = calib_mod.load_calibration(model, calibration, tokenizer=tokenizer, num_samples=num_samples,
                                           seq_len=seq_len, seed=seed, warn=needs_calib and calibration is not None)
        if calibration is None:
            log.warning("no calibration data given: synthesizing random inputs from the input signature (pass --calib "
                        "for statistics that match real use%s)", " and a quality gate" if verify else "")
    if eval_data is not None:
        evalset = calib_mod.load_calibration(model, eval_data, tokenizer=tokenizer, seq_len=seq_len, seed=seed,
                                             num_samples=holdout or calib_mod.HOLDOUT_MAX, warn=False)
    ctx = PassContext(model=model, calibration=calib, progress=progress, seed=seed, providers=providers)
    complete_types(model, ctx)  # every value typed (graphs without value_info); again after each pass
    if FOLDER in model.meta:  # a GenAI or Optimum folder: its sizes now, to bring its config in line when saved
        model.meta[FOLDER].before = describe_folder_model(model, model.meta[FOLDER].cache_patterns())
    report = Report(input=input_path or type(model).__name__, verified=verify,
                    calibration=None if calib is None else calib.source)

    if verify:
        feeds, verified_on, real_data = _verification_set(model, calib, held, held_from, evalset, needs_calib, seed)
    else:
        feeds, verified_on, real_data = verification_feeds(model, calib, seed), "", False
    single = {k: v[:1] if np.ndim(v) else v for k, v in feeds.items()}  # 0-d: a scalar input, no sample axis
    verifier = gate = None
    if verify:
        try:
            verifier = Verifier(model, feeds, providers)
        except Exception as exc:
            verifier = _one_sample_verifier(model, feeds, single, providers, ort_reason(exc))
            if verifier is None:
                raise UserError(f"the input model does not run in ONNX Runtime ({ort_reason(exc)}); "
                                f"{_run_hint(model, calib if evalset is None else evalset)}") from None
            verified_on = f"1 sample, the first of {verified_on}"
        bad = [k for k, v in verifier.reference.items()
               if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]
        if bad:
            raise UserError(f"the input model outputs NaN or Inf in '{bad[0]}' on {verified_on}, so there "
                            "is nothing to verify against; pass --calib inputs it runs correctly on")
        scored = choose_quality(verifier.feeds, verifier.reference, requested=quality, real_data=real_data,
                                data=verified_on)
        gate = Gate(scored, floor=min_quality, allow_degraded=allow_degraded)
        report.verified_on, report.quality = verified_on, scored.describe()
    else:
        _check_runs_without_verification(model, feeds, single, providers, pipeline)
    report.rows.append(PassRow("(input)", **model_stats(model, single)))
    if gate is not None:
        report.rows[0].quality = gate.quality.value(verifier.reference)
    previous = verifier.reference if verifier else None
    exact_limit = exact_bound(model, previous) if previous is not None else EXACT_REL_L2
    inherited = set(structural_problems(model))  # the input's own: never blamed on a pass
    if inherited:
        log.warning("the input model already fails the structural checks (%s); passes are checked for new problems "
                    "only", sorted(inherited)[0])

    for i, p in enumerate(pipeline):
        ctx.model = model
        t0 = time.perf_counter()
        log.info("running %r", p)
        try:
            result = p.run(model, ctx)
        except VerificationError:
            raise
        except UserError as exc:
            if getattr(p, "required_by", None):  # e.g. slice's fold-norms: name the pass the user asked for
                raise UserError(f"{p.required_by} runs {p.name} first, which refused: {exc}") from exc
            raise
        if result.model is not model:  # facts about the input model hold for what a pass made of it
            for key in (ONE_SAMPLE_PER_RUN, INPUT_SHAPES, SOURCE_PATH, FOLDER, REMOVED_OUTPUTS):
                if key in model.meta and key not in result.model.meta:
                    result.model.meta[key] = model.meta[key]
        model = result.model
        ctx.model = model
        complete_types(model, ctx)
        if result.modified:
            ctx.analyses.invalidate(p.preserves)
        elif (getattr(p, "required_by", None) and p.stage == Stage.CLEANUP) or getattr(p, "by_default", False):
            continue  # an exact pass brought in as a requirement (canonicalize) or by default (fuse) that found
            # nothing to do: no row
        seconds = time.perf_counter() - t0
        row = PassRow(repr(p), seconds=seconds, modified=result.modified, notes=result.notes,
                      skipped=list(result.skipped), **model_stats(model, single))
        if verifier is not None:
            checked = verifier.check(model, previous=previous, inherited=inherited)
            if checked["problems"]:
                raise VerificationError(p.name, checked["problems"][0])
            w = worst(checked["errors"])
            row.max_abs, row.rel_l2, row.cosine = w.max_abs, w.rel_l2, w.cosine
            row.per_output = {k: e.as_dict() for k, e in checked["errors"].items()}
            step = worst(checked["step_errors"])
            if p.exact and step is not None and step.rel_l2 > exact_limit:
                raise VerificationError(p.name, f"an exact rewrite changed the outputs (relative L2 {step.rel_l2:.2e} "
                                                f"> {exact_limit:.2g}, max abs {step.max_abs:.2e})")
            if max_error is not None and w.rel_l2 > max_error:
                raise VerificationError(p.name, f"output error {w.rel_l2:.3g} (relative L2) exceeds --max-error {max_error:g}")
            row.quality = gate.quality.value(checked["outputs"])
            recovery = next((q for q in pipeline[i + 1:] if q.recovers), None)
            gate.judge(repr(p), row.quality, _advice(p), recovery=repr(recovery) if recovery else None)
            previous = checked["outputs"]
        else:
            problems = [x for x in structural_problems(model) if x not in inherited]
            if problems:
                raise VerificationError(p.name, problems[0])
        report.rows.append(row)
    if gate is not None and gate.degraded:
        report.quality["degraded"] = list(gate.degraded)
    return CompileResult(model, report, input_path)
