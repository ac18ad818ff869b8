"""spquant benchmark: our SparseQuantMatMul kernel vs MatMulNBits (accuracy_level=4) vs fp32 MatMul, and end to end.

Part 1 (kernel): weights [K, N] = [4096, 4096] and [1024, 4096], 1 and 128 tokens per call. Each variant is one
model holding C distinct weight copies (C chosen so the copies total >= max(256 MiB, 4 x L3): every call streams
its weight from DRAM, as in a real model), all reading the same input; one run = C calls; the per-call time is
the run time / C. Variants run interleaved, medians are reported, os.getloadavg() is recorded.
  - fp32 MatMul;
  - MatMulNBits, 4 bits, block 32, symmetric (no zero points), accuracy_level=4 (int8 activations);
  - ours: SparseQuantMatMul, 50% of the 32-weight groups kept, symmetric, fp16 scales, 0.5% fp32 outliers per
    column, accuracy_level=4; also with its AVX2 path forced (CPUs without AVX-512 VNNI).

Part 2 (end to end, needs the packaged SmolLM2-135M and modelsurgeon.models.real): SmolLM2 after `slice`, then
`quant4` (GPTQ) alone vs `spquant`: perplexity on Shakespeare text and latency per token / per 128-token prompt.

    python benchmarks/spquant.py [--reps 15] [--skip-e2e] [--out docs/results/spquant.json]

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


def matmulnbits_model(rng, K, N, copies):
    nb = -(-K // BLOCK)
    nodes, inits, outs = [], [], []
    for c in range(copies):
        inits.append(numpy_helper.from_array(rng.integers(0, 256, size=(N, nb, BLOCK // 2), dtype=np.uint8), f"b{c}"))
        inits.append(numpy_helper.from_array((rng.random(N * nb, dtype=np.float32) * 0.01 + 0.001), f"s{c}"))
        nodes.append(helper.make_node("MatMulNBits", ["A", f"b{c}", f"s{c}"], [f"y{c}"], domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=4))
        outs.append(f"y{c}")
    return _model(nodes, inits, K, outs, {"": 18, "com.microsoft": 1}), N * nb * (BLOCK // 2 + 4)


def sparse_model(rng, K, N, copies):
    from modelsurgeon.runtime.sparse_quant_format import random_weight
    from modelsurgeon.runtime.sparse_quant_function import DOMAIN, OP_NAME, function_proto

    r = max(1, round(OUTLIER_FRACTION * K))
    nodes, inits, outs, weights = [], [], [], []
    for c in range(copies):
        w = random_weight(rng, K, N, BLOCK, keep=KEEP, outliers=r)
        names = []
        for key, arr in w.inputs().items():
            if arr is None:
                names.append("")
                continue
            inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), f"{key}{c}"))
            names.append(f"{key}{c}")
        while names and not names[-1]:
            names.pop()
        nodes.append(helper.make_node(OP_NAME, ["A", *names], [f"y{c}"], domain=DOMAIN, K=K, N=N, block=BLOCK,
                                      bits=4, accuracy_level=4, outliers=r))
        outs.append(f"y{c}")
        if c == 0:
            weights.append(w)
    return (_model(nodes, inits, K, outs, {"": 18, DOMAIN: 1}, [function_proto(18)]), weights[0].nbytes(), weights[0])


def session(model_bytes: bytes, library: bool, isa: str | None = None):
    import onnxruntime as ort

    from modelsurgeon.runtime.custom_ops import library_path
    from modelsurgeon.runtime.session import session_options

    so = session_options()
    if library:
        so.register_custom_ops_library(library_path())
    old = os.environ.get("MODELSURGEON_SQMM_ISA")
    if isa:
        os.environ["MODELSURGEON_SQMM_ISA"] = isa  # read when ORT creates the kernels (session creation)
    try:
        return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    finally:
        if isa:
            os.environ.pop("MODELSURGEON_SQMM_ISA") if old is None else os.environ.__setitem__("MODELSURGEON_SQMM_ISA", old)


def time_interleaved(sessions: dict, feeds_by_m: dict, copies: dict, reps: int) -> dict:
    """{(name, M): [per-call seconds per rep]}: every rep runs every variant once, in a rotating order."""
    times = {(name, m): [] for name in sessions for m in feeds_by_m}
    for name, sess in sessions.items():  # warm up (first run allocates)
        for feeds in feeds_by_m.values():
            sess.run(None, feeds)
    names = list(sessions)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for m, feeds in feeds_by_m.items():
            for name in order:
                t0 = time.perf_counter()
                sessions[name].run(None, feeds)
                times[(name, m)].append((time.perf_counter() - t0) / copies[name])
    return times


def kernel_benchmark(reps: int) -> dict:
    from modelsurgeon.runtime.custom_ops import kernel_info, library_path
    from modelsurgeon.runtime.sparse_quant_format import reference

    if library_path() is None:
        raise SystemExit("the custom-op library is not built: python -m modelsurgeon.runtime.custom_ops build")
    target = max(256 * 1024 ** 2, 4 * l3_bytes())
    rng = np.random.default_rng(0)
    results = []
    for K, N in SHAPES:
        sizes = {}
        built = {}
        t0 = time.perf_counter()
        # copy counts from one copy's bytes
        per_copy = {"fp32 MatMul": K * N * 4, "MatMulNBits a4": N * -(-K // BLOCK) * (BLOCK // 2 + 4),
                    "ours a4": int(N * -(-K // BLOCK) * KEEP * (BLOCK // 2 + 4) + N * round(OUTLIER_FRACTION * K) * 6)}
        copies = {k: max(2, math.ceil(target / v)) for k, v in per_copy.items()}
        built["fp32 MatMul"], sizes["fp32 MatMul"] = fp32_model(rng, K, N, copies["fp32 MatMul"])
        built["MatMulNBits a4"], sizes["MatMulNBits a4"] = matmulnbits_model(rng, K, N, copies["MatMulNBits a4"])
        built["ours a4"], sizes["ours a4"], w0 = sparse_model(rng, K, N, copies["ours a4"])
        sessions = {"fp32 MatMul": session(built["fp32 MatMul"], False),
                    "MatMulNBits a4": session(built["MatMulNBits a4"], False),
                    "ours a4": session(built["ours a4"], True),
                    "ours a4 (avx2 path)": session(built["ours a4"], True, isa="avx2")}
        copies["ours a4 (avx2 path)"] = copies["ours a4"]
        sizes["ours a4 (avx2 path)"] = sizes["ours a4"]
        del built
        setup_s = time.perf_counter() - t0
        feeds = {m: {"A": rng.standard_normal((m, K), np.float32)} for m in TOKENS}
        # correctness of the measured op: copy 0 against numpy (int8-rounded activations, as the kernel computes)
        y0 = sessions["ours a4"].run(["y0"], feeds[TOKENS[-1]])[0]
        ref = reference(feeds[TOKENS[-1]]["A"], w0, accuracy_level=4)
        check = float(np.abs(y0 - ref).max() / np.abs(ref).max())
        load_before = os.getloadavg()
        times = time_interleaved(sessions, feeds, copies, reps)
        load_after = os.getloadavg()
        for m in TOKENS:
            med = {name: statistics.median(times[(name, m)]) for name in sessions}
            for name in sessions:
                results.append({
                    "K": K, "N": N, "tokens": m, "variant": name, "copies": copies[name],
                    "weight_bytes": sizes[name], "median_ms": med[name] * 1e3,
                    "min_ms": min(times[(name, m)]) * 1e3,
                    "speedup_vs_matmulnbits": med["MatMulNBits a4"] / med[name],
                    "speedup_vs_fp32": med["fp32 MatMul"] / med[name],
                    "GBps": sizes[name] / med[name] / 1e9,
                })
        results.append({"K": K, "N": N, "check_rel_max_err_vs_numpy": check, "setup_seconds": setup_s,
                        "loadavg_before": load_before, "loadavg_after": load_after})
        print(f"[{K}x{N}] done; check {check:.1e}; load {load_before} -> {load_after}", file=sys.stderr)
        del sessions
    return {"results": results, "library": kernel_info(), "target_bytes_per_variant": target, "l3_bytes": l3_bytes(),
            "reps": reps}


# ---------------------------------------------------------------------------------------------------- end to end


def e2e_benchmark(reps: int) -> dict:
    try:
        from modelsurgeon.models import real
    except ImportError as exc:
        return {"skipped": f"modelsurgeon.models.real is not available ({exc})"}
    return _e2e(real, reps)


def _e2e(real, reps: int) -> dict:  # filled in once the real-model helpers exist
    return {"skipped": "not implemented"}


# ---------------------------------------------------------------------------------------------------- report


def markdown(data: dict) -> str:
    k = data["kernel"]
    lines = [f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, ONNX Runtime "
             f"{data['machine']['onnxruntime']}; kernel path `{k['library']['isa']}`; load average "
             f"{data['loadavg_start'][0]:.2f} at start, {data['loadavg_end'][0]:.2f} at end; {k['reps']} interleaved reps, medians.",
             "", "| weight [K, N] | tokens | variant | weight MB | copies | median ms/call | GB/s | vs MatMulNBits | vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in k["results"]:
        if "variant" not in r:
            continue
        lines.append(f"| {r['K']}x{r['N']} | {r['tokens']} | {r['variant']} | {r['weight_bytes'] / 1e6:.2f} | {r['copies']} | "
                     f"{r['median_ms']:.3f} | {r['GBps']:.1f} | {r['speedup_vs_matmulnbits']:.2f}x | {r['speedup_vs_fp32']:.2f}x |")
    e = data.get("e2e", {})
    if e and "skipped" not in e:
        lines += ["", "| SmolLM2-135M | perplexity | ms/token (1 token) | ms/prompt (128 tokens) | file MB |", "|---|---|---|---|---|"]
        for r in e["rows"]:
            lines.append(f"| {r['label']} | {r['perplexity']:.2f} | {r['ms_1']:.2f} | {r['ms_128']:.1f} | {r['file_mb']:.1f} |")
    elif e:
        lines += ["", f"End to end: skipped ({e['skipped']})."]
    return "\n".join(lines)


def write_docs(data: dict, doc: pathlib.Path) -> None:
    begin, end = "<!-- BEGIN RESULTS -->", "<!-- END RESULTS -->"
    text = doc.read_text() if doc.exists() else f"# spquant\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{markdown(data)}\n{end}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-kernel", action="store_true", help="keep the kernel results of an earlier run")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "spquant.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "spquant.md"))
    args = ap.parse_args(argv)
    from modelsurgeon.runtime.benchmark import machine_info

    out = pathlib.Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    data = {"command": "python benchmarks/spquant.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine_info(), "loadavg_start": os.getloadavg()}
    t0 = time.perf_counter()
    data["kernel"] = previous.get("kernel") if args.skip_kernel else kernel_benchmark(args.reps)
    data["e2e"] = previous.get("e2e", {"skipped": "--skip-e2e"}) if args.skip_e2e else e2e_benchmark(args.reps)
    data["loadavg_end"] = os.getloadavg()
    data["seconds"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    write_docs(data, pathlib.Path(args.doc))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
