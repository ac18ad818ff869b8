"""Does `prune(reconstruct=true)` carry past its calibration images? EfficientNet-Lite0 on scenes (`models.scenes`).

The refit solves each pruned layer's weights by least squares on the calibration activations. This script compares
the pruned model with the dense one (KL of the logits, top-1 agreement) on three sets of 128 scenes: the first of
the calibration scenes themselves, new scenes of the same objects on the same photos, and scenes of held-out objects
on held-out photos (the split of benchmarks/heal.py --scenes):

    python benchmarks/refit_generalization.py [--samples 256,2048] [--specs "prune(ratio=0.3,reconstruct=true)"]
                                              [--out docs/results/refit_generalization.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
N_SCORED = 128


def kl_and_top1(ref: np.ndarray, out: np.ndarray, label: str) -> dict:
    """Mean KL(dense || model) of the softmaxes and top-1 agreement, as `label` KL / `label` top-1."""
    la = ref - ref.max(1, keepdims=True)
    la -= np.log(np.exp(la).sum(1, keepdims=True))
    lb = out - out.max(1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(1, keepdims=True))
    return {f"{label} KL": round(float(np.mean(np.sum(np.exp(la) * (la - lb), 1))), 3),
            f"{label} top-1": round(float(np.mean(ref.argmax(1) == out.argmax(1))), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", default="256,2048", help="calibration sizes (scenes)")
    ap.add_argument("--specs", default="prune(ratio=0.3,reconstruct=true);prune(ratio=0.3,reconstruct=true,damp=0.1)",
                    help="pipelines, separated by ';'")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "refit_generalization.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import heal as bench

    import modelsurgeon
    from modelsurgeon.calibration import CalibrationData
    from modelsurgeon.context import PassContext
    from modelsurgeon.models import data, real
    from modelsurgeon.runtime.benchmark import machine_info
    from modelsurgeon.runtime.session import make_session

    scored, _, fit, fit_photos = bench.effnet_scene_split(holdout=False)
    mean, std = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in data.PREPROCESS["inception"])

    def scenes_of(objs, photos, n, seed):
        return ((bench.scene_pixels(objs, photos, n, seed) - mean) / std).astype(np.float32)

    dense = str(real.efficientnet_lite0_onnx())
    dense_session = make_session(dense)
    sets = {"same objects, new scenes": scenes_of(fit, fit_photos, N_SCORED, 5),
            "held-out objects and photos": scenes_of(scored, bench.EFFNET_HELD_OUT, N_SCORED, 2)}
    rows = []
    for n in (int(v) for v in args.samples.split(",")):
        calib = scenes_of(fit, fit_photos, n, 0)
        for spec in args.specs.split(";"):
            model = modelsurgeon.load(dense)
            ctx = PassContext(model=model, calibration=CalibrationData({"pixels": calib}, "scenes"), progress=False)
            t0 = time.perf_counter()
            model, _ = bench.run_pipeline(model, ctx, spec)
            seconds = time.perf_counter() - t0
            session = make_session(model)
            row = {"passes": spec, "calib_samples": n, "pass_s": round(seconds, 1)}
            for name, x in {"calibration": calib[:N_SCORED], **sets}.items():
                row.update(kl_and_top1(dense_session.run(None, {"pixels": x})[0], session.run(None, {"pixels": x})[0],
                                       name))
            print(json.dumps(row), flush=True)
            rows.append(row)
    doc = {"benchmark": "refit_generalization", "machine": machine_info(), "rows": rows,
           "command": "python benchmarks/refit_generalization.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    pathlib.Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
