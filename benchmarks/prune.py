"""prune benchmark: the ONNX light zoo at 30% channels, and three real models with and without `reconstruct`.

- light: every `onnx/backend/test/data/light/*.onnx` graph (constant weights) through `prune(channels=0.3)`
  with full verification (checker, strict shape inference, ORT run, output shapes): MACs, parameters.
- EfficientNet-Lite0 at 30% channels: top-1 agreement with the dense model on real photos not used for
  calibration (`real.photos`), latency at batch 1.
- all-MiniLM-L6-v2 with heads and FFN pruned: cosine to the dense model's sentence embeddings on real
  sentences (`real.sentences`, a seed not used for calibration), latency at batch 1, 128 tokens.
- SmolLM2-135M with FFN at 20%: perplexity on a held-out Shakespeare play, calibrated on another play;
  latency at batch 1, 128 tokens.

Latency: interleaved rounds with the dense model (`modelsurgeon.runtime.benchmark`), medians, the load average
recorded beside each measurement (other jobs share this machine).

    python benchmarks/prune.py [--models light,efficientnet,minilm,smollm2] [--no-latency] [--rounds 5]
                               [--out docs/results/prune.json]

Writes the JSON and the tables of docs/prune.md (between the BEGIN/END RESULTS markers).
"""

from __future__ import annotations

import argparse
import importlib.util
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
CALIB_PLAY, EVAL_PLAY = "hamlet", "macbeth"

VARIANTS = {
    "efficientnet": [("prune channels=0.3", "prune(channels=0.3)"),
                     ("prune channels=0.3 reconstruct", "prune(channels=0.3,reconstruct=true)"),
                     ("prune channels=0.3 activation reconstruct", "prune(channels=0.3,importance=activation,reconstruct=true)")],
    "minilm": [("prune heads=0.25 ffn=0.3", "prune(heads=0.25,ffn=0.3)"),
               ("prune heads=0.25 ffn=0.3 reconstruct", "prune(heads=0.25,ffn=0.3,reconstruct=true)"),
               ("prune heads=0.25 ffn=0.3 activation reconstruct", "prune(heads=0.25,ffn=0.3,importance=activation,reconstruct=true)")],
    "smollm2": [("prune ffn=0.2", "prune(ffn=0.2)"),
                ("prune ffn=0.2 reconstruct", "prune(ffn=0.2,reconstruct=true)"),
                ("prune ffn=0.2 activation reconstruct", "prune(ffn=0.2,importance=activation,reconstruct=true)")],
}


def file_size(path: pathlib.Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def light_rows() -> list[dict]:
    import modelsurgeon

    light = pathlib.Path(importlib.util.find_spec("onnx").submodule_search_locations[0]) / "backend/test/data/light"
    rows = []
    for path in sorted(light.glob("light_*.onnx")):
        name = path.stem.replace("light_", "")
        t0 = time.perf_counter()
        try:
            res = modelsurgeon.compile(path, "prune(channels=0.3)", progress=False)
        except Exception as exc:
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        first, last = res.report.rows[0], res.report.rows[-1]
        notes = res.report.rows[1].notes
        rows.append({"model": name, "macs": first.macs, "macs_pruned": last.macs,
                     "macs_removed": round(1 - last.macs / first.macs, 4), "parameters": first.parameters,
                     "parameters_pruned": last.parameters, "groups_pruned": notes.get("groups_pruned"),
                     "groups_frozen": notes.get("groups_frozen"), "channels_kept": notes.get("channels_kept"),
                     "verified": True, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"[light] {json.dumps(rows[-1])}", flush=True)
    return rows


def _title(texts: dict[str, str], want: str) -> str:
    for title in texts:
        if want in title.lower().replace(" ", ""):
            return title
    return sorted(texts)[0 if want == CALIB_PLAY else 1]


def setup_model(name: str, args, work: pathlib.Path):
    """(dense path, calibration, tokenizer, quality function, latency kwargs, notes) for a real model."""
    import modelsurgeon
    from modelsurgeon.calibration import CalibrationData
    from modelsurgeon.models import real
    from modelsurgeon.runtime.evaluate import evaluate, sentence_batches

    if name == "efficientnet":
        dense = pathlib.Path(real.efficientnet_lite0_onnx())
        photos = np.asarray(real.photos(args.photos), dtype=np.float32)
        n_cal = len(photos) // 2
        calib = CalibrationData({"pixels": photos[:n_cal]}, "real.photos (first half)")
        eval_file = work / "photos.npz"
        np.savez(eval_file, pixels=photos[n_cal:])
        note = f"EfficientNet-Lite0: calibration {n_cal} photos, top-1 agreement on the other {len(photos) - n_cal}"

        def quality(path):
            m = evaluate(str(path), str(dense), task="classification", data=str(eval_file),
                         num_samples=len(photos), batch_size=8).metrics
            return {"top1_agreement": m.get("top1_agreement"), "rel_l2": m.get("rel_l2")}

        return dense, calib, None, quality, {"batch": 1}, note
    if name == "minilm":
        dense, tok = pathlib.Path(real.minilm_onnx()), pathlib.Path(real.minilm_tokenizer())
        dense_ir = modelsurgeon.load(dense)
        calib_sents = list(real.sentences(args.calib_samples * 4, seed=1))
        taken = set(calib_sents)
        eval_sents = [s for s in real.sentences(args.eval_samples * 16, seed=2) if s not in taken]
        feeds = sentence_batches(dense_ir, calib_sents, str(tok), SEQ, len(calib_sents))[0]
        calib = CalibrationData(feeds, "real.sentences(seed=1)")
        del dense_ir
        eval_file = work / "sentences.txt"
        eval_file.write_text("\n".join(eval_sents) + "\n")
        note = (f"MiniLM: calibration {len(calib_sents)} sentences (seed 1), cosine to the dense model's sentence "
                f"embeddings on {len(eval_sents)} other sentences (seed 2)")

        def quality(path):
            m = evaluate(str(path), str(dense), task="embedding", data=str(eval_file), tokenizer=str(tok),
                         num_samples=len(eval_sents), seq_len=SEQ, batch_size=16).metrics
            return {"cosine_mean": m.get("cosine_mean"), "cosine_min": m.get("cosine_min"),
                    "spearman": m.get("spearman"), "nn_agreement": m.get("nn_agreement")}

        return dense, calib, str(tok), quality, {"batch": 1, "seq": SEQ}, note
    dense, tok = pathlib.Path(real.smollm2_onnx()), pathlib.Path(real.smollm2_tokenizer())
    texts = real.shakespeare_texts()
    calib_title, eval_title = _title(texts, CALIB_PLAY), _title(texts, EVAL_PLAY)
    calib_file, eval_file = work / "calib.txt", work / "eval.txt"
    calib_file.write_text(texts[calib_title])
    eval_file.write_text(texts[eval_title])
    note = (f"SmolLM2: calibration {args.calib_samples} x {SEQ} tokens of '{calib_title}', perplexity on "
            f"{args.eval_samples} x {SEQ} tokens of '{eval_title}'")

    def quality(path):
        m = evaluate(str(path), None, task="lm", data=str(eval_file), tokenizer=str(tok),
                     num_samples=args.eval_samples, seq_len=SEQ, batch_size=4).metrics
        return {"perplexity": m["perplexity"]}

    return dense, str(calib_file), str(tok), quality, {"batch": 1, "seq": SEQ}, note


def run_model(name: str, args, work: pathlib.Path) -> tuple[list[dict], list[dict], list[str]]:
    import modelsurgeon
    from modelsurgeon.runtime.benchmark import benchmark

    dense, calib, tok, quality, lat_kwargs, note = setup_model(name, args, work)
    rows, timed = [], []
    t0 = time.perf_counter()
    base = modelsurgeon.compile(str(dense), "cleanup", verify=False, progress=False)
    dense_out = work / f"{name}-dense.onnx"
    base.save(dense_out)
    row = {"model": name, "variant": "dense", "passes": "", "bytes": file_size(dense_out),
           "parameters": base.report.rows[-1].parameters, "macs_per_sample": base.report.rows[-1].macs}
    del base
    row.update(quality(dense_out))
    rows.append(row)
    timed.append(("dense", dense_out))
    print(f"[{name}] dense: {json.dumps(row)}", flush=True)
    for label, passes in VARIANTS[name]:
        t0 = time.perf_counter()
        try:
            res = modelsurgeon.compile(str(dense), passes, calibration=calib, tokenizer=tok,
                                       num_samples=args.calib_samples if name == "smollm2" else 10_000,
                                       seq_len=SEQ, verify=False, progress=False)
        except Exception as exc:
            rows.append({"model": name, "variant": label, "passes": passes, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"[{name}] {label}: FAILED {exc}", flush=True)
            continue
        compile_s = time.perf_counter() - t0
        out = work / f"{name}-{len(rows)}.onnx"
        res.save(out)
        final = res.report.rows[-1]
        notes = res.report.rows[1].notes
        row = {"model": name, "variant": label, "passes": passes, "bytes": file_size(out),
               "parameters": final.parameters, "macs_per_sample": final.macs, "compile_s": round(compile_s, 1),
               "notes": {k: v for k, v in notes.items() if k.endswith("_kept") or k in ("groups_pruned", "layers_refit")}}
        del res
        row.update(quality(out))
        rows.append(row)
        if "activation" not in label:
            timed.append((label, out))
        print(f"[{name}] {label}: {json.dumps({k: v for k, v in row.items() if k != 'passes'})}", flush=True)
    dense_row = rows[0]
    for row in rows:
        if "macs_per_sample" in row and dense_row.get("macs_per_sample"):
            row["macs_ratio"] = round(row["macs_per_sample"] / dense_row["macs_per_sample"], 4)
            row["parameters_ratio"] = round(row["parameters"] / dense_row["parameters"], 4)
        if "perplexity" in row and "perplexity" in dense_row:
            row["perplexity_ratio"] = round(row["perplexity"] / dense_row["perplexity"], 4)
    latency = []
    if not args.no_latency:
        load = os.getloadavg()
        rep = benchmark([str(p) for _, p in timed], labels=[l for l, _ in timed], warmup=2, rounds=args.rounds,
                        **lat_kwargs)
        for r in rep.rows:
            latency.append({"model": name, "variant": r.model, "median_ms": round(r.median_ms, 2),
                            "spread": round(r.spread, 3), "speedup_vs_dense": round(r.speedup, 3),
                            "loadavg_1m_before": round(load[0], 2), "loadavg_1m_after": round(os.getloadavg()[0], 2)})
        by_label = {l["variant"]: l for l in latency}
        for row in rows:
            if row.get("variant") in by_label:
                row["latency_ms"] = by_label[row["variant"]]["median_ms"]
                row["speedup_vs_dense"] = by_label[row["variant"]]["speedup_vs_dense"]
    return rows, latency, [note]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and v >= 100_000:
        return f"{v / 1e6:.2f}M"
    return str(v)


def markdown(result: dict) -> str:
    lines = []
    if result.get("light"):
        lines.append("### ONNX light zoo, `prune(channels=0.3)` (verified: checker, strict shape inference, ORT run)\n")
        cols = ["model", "macs", "macs_pruned", "macs_removed", "parameters", "parameters_pruned", "groups_pruned",
                "groups_frozen", "seconds"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in result["light"]:
            if "error" in r:
                lines.append(f"| {r['model']} | failed: {r['error'][:80]} |")
                continue
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        lines.append("")
    titles = {"efficientnet": "EfficientNet-Lite0, 30% of channels (top-1 agreement with the dense model on held-out photos)",
              "minilm": "all-MiniLM-L6-v2, 25% of heads and 30% of FFN units (embedding cosine on held-out sentences)",
              "smollm2": "SmolLM2-135M, 20% of FFN units (perplexity on a held-out play)"}
    quality_cols = {"efficientnet": ["top1_agreement"], "minilm": ["cosine_mean", "cosine_min", "spearman"],
                    "smollm2": ["perplexity", "perplexity_ratio"]}
    for model in result["models"]:
        rows = [r for r in result["rows"] if r["model"] == model]
        cols = ["variant", "parameters", "parameters_ratio", "macs_per_sample", "macs_ratio", *quality_cols[model],
                "latency_ms", "speedup_vs_dense", "compile_s"]
        lines.append(f"### {titles[model]}\n")
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['variant']} | failed: {r['error'][:80]} |")
                continue
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        lines.append("")
    for note in result["notes"]:
        lines.append(f"- {note}")
    loads = sorted({l["loadavg_1m_before"] for l in result["latency"]})
    lines.append(f"\nCommand: `{result['command']}`; load average (1 min) before latency runs: {loads or '-'}; "
                 f"total {result['seconds']:.0f} s on {result['machine'].get('cpu')} ({result['machine'].get('cores')} cores).")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="light,efficientnet,minilm,smollm2")
    ap.add_argument("--eval-samples", type=int, default=16, help="SmolLM2: 128-token windows; MiniLM: x16 sentences")
    ap.add_argument("--calib-samples", type=int, default=16, help="SmolLM2: 128-token windows; MiniLM: x4 sentences")
    ap.add_argument("--photos", type=int, default=32, help="EfficientNet: photos (half calibration, half evaluation)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "prune.json"))
    args = ap.parse_args()

    from modelsurgeon.runtime.benchmark import machine_info

    t0 = time.perf_counter()
    work = pathlib.Path(tempfile.mkdtemp(prefix="prune-bench-"))
    result = {"benchmark": "prune", "command": "python benchmarks/prune.py " + " ".join(sys.argv[1:]),
              "machine": machine_info(), "loadavg_start": os.getloadavg(), "light": [], "models": [], "rows": [],
              "latency": [], "notes": []}
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name == "light":
                result["light"] = light_rows()
                continue
            rows, latency, notes = run_model(name, args, work)
            result["models"].append(name)
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
    doc = ROOT / "docs" / "prune.md"
    if doc.exists():
        text = doc.read_text()
        begin, end = "<!-- BEGIN RESULTS -->", "<!-- END RESULTS -->"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            doc.write_text(head + begin + "\n" + markdown(result) + "\n" + end + tail)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
