"""spquant benchmark: our SparseQuantMatMul kernel vs MatMulNBits (accuracy_level=4) vs fp32 MatMul, and end to end.

Part 1 (kernel): weights [K, N] = [4096, 4096] and [1024, 4096], 1 and 128 tokens per call. Each variant is one
model holding C distinct weight copies (C chosen so the copies total >= max(256 MiB, 4 x L3): every call streams
its weight from DRAM, as in a real model), all reading the same input; one run = C calls; the per-call time is
the run time / C. Variants run interleaved, medians are reported, os.getloadavg() is recorded.
  - fp32 MatMul;
  - MatMulNBits, 4 bits, block 32, symmetric (no zero points), accuracy_level=4 (int8 activations);
  - ours: SparseQuantMatMul, 50% of the 32-weight groups kept, symmetric, fp16 scales, 0.5% fp32 outliers per
    column, accuracy_level=4, with every column choosing its own groups (tile 1) and with tiles of 4, 8 (the
    pass's default) and 16 columns sharing them; also tile 8 with its AVX2 path forced (CPUs without AVX-512
    VNNI, 1 token) and MatMulNBits vs ours on one thread (1 token), which is less sensitive to other jobs on a
    shared machine.

Part 2 (end to end, needs the packaged SmolLM2-135M and modelsurgeon.models.real): SmolLM2 after `slice`, then
`quant4` (GPTQ) alone vs `spquant` (50% of the groups with tiles of 8 and of 1 column, and 25% with tiles of 8):
perplexity on Shakespeare text and latency per token / per 128-token prompt.

    python benchmarks/spquant.py [--reps 11] [--skip-e2e] [--skip-kernel] [--out docs/results/spquant.json]
                                 [--shapes 576x576,576x1536] [--variants 'ours a4, tile 8;...'] [--doc '']

--shapes and --variants measure other weight shapes (e.g. SmolLM2's and MiniLM's) and a subset of the variants;
with --doc '' the docs are left alone (the real-shape table in docs/spquant.md comes from such a run).

Writes the JSON and docs/spquant.md's result tables (between the BEGIN/END RESULTS markers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = [(4096, 4096), (1024, 4096)]
TOKENS = [1, 128]
BLOCK = 32
KEEP = 0.5
OUTLIER_FRACTION = 0.005


def l3_bytes() -> int:
    try:
        text = pathlib.Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) * {"K": 1024, "M": 1024 ** 2}[text[-1]]
    except Exception:
        return 32 * 1024 ** 2


def _model(nodes, initializers, K: int, outputs: list[str], opsets: dict[str, int], functions=()) -> bytes:
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              ir_version=9, functions=list(functions))
    return model.SerializeToString()


def fp32_model(rng, K, N, copies):
    nodes, inits, outs = [], [], []
    for c in range(copies):
        inits.append(numpy_helper.from_array((rng.standard_normal((K, N), np.float32) * 0.02), f"w{c}"))
        nodes.append(helper.make_node("MatMul", ["A", f"w{c}"], [f"y{c}"]))
        outs.append(f"y{c}")
    return _model(nodes, inits, K, outs, {"": 18}), K * N * 4


def matmulnbits_model(rng, K, N, copies, block: int = BLOCK):
    nb = -(-K // block)
    nodes, inits, outs = [], [], []
    for c in range(copies):
        inits.append(numpy_helper.from_array(rng.integers(0, 256, size=(N, nb, block // 2), dtype=np.uint8), f"b{c}"))
        inits.append(numpy_helper.from_array((rng.random(N * nb, dtype=np.float32) * 0.01 + 0.001), f"s{c}"))
        nodes.append(helper.make_node("MatMulNBits", ["A", f"b{c}", f"s{c}"], [f"y{c}"], domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=block, accuracy_level=4))
        outs.append(f"y{c}")
    return _model(nodes, inits, K, outs, {"": 18, "com.microsoft": 1}), N * nb * (block // 2 + 4)


def sparse_model(rng, K, N, copies, tile: int = 1, dense8: bool = False, block: int = BLOCK):
    """`copies` of our op on random weights: KEEP of the groups and outliers with float16 scales, or with `dense8`
    every group, no outliers and 8-bit scale codes (the 4.25-bit dense format)."""
    from modelsurgeon.runtime.sparse_quant_format import random_weight
    from modelsurgeon.runtime.sparse_quant_function import DOMAIN, OP_NAME, function_proto

    r = 0 if dense8 else max(1, round(OUTLIER_FRACTION * K))
    nodes, inits, outs, weights = [], [], [], []
    for c in range(copies):
        w = random_weight(rng, K, N, block, keep=1.0 if dense8 else KEEP, outliers=r, tile=tile,
                          scale_dtype=np.uint8 if dense8 else np.float16)
        names = []
        for key, arr in w.inputs().items():
            if arr is None:
                names.append("")
                continue
            inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), f"{key}{c}"))
            names.append(f"{key}{c}")
        while names and not names[-1]:
            names.pop()
        nodes.append(helper.make_node(OP_NAME, ["A", *names], [f"y{c}"], domain=DOMAIN, K=K, N=N, block=block,
                                      bits=4, accuracy_level=4, outliers=r, tile=tile,
                                      **({"scale_code": 1, "scale_exponent": w.scale_exponent} if dense8 else {})))
        outs.append(f"y{c}")
        if c == 0:
            weights.append(w)
    return (_model(nodes, inits, K, outs, {"": 18, DOMAIN: 1}, [function_proto(18)]), weights[0].nbytes(), weights[0])


def session(model_bytes: bytes, library: bool | str, isa: str | None = None, threads: int | None = None):
    """An ORT session of model_bytes; library: True registers our built library, a path another build of it."""
    import onnxruntime as ort

    from modelsurgeon.runtime.custom_ops import library_path
    from modelsurgeon.runtime.session import session_options

    so = session_options(threads=threads)
    if library:
        so.register_custom_ops_library(library if isinstance(library, str) else library_path())
    old = os.environ.get("MODELSURGEON_SQMM_ISA")
    if isa:
        os.environ["MODELSURGEON_SQMM_ISA"] = isa  # read when ORT creates the kernels (session creation)
    try:
        return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    finally:
        if isa:
            os.environ.pop("MODELSURGEON_SQMM_ISA") if old is None else os.environ.__setitem__("MODELSURGEON_SQMM_ISA", old)


# variant -> (model kind, threads (None: ORT default = all cores), ISA override, token counts). Kind "ours:T" is
# our op with column tiles of T (the blocks kept are shared by T adjacent columns); "ours" is per-column (T = 1).
VARIANTS = {
    "fp32 MatMul": ("fp32", None, None, TOKENS),
    "MatMulNBits a4": ("nbits", None, None, TOKENS),
    "ours a4, per column": ("ours", None, None, TOKENS),
    "ours a4, tile 4": ("ours:4", None, None, TOKENS),
    "ours a4, tile 8": ("ours:8", None, None, TOKENS),
    "ours a4, tile 16": ("ours:16", None, None, TOKENS),
    "ours a4, tile 8, AVX2 path": ("ours:8", None, "avx2", [1]),
    "MatMulNBits a4, 1 thread": ("nbits", 1, None, [1]),
    "ours a4, tile 8, 1 thread": ("ours:8", 1, None, [1]),
    "ours a4, dense, 8-bit scales, tile 8": ("ours8:8", None, None, TOKENS),  # 4.25 bits per weight
    "ours a4, dense, 8-bit scales, tile 8, 1 thread": ("ours8:8", 1, None, [1]),
}


def _tile(kind: str) -> int:
    return int(kind.split(":")[1]) if ":" in kind else 1
BASELINE = {None: "MatMulNBits a4", 1: "MatMulNBits a4, 1 thread"}


def time_interleaved(plan: dict, feeds_by_m: dict, reps: int) -> dict:
    """{(variant, M): [per-call seconds per rep]}: every rep runs every variant once, in a rotating order."""
    times = {(name, m): [] for name, (_, _, ms) in plan.items() for m in ms}
    for name, (sess, _, ms) in plan.items():  # warm up (first runs allocate)
        for m in ms:
            sess.run(None, feeds_by_m[m])
    names = list(plan)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for m, feeds in feeds_by_m.items():
            for name in order:
                sess, copies, ms = plan[name]
                if m not in ms:
                    continue
                t0 = time.perf_counter()
                sess.run(None, feeds)
                times[(name, m)].append((time.perf_counter() - t0) / copies)
    return times


def kernel_benchmark(reps: int, shapes=SHAPES, variants=None) -> dict:
    """`variants`: the names of VARIANTS to run (default all); their baselines (MatMulNBits, fp32) always run."""
    from modelsurgeon.runtime.custom_ops import kernel_info, library_path
    from modelsurgeon.runtime.sparse_quant_format import reference

    if library_path() is None:
        raise SystemExit("the custom-op library is not built: python -m modelsurgeon.runtime.custom_ops build")
    target = max(256 * 1024 ** 2, 4 * l3_bytes())
    rng = np.random.default_rng(0)
    results = []
    chosen = {k: v for k, v in VARIANTS.items()
              if variants is None or k in variants or k in BASELINE.values() or k == "fp32 MatMul"}
    for K, N in shapes:
        t0 = time.perf_counter()
        per_copy = {"fp32": K * N * 4, "nbits": N * -(-K // BLOCK) * (BLOCK // 2 + 4),
                    "ours": int(N * -(-K // BLOCK) * KEEP * (BLOCK // 2 + 4) + N * round(OUTLIER_FRACTION * K) * 6),
                    "ours8": N * -(-K // BLOCK) * (BLOCK // 2 + 1)}
        copies = {kind: max(2, math.ceil(target / v)) for kind, v in per_copy.items()}
        built, sizes = {}, {}
        built["fp32"], sizes["fp32"] = fp32_model(rng, K, N, copies["fp32"])
        built["nbits"], sizes["nbits"] = matmulnbits_model(rng, K, N, copies["nbits"])
        w0 = {}
        for kind in {v[0] for v in chosen.values() if v[0].startswith("ours")}:
            copies[kind] = copies["ours8" if kind.startswith("ours8") else "ours"]
            built[kind], sizes[kind], w0[kind] = sparse_model(rng, K, N, copies[kind], tile=_tile(kind),
                                                              dense8=kind.startswith("ours8"))
        plan = {name: (session(built[kind], kind.startswith("ours"), isa, threads), copies[kind], ms)
                for name, (kind, threads, isa, ms) in chosen.items()}
        del built
        setup_s = time.perf_counter() - t0
        feeds = {m: {"A": rng.standard_normal((m, K), np.float32)} for m in TOKENS}
        # correctness of the measured op: copy 0 against numpy (int8-rounded activations, as the kernel computes)
        checks = {}
        for name, (kind, _, isa, ms) in chosen.items():
            if kind.startswith("ours") and isa is None:
                for m in ms:
                    y0 = plan[name][0].run(["y0"], feeds[m])[0]
                    ref = reference(feeds[m]["A"], w0[kind], accuracy_level=4)
                    checks[f"{name}, {m} tokens"] = float(np.abs(y0 - ref).max() / np.abs(ref).max())
        load_before = os.getloadavg()
        times = time_interleaved(plan, feeds, reps)
        load_after = os.getloadavg()
        for name, (kind, threads, _, ms) in chosen.items():
            for m in ms:
                med = statistics.median(times[(name, m)])
                base = statistics.median(times[(BASELINE[threads], m)]) if (BASELINE[threads], m) in times else None
                fp32 = statistics.median(times[("fp32 MatMul", m)]) if threads is None else None
                results.append({
                    "K": K, "N": N, "tokens": m, "variant": name, "threads": threads or "default",
                    "copies": copies[kind], "weight_bytes": sizes[kind], "median_ms": med * 1e3,
                    "min_ms": min(times[(name, m)]) * 1e3,
                    "speedup_vs_matmulnbits": base / med if base else None,
                    "speedup_vs_fp32": fp32 / med if fp32 else None,
                    "GBps": sizes[kind] / med / 1e9,
                })
        results.append({"K": K, "N": N, "check_rel_max_err_vs_numpy": checks, "setup_seconds": setup_s,
                        "loadavg_before": load_before, "loadavg_after": load_after})
        print(f"[{K}x{N}] done; check {checks}; load {load_before} -> {load_after}", file=sys.stderr)
        del plan
    return {"results": results, "library": kernel_info(), "target_bytes_per_variant": target, "l3_bytes": l3_bytes(),
            "reps": reps, "variants": {k: {"threads": v[1], "isa": v[2], "tokens": v[3]} for k, v in chosen.items()}}


# ---------------------------------------------------------------------------------------------------- end to end


def e2e_benchmark(reps: int) -> dict:
    try:
        from modelsurgeon.models import real
    except ImportError as exc:
        return {"skipped": f"modelsurgeon.models.real is not available ({exc})"}
    return _e2e(real, reps)


E2E_CALIB_PLAY = "Hamlet"      # calibration text (title substring)
E2E_EVAL_PLAY = "King Lear"    # perplexity text, a different play
E2E_SAMPLES, E2E_SEQ = 16, 128
E2E_SLICE = "slice(sparsity=0.25)"
E2E_PIPELINES = {"quant4 (gptq, block 32)": "quant4(algo=gptq)",
                 "spquant (50% groups, tile 8)": "spquant",
                 "spquant (50% groups, per column)": "spquant(tile=1)",
                 "spquant (25% groups, tile 8)": "spquant(sparsity=0.25)"}


def _play(texts: dict, key: str) -> str:
    for title, text in texts.items():
        if key.lower() in title.lower():
            return text
    raise SystemExit(f"no play titled like {key!r}")


def _e2e(real, reps: int) -> dict:
    import tempfile

    import modelsurgeon
    from modelsurgeon.models import data as mdata
    from modelsurgeon.runtime.evaluate import evaluate
    from modelsurgeon.runtime.session import make_session

    work = pathlib.Path(tempfile.mkdtemp(prefix="spquant_e2e_"))
    texts = mdata.shakespeare_texts()
    calib, evaltext = work / "calib.txt", work / "eval.txt"
    calib.write_text(_play(texts, E2E_CALIB_PLAY))
    evaltext.write_text(_play(texts, E2E_EVAL_PLAY))
    tok = str(real.smollm2_tokenizer())
    src = real.smollm2_onnx()
    kw = dict(calibration=str(calib), tokenizer=tok, num_samples=E2E_SAMPLES, seq_len=E2E_SEQ, progress=False, verify=False)
    from modelsurgeon.models.cache import cache_dir

    # the sliced model is the common starting point: compiled once, cached across runs (delete to redo)
    key = f"{E2E_SLICE}-{E2E_CALIB_PLAY}-{E2E_SAMPLES}x{E2E_SEQ}".replace(" ", "_").replace("(", "_").replace(")", "")
    sliced_path = cache_dir("bench", "spquant", key) / "model.onnx"
    compile_s = {}
    if not sliced_path.exists():
        t0 = time.perf_counter()
        modelsurgeon.compile(str(src), E2E_SLICE, **kw).save(sliced_path)
        compile_s["slice"] = time.perf_counter() - t0
        print(f"[e2e] sliced in {compile_s['slice']:.0f}s", file=sys.stderr)
    paths = {"fp32 after slice": sliced_path}
    for label, passes in E2E_PIPELINES.items():
        t0 = time.perf_counter()
        res = modelsurgeon.compile(str(sliced_path), passes, **kw)
        compile_s[label] = time.perf_counter() - t0
        out = work / "".join(ch if ch.isalnum() else "_" for ch in label)  # one folder per pipeline
        out.mkdir(parents=True, exist_ok=True)
        paths[label] = res.save(out / "model.onnx")
        print(f"[e2e] compiled {label} in {compile_s[label]:.0f}s", file=sys.stderr)
    rows = []
    for label, path in paths.items():
        ev = evaluate(str(path), str(src), task="lm", data=str(evaltext), tokenizer=tok, num_samples=E2E_SAMPLES,
                      seq_len=E2E_SEQ)
        size = sum(f.stat().st_size for f in pathlib.Path(path).parent.iterdir() if f.is_file())
        rows.append({"label": label, "perplexity": ev.metrics.get("perplexity"),
                     "reference_perplexity": ev.metrics.get("perplexity_reference"),
                     "kl": ev.metrics.get("kl_divergence"), "file_mb": size / 1e6})
    # latency: interleaved, same run; 1 token and a 128-token prompt per call (no KV cache in this export)
    sessions = {label: make_session(str(path)) for label, path in paths.items()}
    from modelsurgeon.runtime.custom_ops import session_path

    rng = np.random.default_rng(0)
    feeds = {m: {"input_ids": rng.integers(0, 1000, size=(1, m)).astype(np.int64)} for m in (1, 128)}
    lat = {(label, m): [] for label in sessions for m in feeds}
    for sess in sessions.values():
        for f in feeds.values():
            sess.run(None, f)
    load_before = os.getloadavg()
    for rep in range(reps):
        for m, f in feeds.items():
            for label, sess in sessions.items():
                t1 = time.perf_counter()
                sess.run(None, f)
                lat[(label, m)].append(time.perf_counter() - t1)
    for row in rows:
        row["ms_1"] = statistics.median(lat[(row["label"], 1)]) * 1e3
        row["ms_128"] = statistics.median(lat[(row["label"], 128)]) * 1e3
        row["path"] = session_path(sessions[row["label"]])
    return {"rows": rows, "compile_seconds": compile_s, "calibration": f"{E2E_CALIB_PLAY}, {E2E_SAMPLES}x{E2E_SEQ} tokens",
            "evaluation": f"{E2E_EVAL_PLAY}, {E2E_SAMPLES}x{E2E_SEQ} tokens", "slice": E2E_SLICE,
            "pipelines": E2E_PIPELINES, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


# ---------------------------------------------------------------------------------------------------- report


def results_rows(data: dict) -> dict:
    """The docs/results convention (benchmarks/run_all.py): benchmark and rows (kernel variants, then end to end)."""
    kernel = [{"part": "kernel", **r} for r in (data.get("kernel") or {}).get("results", []) if "variant" in r]
    e2e = [{"part": "end to end", **r} for r in (data.get("e2e") or {}).get("rows", [])]
    return {"benchmark": "spquant", "rows": kernel + e2e}


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(data: dict) -> str:
    k = data.get("kernel") or {"results": [], "library": {"isa": "?"}, "reps": 0}
    lines = [f"Kernel: `{k.get('command', data['command'])}` ({k.get('seconds', data['seconds']) / 60:.1f} min). Machine: {data['machine']['cpu']}, "
             f"{data['machine']['cores']} cores, ONNX Runtime {data['machine']['onnxruntime']}; kernel path "
             f"`{k['library']['isa']}`; load average {data['loadavg_start'][0]:.2f} at start, {data['loadavg_end'][0]:.2f} "
             f"at end (other jobs shared the 2 cores); {k['reps']} interleaved reps, medians.",
             "", "| weight [K, N] | tokens | threads | variant | weight MB | copies | median ms/call | GB/s | vs MatMulNBits | vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in k["results"]:
        if "variant" not in r:
            continue
        ratio = lambda v: f"{v:.2f}x" if v else "-"
        lines.append(f"| {r['K']}x{r['N']} | {r['tokens']} | {r.get('threads', 'default')} | {r['variant']} | {r['weight_bytes'] / 1e6:.2f} | {r['copies']} | "
                     f"{r['median_ms']:.3f} | {r['GBps']:.1f} | {ratio(r['speedup_vs_matmulnbits'])} | {ratio(r['speedup_vs_fp32'])} |")
    e = data.get("e2e", {})
    if e and "skipped" not in e:
        lines += ["", f"End to end: `{e.get('command', '?')}` ({e.get('seconds', 0) / 60:.1f} min). "
                  f"SmolLM2-135M after `{e['slice']}`; calibration: {e['calibration']}; perplexity: {e['evaluation']} "
                  f"(original model: {_num(e['rows'][0]['reference_perplexity'], '.2f')}); load average {e['loadavg_before'][0]:.2f}.", "",
                  "| model | perplexity | KL vs original | ms/call, 1 token | ms/call, 128 tokens | files MB | compile s | ORT path |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in e["rows"]:
            comp = e["compile_seconds"].get(r["label"], e["compile_seconds"].get("slice"))
            comp = "cached" if comp is None else f"{comp:.0f}"
            lines.append(f"| {r['label']} | {r['perplexity']:.2f} | {_num(r['kl'], '.3f')} | {r['ms_1']:.2f} | {r['ms_128']:.1f} | "
                         f"{r['file_mb']:.1f} | {comp} | {r['path']} |")
    elif e:
        lines += ["", f"End to end: skipped ({e['skipped']})."]
    return "\n".join(lines)


def write_docs(data: dict, doc: pathlib.Path) -> None:
    from modelsurgeon.runtime.benchmark import write_results_section

    write_results_section(doc, markdown(data))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-kernel", action="store_true", help="keep the kernel results of an earlier run")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "spquant.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "spquant.md"), help="'' leaves the docs alone")
    ap.add_argument("--shapes", default=None,
                    help="kernel weight shapes KxN,... (default: " + ",".join(f"{k}x{n}" for k, n in SHAPES) + ")")
    ap.add_argument("--variants", default=None, help="kernel variants to run, ';'-separated names of VARIANTS "
                    "(default: all; MatMulNBits and fp32 always run)")
    args = ap.parse_args(argv)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    variants = args.variants.split(";") if args.variants else None
    unknown = [v for v in variants or [] if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    from modelsurgeon.runtime.benchmark import machine_info

    out = pathlib.Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    data = {"command": "python benchmarks/spquant.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine_info(), "loadavg_start": os.getloadavg()}
    t0 = time.perf_counter()
    if args.skip_kernel:
        data["kernel"] = previous.get("kernel")
    else:
        data["kernel"] = kernel_benchmark(args.reps, shapes, variants)
        data["kernel"].update(command=data["command"], seconds=time.perf_counter() - t0, loadavg_end=os.getloadavg())
    t1 = time.perf_counter()
    if args.skip_e2e:
        data["e2e"] = previous.get("e2e", {"skipped": "--skip-e2e"})
    else:
        data["e2e"] = e2e_benchmark(args.reps)
        data["e2e"].update(command=data["command"], seconds=time.perf_counter() - t1)
    data["loadavg_end"] = os.getloadavg()
    data.update(results_rows(data))
    data["seconds"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    if args.doc:
        write_docs(data, pathlib.Path(args.doc))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
