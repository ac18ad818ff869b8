"""prune benchmark: the ONNX light zoo at 30% channels, and three real models with and without `reconstruct`.

- light: every `onnx/backend/test/data/light/*.onnx` graph (constant weights) through `prune(channels=0.3,multiple=1)`
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


def variants(model: str) -> list[tuple[str, str]]:
    """(label, prune options): each importance with and without reconstruct."""
    spec = {"efficientnet": "channels=0.3", "minilm": "heads=0.25,ffn=0.3", "smollm2": "ffn=0.2"}[model]
    out = []
    for imp in ("magnitude", "activation"):
        out.append((f"{spec} {imp}", f"{spec},importance={imp}"))
        out.append((f"{spec} {imp} reconstruct", f"{spec},importance={imp},reconstruct=true"))
    if model == "efficientnet":  # how quality depends on the amount, for the most careful method
        out.append(("channels=0.1 activation reconstruct", "channels=0.1,importance=activation,reconstruct=true"))
    return out


def file_size(path: pathlib.Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def weight_elements(model) -> int:
    """Elements of every float constant a node reads, ConstantOfShape-filled ones included (the light zoo
    stores its weights so); each tensor counted once."""
    from modelsurgeon.analyses.channel_deps import constant_array, is_constant

    seen, total = set(), 0
    for node in model.graph:
        for v in node.inputs:
            if v is None or id(v) in seen or not is_constant(v):
                continue
            seen.add(id(v))
            arr = constant_array(v)
            if arr is not None and np.issubdtype(arr.dtype, np.floating):
                total += int(arr.size)
    return total


def light_rows() -> list[dict]:
    import modelsurgeon

    light = pathlib.Path(importlib.util.find_spec("onnx").submodule_search_locations[0]) / "backend/test/data/light"
    rows = []
    for path in sorted(light.glob("light_*.onnx")):
        name = path.stem.replace("light_", "")
        t0 = time.perf_counter()
        try:
            res = modelsurgeon.compile(path, "prune(channels=0.3,multiple=1)", progress=False)
        except Exception as exc:
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        first, last = res.report.rows[0], res.report.rows[-1]
        notes = res.report.rows[1].notes
        weights_before = weight_elements(modelsurgeon.load(path))
        weights_after = weight_elements(res.model)
        rows.append({"model": name, "macs": first.macs, "macs_pruned": last.macs,
                     "macs_removed": round(1 - last.macs / first.macs, 4), "weights": weights_before,
                     "weights_pruned": weights_after, "weights_removed": round(1 - weights_after / weights_before, 4), "groups_pruned": notes.get("groups_pruned"),
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
        from modelsurgeon.models import data

        dense = pathlib.Path(real.efficientnet_lite0_onnx())
        n = min(args.photos, data.MAX_PHOTOS)
        names = data.photo_names(n)
        pixels = np.asarray(real.photos(n, "inception"), dtype=np.float32)  # the model's training preprocessing
        bases = sorted({nm.split("/")[0] for nm in names})
        calib_bases = set(bases[::2])  # split by photo, not by crop: no photo is in both halves
        is_cal = np.array([nm.split("/")[0] in calib_bases for nm in names])
        calib = CalibrationData({"pixels": pixels[is_cal]}, "real.photos (every other photo, all crops)")
        eval_file = work / "photos.npz"
        np.savez(eval_file, pixels=pixels[~is_cal])
        note = (f"EfficientNet-Lite0: {n} crops of {len(bases)} real photos ([-1, 1] inputs); calibration on "
                f"{int(is_cal.sum())} crops of {len(calib_bases)} photos, top-1 agreement on {int((~is_cal).sum())} "
                "crops of the other photos")

        def quality(path):
            m = evaluate(str(path), str(dense), task="classification", data=str(eval_file),
                         num_samples=int((~is_cal).sum()), batch_size=8).metrics
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


def prune_model(dense: pathlib.Path, options: str, calib, tok, args, name: str):
    """The prune pass and cleanup, run directly (the manager's per-pass verification and statistics are left
    out to keep the benchmark short; tests/test_prune.py verifies the same rewrites)."""
    import modelsurgeon
    from modelsurgeon.calibration import load_calibration
    from modelsurgeon.context import PassContext
    from modelsurgeon.pass_api import get_pass

    model = modelsurgeon.load(dense)
    data = load_calibration(model, calib, tokenizer=tok, num_samples=args.calib_samples if name == "smollm2" else 10_000,
                            seq_len=SEQ, warn=False)
    ctx = PassContext(model=model, calibration=data, progress=False)
    opts = dict(kv.split("=") for kv in options.split(","))
    result = get_pass("prune")(**opts).run(model, ctx)
    get_pass("cleanup")().run(result.model, ctx)
    return result.model, result.notes


def macs_of(path: pathlib.Path, feeds) -> int | None:
    import modelsurgeon
    from modelsurgeon.stats import estimate_macs

    return estimate_macs(modelsurgeon.load(path), feeds)


def run_model(name: str, args, work: pathlib.Path) -> tuple[list[dict], list[dict], list[str]]:
    import modelsurgeon
    from modelsurgeon.runtime.benchmark import bench_feeds, benchmark

    dense, calib, tok, quality, lat_kwargs, note = setup_model(name, args, work)
    dense_ir = modelsurgeon.load(dense)
    feeds = bench_feeds(dense_ir, lat_kwargs.get("batch", 1), lat_kwargs.get("seq"))
    from modelsurgeon.stats import count_parameters

    row = {"model": name, "variant": "dense", "parameters": count_parameters(dense_ir), "bytes": file_size(dense),
           "macs": macs_of(dense, feeds)}
    del dense_ir
    row.update(quality(dense))
    rows, timed = [row], [("dense", dense)]
    macs: dict[str, int | None] = {}
    print(f"[{name}] dense: {json.dumps(row)}", flush=True)
    for label, options in variants(name):
        t0 = time.perf_counter()
        try:
            model, notes = prune_model(dense, options, calib, tok, args, name)
        except Exception as exc:
            rows.append({"model": name, "variant": label, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"[{name}] {label}: FAILED {exc}", flush=True)
            continue
        seconds = time.perf_counter() - t0
        out = work / f"{name}-{len(rows)}.onnx"
        modelsurgeon.save(model, out)
        row = {"model": name, "variant": label, "passes": f"prune({options})", "parameters": count_parameters(model),
               "bytes": file_size(out), "prune_s": round(seconds, 1),
               "notes": {k: v for k, v in notes.items() if k.endswith("_kept") or k in ("groups_pruned", "layers_refit")}}
        del model
        amount = options.split(",importance")[0]  # variants with the same amount have the same shapes
        if amount not in macs:
            macs[amount] = macs_of(out, feeds)
        row["macs"] = macs[amount]
        if len(timed) == 1:  # one latency per shape: the first variant's
            timed.append((f"pruned {amount}", out))
        row.update(quality(out))
        rows.append(row)
        print(f"[{name}] {label}: {json.dumps({k: v for k, v in row.items() if k != 'passes'})}", flush=True)
    dense_row = rows[0]
    for row in rows[1:]:
        if "parameters" in row:
            row["parameters_ratio"] = round(row["parameters"] / dense_row["parameters"], 4)
            if row.get("macs") and dense_row.get("macs"):
                row["macs_ratio"] = round(row["macs"] / dense_row["macs"], 4)
        if "perplexity" in row and "perplexity" in dense_row:
            row["perplexity_ratio"] = round(row["perplexity"] / dense_row["perplexity"], 4)
    latency = []
    if not args.no_latency and len(timed) > 1:
        load = os.getloadavg()
        rep = benchmark([str(p) for _, p in timed], labels=[l for l, _ in timed], warmup=2, rounds=args.rounds,
                        **lat_kwargs)
        for r in rep.rows:
            latency.append({"model": name, "variant": r.model, "median_ms": round(r.median_ms, 2),
                            "spread": round(r.spread, 3), "speedup_vs_dense": round(r.speedup, 3),
                            "loadavg_1m_before": round(load[0], 2), "loadavg_1m_after": round(os.getloadavg()[0], 2)})
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
        lines.append("### ONNX light zoo, `prune(channels=0.3,multiple=1)` (verified: checker, strict shape inference, ORT run)\n")
        cols = ["model", "macs", "macs_pruned", "macs_removed", "weights", "weights_pruned", "weights_removed", "groups_pruned",
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
        cols = ["variant", "parameters", "parameters_ratio", "macs", "macs_ratio", *quality_cols[model], "prune_s"]
        lines.append(f"### {titles[model]}\n")
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['variant']} | failed: {r['error'][:80]} |")
                continue
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        lat = [l for l in result["latency"] if l["model"] == model]
        if lat:
            lines.append("")
            lines.append("Latency (" + ("batch 1" if model == "efficientnet" else f"batch 1, {SEQ} tokens") + "): "
                         + "; ".join(f"{l['variant']} {l['median_ms']} ms (spread {l['spread']:.0%}, speedup "
                                     f"{l['speedup_vs_dense']:.2f}x)" for l in lat)
                         + f"; load average {lat[0]['loadavg_1m_before']} -> {lat[0]['loadavg_1m_after']}.")
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
    ap.add_argument("--calib-samples", type=int, default=64, help="SmolLM2: 128-token windows; MiniLM: x4 sentences")
    ap.add_argument("--photos", type=int, default=90, help="EfficientNet: photo crops (split by photo into calibration and evaluation)")
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
    from modelsurgeon.runtime.benchmark import write_results_section

    write_results_section(ROOT / "docs" / "prune.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
