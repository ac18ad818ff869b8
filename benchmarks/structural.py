"""structural benchmark: drop-blocks, share, lowrank (svd / asvd / svdllm) and EoRA on real models.

- SmolLM2-135M-Instruct: calibrated on one Shakespeare play, perplexity on windows of another (128 tokens each).
- all-MiniLM-L6-v2: calibrated on real sentences, embedding cosine against the dense model on different sentences.

Variants: drop-blocks n=2,4,6 (SmolLM2; n=1,2,3 on MiniLM's 6 blocks) with bi and angular; share groups of 2
(without and with correct=lowrank(32)); lowrank 10/20/30% of the eligible parameters with each method; quant4
(RTN, block 32) alone and with EoRA rank 16 and 32. For each: file size, parameters, quality, compile time, and
latency (interleaved with the dense model, medians; batch 1, 128 tokens) for a subset.

    python benchmarks/structural.py [--models smollm2,minilm] [--eval-samples 16] [--calib-samples 16]
                                    [--no-latency] [--out docs/results/structural.json]

Writes the JSON and the results tables of docs/structural.md (between the BEGIN/END RESULTS markers).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEQ = 128
CALIB_PLAY, EVAL_PLAY = "hamlet", "macbeth"   # matched loosely against the titles real.shakespeare_texts() gives


def variants(model: str) -> list[tuple[str, str, bool]]:
    """(label, passes, measure latency)."""
    drops = (2, 4, 6) if model == "smollm2" else (1, 2, 3)
    out = [("dense", "cleanup", True)]
    for n in drops:
        out.append((f"drop-blocks n={n} bi", f"drop-blocks(n={n},metric=bi)", True))
        out.append((f"drop-blocks n={n} angular", f"drop-blocks(n={n},metric=angular)", False))
    out.append(("share groups=2", "share(groups=2)", True))
    out.append(("share groups=2 + lowrank(32)", "share(groups=2,correct=lowrank(32))", True))
    for method in ("svd", "asvd", "svdllm"):
        for ratio in (0.1, 0.2, 0.3):
            out.append((f"lowrank {int(ratio * 100)}% {method}", f"lowrank(ratio={ratio},method={method})",
                        method == "svdllm"))
    out.append(("quant4 rtn b32", "quant4(block=32)", True))
    for rank in (16, 32):
        out.append((f"quant4 rtn b32 + eora {rank}", f"eora(rank={rank},quant=quant4(block=32))", True))
    return out


def _title(texts: dict[str, str], want: str) -> str:
    for title in texts:
        if want in title.lower().replace(" ", ""):
            return title
    return sorted(texts)[0 if want == CALIB_PLAY else 1]


def file_size(path: pathlib.Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def compile_variant(path: pathlib.Path, passes: str, calibration, extra: dict):
    """Run a pipeline the way the manager does (requirements, analyses, cleanup) without its per-pass
    verification and statistics: every variant is evaluated in ONNX Runtime right after, which checks that it
    runs, and measured there. Returns (model, the first pass's result)."""
    import modelsurgeon
    from modelsurgeon.context import PassContext
    from modelsurgeon.pipeline import build_pipeline, parse_passes

    model = modelsurgeon.load(path)
    ctx = PassContext(model=model, calibration=calibration, progress=False, extra=extra)
    first = None
    for p in build_pipeline(parse_passes(passes)):
        ctx.model = model
        result = p.run(model, ctx)
        model = result.model
        if result.modified:
            ctx.analyses.invalidate(p.preserves)
        first = first or result
    return model, first


def run_model(name: str, args, work: pathlib.Path) -> tuple[list[dict], list[dict], list[str]]:
    import modelsurgeon
    from modelsurgeon.calibration import CalibrationData, load_calibration
    from modelsurgeon.stats import count_parameters
    from modelsurgeon.models import real
    from modelsurgeon.runtime.benchmark import benchmark
    from modelsurgeon.runtime.evaluate import evaluate

    notes = []
    if name == "smollm2":
        dense, tok = pathlib.Path(real.smollm2_onnx()), pathlib.Path(real.smollm2_tokenizer())
        texts = real.shakespeare_texts()
        calib_title, eval_title = _title(texts, CALIB_PLAY), _title(texts, EVAL_PLAY)
        calib_file, eval_file = work / "calib.txt", work / "eval.txt"
        calib_file.write_text(texts[calib_title])
        eval_file.write_text(texts[eval_title])
        calibration = str(calib_file)
        notes.append(f"SmolLM2: calibration {args.calib_samples} x {SEQ} tokens of '{calib_title}', perplexity on "
                     f"{args.eval_samples} x {SEQ} tokens of '{eval_title}'")

        def quality(path):
            m = evaluate(str(path), None, task="lm", data=str(eval_file), tokenizer=str(tok),
                         num_samples=args.eval_samples, seq_len=SEQ, batch_size=4).metrics
            return {"perplexity": m["perplexity"]}
    else:
        dense, tok = pathlib.Path(real.minilm_onnx()), pathlib.Path(real.minilm_tokenizer())
        n_calib, n_eval = args.calib_samples * 4, args.eval_samples * 16
        pool = real.sentences(n_calib + n_eval, seed=0)
        calib_sents, eval_sents = pool[:n_calib], pool[n_calib:]
        calibration = CalibrationData(real.minilm_inputs(calib_sents, max_length=SEQ), "real.sentences")
        eval_file = work / "sentences.txt"
        eval_file.write_text("\n".join(eval_sents) + "\n")
        notes.append(f"MiniLM: calibration {len(calib_sents)} real sentences, cosine to the dense model's "
                     f"sentence embeddings on {len(eval_sents)} other sentences (real.sentences)")

        def quality(path):
            m = evaluate(str(path), str(dense), task="embedding", data=str(eval_file), tokenizer=str(tok),
                         num_samples=len(eval_sents), seq_len=SEQ, batch_size=16).metrics
            return {"cosine_mean": m.get("cosine_mean"), "cosine_min": m.get("cosine_min"),
                    "spearman": m.get("similarity_spearman"), "nn_agreement": m.get("nearest_neighbour_agreement")}

    rows, timed = [], []
    dense_ir = modelsurgeon.load(dense)
    calib_data = load_calibration(dense_ir, calibration, tokenizer=str(tok), num_samples=args.calib_samples
                                  if name == "smollm2" else 10_000, seq_len=SEQ, warn=False)
    del dense_ir
    from modelsurgeon.passes.lowrank import SPECTRA_CACHE, STATS_CACHE

    extra = {STATS_CACHE: {}}
    for label, passes, lat in variants(name):
        method = passes.split("method=")[1].rstrip(")") if passes.startswith("lowrank") else None
        if extra.get("method") != method:  # one method's SVDs held at a time (memory)
            extra.update({SPECTRA_CACHE: {}, "method": method})
        t0 = time.perf_counter()
        try:
            res = compile_variant(dense, passes, calib_data, extra)
        except Exception as exc:  # keep going: one failing variant should not hide the others
            rows.append({"model": name, "variant": label, "passes": passes, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"[{name}] {label}: FAILED {exc}", flush=True)
            continue
        compile_s = time.perf_counter() - t0
        out = work / f"{name}-{len(rows)}.onnx"
        model, first = res
        modelsurgeon.save(model, out)
        row = {"model": name, "variant": label, "passes": passes, "bytes": file_size(out),
               "parameters": count_parameters(model), "compile_s": round(compile_s, 1)}
        if first is not None and first.notes:
            keep = ("removed", "parameters_removed", "removed_share_of_eligible", "layers_factored", "groups",
                    "eora_layers", "layer_rel_error_before_mean", "layer_rel_error_after_mean")
            row["notes"] = {k: v for k, v in first.notes.items() if k in keep}
        del res, model
        t1 = time.perf_counter()
        row.update(quality(out))
        row["eval_s"] = round(time.perf_counter() - t1, 1)
        rows.append(row)
        if lat:
            timed.append((label, out))
        print(f"[{name}] {label}: {json.dumps({k: v for k, v in row.items() if k not in ('notes', 'passes')})}", flush=True)
    dense_row = rows[0]
    for row in rows:
        if "bytes" in row:
            row["size_ratio"] = round(row["bytes"] / dense_row["bytes"], 4)
            if "perplexity" in row:
                row["perplexity_ratio"] = round(row["perplexity"] / dense_row["perplexity"], 4)

    latency = []
    if not args.no_latency and timed:
        dense_path = timed[0][1]
        others = timed[1:]
        group = 4  # models per interleaved measurement (memory), each group measured with the dense model first
        for start in range(0, len(others), group):
            chunk = [("dense", dense_path)] + others[start:start + group]
            load = os.getloadavg()
            rep = benchmark([str(p) for _, p in chunk], labels=[l for l, _ in chunk], batch=1, seq=SEQ,
                            warmup=2, rounds=args.rounds)
            for r in rep.rows:
                if r.model == "dense" and start > 0:
                    continue
                latency.append({"model": name, "variant": r.model, "median_ms": round(r.median_ms, 2),
                                "spread": round(r.spread, 3), "speedup_vs_dense": round(r.speedup, 3),
                                "loadavg_1m": round(load[0], 2)})
    by_label = {l["variant"]: l for l in latency}
    for row in rows:
        if row.get("variant") in by_label:
            row["latency_ms_b1_s128"] = by_label[row["variant"]]["median_ms"]
            row["speedup_vs_dense"] = by_label[row["variant"]]["speedup_vs_dense"]
    notes.append("compile_s: load + passes + cleanup; lowrank variants after the first of each method reuse "
                 "its calibration statistics and SVDs (same model and data)")
    return rows, latency, notes


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(result: dict) -> str:
    lines = []
    for model in result["models"]:
        rows = [r for r in result["rows"] if r["model"] == model]
        if model == "smollm2":
            cols = ["variant", "bytes", "size_ratio", "parameters", "perplexity", "perplexity_ratio",
                    "latency_ms_b1_s128", "speedup_vs_dense", "compile_s"]
            lines.append("### SmolLM2-135M (perplexity on held-out Shakespeare)\n")
        else:
            cols = ["variant", "bytes", "size_ratio", "parameters", "cosine_mean", "cosine_min", "spearman",
                    "nn_agreement", "latency_ms_b1_s128", "speedup_vs_dense", "compile_s"]
            lines.append("### all-MiniLM-L6-v2 (embedding cosine to the dense model on real sentences)\n")
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['variant']} | failed: {r['error'][:80]} |")
                continue
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        lines.append("")
    lines.append(f"Command: `{result['command']}`; load average during latency runs: "
                 f"{sorted({l['loadavg_1m'] for l in result['latency']}) or '-'}; total {result['seconds']:.0f} s.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--eval-samples", type=int, default=16, help="SmolLM2: 128-token windows; MiniLM: x16 sentences")
    ap.add_argument("--calib-samples", type=int, default=16, help="SmolLM2: 128-token windows; MiniLM: x4 sentences")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "structural.json"))
    args = ap.parse_args()

    from modelsurgeon.runtime.benchmark import machine_info

    t0 = time.perf_counter()
    work = pathlib.Path(tempfile.mkdtemp(prefix="structural-"))
    result = {"benchmark": "structural", "command": "python benchmarks/structural.py " + " ".join(sys.argv[1:]),
              "machine": machine_info(), "loadavg_start": os.getloadavg(), "models": [], "rows": [], "latency": [],
              "notes": []}
    try:
        for name in args.models.split(","):
            rows, latency, notes = run_model(name.strip(), args, work)
            result["models"].append(name.strip())
            result["rows"] += rows
            result["latency"] += latency
            result["notes"] += notes
            for f in work.glob("*.onnx*"):
                f.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t0
    result["loadavg_end"] = os.getloadavg()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    from modelsurgeon.runtime.benchmark import write_results_section

    write_results_section(ROOT / "docs" / "structural.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
