"""Bytes, quality and speed of the 4-bit formats: the Pareto table of issue 19.

Which weight format a user should pick is a trade of three things; one table shows them side by side, with the rows
no other row beats on all three marked:

- SmolLM2-135M, as it is run (the KV-cache decode loop of benchmarks/decode.py): MiB of the model files, perplexity
  on 16 x 128 tokens of Macbeth, decode ms per token at context 128 (2 threads, spinning off, interleaved rounds).
  Measured by `python benchmarks/decode.py --set pareto ...`, whose JSON this script reads (`--smollm2`).
- all-MiniLM-L6-v2: MiB, mean cosine of the sentence embeddings to the fp32 model's on sentences the passes never
  saw, and ms per call at batch 1 for a 128-token and a 16-token input (interleaved, medians), measured here.

Rows: quant4 round-to-nearest and GPTQ at blocks 32/64/128, GPTQ with zero points dropped (symmetric), GPTQ at
block 128 with the most sensitive layers at 8 bits (mixed 4/8), spquant at 0/10/25/50% group sparsity, and dense
spquant with 8-bit scale codes (block-32 groups at 4.25 bits per weight). On
SmolLM2 the head and its tied embedding table are 4-bit in every row (spquant leaves the head, quant4(gptq) takes
it); on MiniLM the word-embedding table stays float in every row (the same 44.7 MiB in each).

    python benchmarks/decode.py --set pareto --contexts 128 --rounds 9 --no-genai-runtime \\
        --only '^(GenAI int4|quant4|spquant)' --out docs/results/pareto_smollm2.json
    python benchmarks/pareto.py --smollm2 docs/results/pareto_smollm2.json

Writes docs/results/pareto.json, docs/results/pareto.png and the table in docs/spquant.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import decode as D  # noqa: E402  (the model-bytes count, shared with the SmolLM2 rows)

THREADS = 2
MINILM_CALIB, MINILM_EVAL, MINILM_SEQ = 512, 512, 128
MINILM_ROWS = {  # label: passes ("" = the fp32 model itself)
    "fp32": "",
    **{f"quant4 rtn, block {b}": f"quant4(block={b})" for b in (32, 64, 128)},
    **{f"quant4 gptq, block {b}": f"quant4(algo=gptq,block={b})" for b in (32, 64, 128)},
    "quant4 gptq, block 32, symmetric": "quant4(algo=gptq,symmetric=true)",
    "quant4 gptq, block 128, 8 layers at 8 bits": "quant4(algo=gptq,block=128,keep8=8)",
    **{f"spquant {int(s * 100)}% groups": f"spquant(sparsity={s}{',min_saving=0' if s == 0 else ''})"
       for s in (0, 0.1, 0.25, 0.5)},
    "spquant 0% groups, 8-bit scales": "spquant(sparsity=0,min_saving=0,scale_bits=8)",
    "spquant 0% groups, 8-bit scales, block 64 (up to 256)": "spquant(sparsity=0,block=64,max_block=256,min_saving=0,"
                                                             "scale_bits=8)",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def minilm_rows(work: pathlib.Path, rounds: int) -> dict:
    """Compile every MINILM_ROWS pipeline on MiniLM, then its cosine and interleaved batch-1 latencies."""
    import modelsurgeon
    from modelsurgeon.calibration import CalibrationData
    from modelsurgeon.models import real
    from modelsurgeon.runtime.custom_ops import session_path
    from modelsurgeon.runtime.evaluate import evaluate
    from modelsurgeon.runtime.session import make_session

    dense, tok = pathlib.Path(real.minilm_onnx()), pathlib.Path(real.minilm_tokenizer())
    pool = real.sentences(MINILM_CALIB + MINILM_EVAL, seed=0)
    calibration = CalibrationData(real.minilm_inputs(pool[:MINILM_CALIB], max_length=MINILM_SEQ), "real.sentences")
    eval_file = work / "sentences.txt"
    eval_file.write_text("\n".join(pool[MINILM_CALIB:]) + "\n")
    rows, paths = [], {}
    for label, passes in MINILM_ROWS.items():
        row = {"label": label, "passes": passes}
        if passes:
            t0 = time.perf_counter()
            res = modelsurgeon.compile(str(dense), passes, calibration=calibration, num_samples=MINILM_CALIB, progress=False,
                                       verify=False)
            out = work / "".join(c if c.isalnum() else "_" for c in label) / "model.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            paths[label] = pathlib.Path(res.save(out))
            row["compile_s"] = round(time.perf_counter() - t0, 1)
        else:
            paths[label] = dense
        m = evaluate(str(paths[label]), str(dense), task="embedding", data=str(eval_file), tokenizer=str(tok),
                     num_samples=MINILM_EVAL, seq_len=MINILM_SEQ, batch_size=16).metrics
        row.update(size_MiB=D.folder_mib(paths[label].parent) if passes else dense.stat().st_size / 2**20,
                   cosine=m["cosine_mean"], cosine_min=m["cosine_min"])
        log(f"MiniLM {label}: {row['size_MiB']:.1f} MiB, cosine {row['cosine']:.4f}")
        rows.append(row)
    sessions = {label: make_session(str(p), threads=THREADS) for label, p in paths.items()}
    feeds = {}
    for seq in (128, 16):
        ids = real.minilm_inputs([" ".join(pool[:40])], max_length=seq)
        feeds[seq] = {k: v[:, :seq] for k, v in ids.items()}
    names = {label: {i.name for i in s.get_inputs()} for label, s in sessions.items()}
    times = {(label, seq): [] for label in sessions for seq in feeds}
    for label, s in sessions.items():  # warm-up
        for f in feeds.values():
            s.run(None, {k: v for k, v in f.items() if k in names[label]})
    load_before = os.getloadavg()
    for _ in range(rounds):
        for seq, f in feeds.items():
            for label, s in sessions.items():
                inp = {k: v for k, v in f.items() if k in names[label]}
                t0 = time.perf_counter()
                for _ in range(5):
                    s.run(None, inp)
                times[(label, seq)].append((time.perf_counter() - t0) / 5 * 1e3)
    for row in rows:
        for seq in feeds:
            row[f"ms_{seq}"] = statistics.median(times[(row["label"], seq)])
        row["ort_path"] = session_path(sessions[row["label"]])
    return {"rows": rows, "calibration": f"{MINILM_CALIB} real sentences", "evaluation":
            f"{MINILM_EVAL} other sentences, max {MINILM_SEQ} tokens", "rounds": rounds, "load_before": load_before,
            "load_after": os.getloadavg()}


def smollm2_rows(decode_json: pathlib.Path) -> dict:
    doc = json.loads(decode_json.read_text())
    rows = [{"label": r["name"].removesuffix(" [dynamo]"), "size_MiB": r["size_MiB"], "ppl": r["ppl"],
             "ms_decode_128": 1e3 / r["decode_tps_128"], "decode_vs_genai_int4_128": r.get("decode_vs_anchor_128")}
            for r in doc["rows"] if "refused" not in r and "decode_tps_128" in r]
    return {"rows": rows, "source": str(decode_json.relative_to(ROOT) if decode_json.is_relative_to(ROOT) else decode_json),
            "command": doc.get("command"), "load_before": doc.get("load_before"), "load_after": doc.get("load_after")}


def pareto_front(points: list[tuple[float, ...]]) -> list[bool]:
    """True for each point no other point dominates (every coordinate <= and one <; all coordinates: lower is better)."""
    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))
    return [not any(dominates(q, p) for j, q in enumerate(points) if j != i) for i, p in enumerate(points)]


def mark_fronts(rows: list[dict], quality: str, higher_better: bool, speed: str) -> None:
    sign = -1.0 if higher_better else 1.0
    q = [(r["size_MiB"], sign * r[quality]) for r in rows]
    for r, on in zip(rows, pareto_front(q)):
        r["front_size_quality"] = on
    for r, on in zip(rows, pareto_front([p + (r[speed],) for p, r in zip(q, rows)])):
        r["front_size_quality_speed"] = on


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = ["row"] + [c[1] for c in cols] + ["front: size, quality", "front: + speed"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"]] + [format(r[k], f) if r.get(k) is not None else "-" for k, _, f in cols]
        cells += ["**yes**" if r["front_size_quality"] else "", "**yes**" if r["front_size_quality_speed"] else ""]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(doc: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, q, lab) for k, q, lab in (("smollm2", "ppl", "perplexity (Macbeth), lower is better"),
                                            ("minilm", "cosine", "embedding cosine to fp32, higher is better"))
              if doc.get(k)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (key, q, lab) in zip(axes[0], panels):
        rows = [r for r in doc[key]["rows"] if r["label"] != "fp32"]
        for r in rows:
            kind = "spquant" if r["label"].startswith("spquant") else "GenAI" if r["label"].startswith("GenAI") else "quant4"
            ax.scatter(r["size_MiB"], r[q], marker={"spquant": "s", "GenAI": "^", "quant4": "o"}[kind],
                       color="C3" if r["front_size_quality"] else "C0")
            ax.annotate(r["label"][:34], (r["size_MiB"], r[q]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = sorted((r["size_MiB"], r[q]) for r in rows if r["front_size_quality"])
        ax.plot(*zip(*front), color="C3", lw=0.8)
        ax.set_xlabel("model files, MiB")
        ax.set_ylabel(lab)
        ax.set_title(f"{'SmolLM2-135M' if key == 'smollm2' else 'all-MiniLM-L6-v2'} (red: size/quality front)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_doc(doc: dict, page: pathlib.Path) -> None:
    parts = []
    if doc.get("smollm2"):
        parts += ["SmolLM2-135M (" + doc["smollm2"]["command"] + "):", "",
                  table(doc["smollm2"]["rows"], [("size_MiB", "MiB", ".1f"), ("ppl", "ppl Macbeth", ".2f"),
                                                 ("ms_decode_128", "decode ms/token @128", ".2f"),
                                                 ("decode_vs_genai_int4_128", "decode vs GenAI int4", ".2f")]), ""]
    if doc.get("minilm"):
        parts += [f"all-MiniLM-L6-v2 (`{doc['minilm'].get('command', doc['command']).strip()}`, the word-embedding table float in every row):", "",
                  table(doc["minilm"]["rows"], [("size_MiB", "MiB", ".1f"), ("cosine", "cosine", ".4f"),
                                                ("ms_128", "ms, 128 tokens", ".2f"), ("ms_16", "ms, 16 tokens", ".2f")]),
                  ""]
    text = page.read_text()
    a, b = text.index("<!-- BEGIN PARETO -->"), text.index("<!-- END PARETO -->")
    page.write_text(text[:a] + "<!-- BEGIN PARETO -->\n" + "\n".join(parts) + text[b:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", type=pathlib.Path, help="decode.py --set pareto JSON to read")
    ap.add_argument("--skip-minilm", action="store_true", help="keep the MiniLM rows already in --out")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--work", type=pathlib.Path, default=None)
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "results" / "pareto.json")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "spquant.md"), help="page whose PARETO markers get the table "
                    "('' = none)")
    args = ap.parse_args(argv)
    import tempfile

    doc: dict = {"benchmark": "pareto", "command": "python benchmarks/pareto.py " + " ".join(sys.argv[1:]),
                 "threads": THREADS, "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.smollm2:
        doc["smollm2"] = smollm2_rows(args.smollm2.resolve())
        mark_fronts(doc["smollm2"]["rows"], "ppl", False, "ms_decode_128")
    if args.skip_minilm:
        kept = json.loads(args.out.read_text()).get("minilm") if args.out.exists() else None
        if kept is not None:
            doc["minilm"] = kept
    else:
        work = args.work or pathlib.Path(tempfile.mkdtemp(prefix="pareto_"))
        doc["minilm"] = minilm_rows(work, args.rounds)
        doc["minilm"]["command"] = doc["command"]
        mark_fronts(doc["minilm"]["rows"], "cosine", True, "ms_128")
    import onnxruntime

    doc["onnxruntime"] = onnxruntime.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    plot(doc, args.out.with_suffix(".png"))
    if args.doc:
        write_doc(doc, pathlib.Path(args.doc))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
