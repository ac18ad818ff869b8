"""decode benchmark: SmolLM2-135M generating with its KV cache, ours against ONNX Runtime GenAI's int4 and llama.cpp.

Each row is a KV-cache decoder run by `modelsurgeon.runtime.generate.Decoder` (ONNX Runtime, 2 intra-op threads or
`--threads`, spinning off): a prompt of CONTEXT tokens of held-out Shakespeare (Hamlet) in one prefill step, then N
greedy decode steps, one token each with the cache. Contexts 128 and 1024, batch 1. Rounds are interleaved (each
model once per round, both contexts), and the table gives medians over rounds of prefill tokens/s (CONTEXT / prefill
seconds) and decode tokens/s (N / seconds of the N steps).

Rows:
- fp32: Optimum's KV-cache export (`real.smollm2_optimum_onnx("text-generation-with-past")`);
- GenAI int4: `python -m onnxruntime_genai.models.builder -p int4 -e cpu` (`real.smollm2_genai`), its default and
  `int4_algo_config=k_quant_mixed`, run through the same loop (and through `onnxruntime_genai` itself, decode only,
  as a cross-check of the loop's overhead);
- ours: `modelsurgeon.compile(SOURCE, PASSES, fuse=FUSE)` for the rows in OURS, SOURCE being torch's dynamo export
  with a KV cache (`real.smollm2_kv_onnx`) or Optimum's folder; calibration: 32 windows of 128 tokens from the plays
  other than Macbeth and Hamlet (`calibration.from_token_ids`), 64 for rows that heal;
- llama.cpp (`llama-cpp-python`, if installed) on the packaged Q4_1 GGUF, and on that file requantized by llama.cpp's
  own quantizer to Q4_K_M and Q8_0: the same prompt evaluated, N greedy tokens.

Perplexity of every row: next-token NLL over the same Macbeth windows of 128 tokens, one full-window forward each with
an empty cache (llama.cpp: its logits with `logits_all=True`).

Compiled models are kept in --work (default $MODELSURGEON_CACHE/decode-bench) and reused; --recompile remakes them.

    python benchmarks/decode.py [--rounds 3] [--new 32] [--contexts 128 1024] [--ppl-windows 16] [--profile]

Writes docs/results/decode.json and the table of docs/decode.md (between the BEGIN/END RESULTS markers).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import shutil
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMAND = "python benchmarks/decode.py"
THREADS = 2
Q = "quant4"  # defaults: the head at 8 bits, the tied table read from its codes (benchmarks/quant4_head.py)
# end-to-end recovery with LoRA deltas of rank 8 (docs/heal.md), within the 30-minute compile budget of issue 18
HEAL = "heal(steps=400,lr=0.001,mode=e2e,train=all,batch=8,holdout=0.125,rank=8,threads=2,seconds=1800)"
G = "quant4(algo=gptq,lm_head=true,embeddings=true)"  # what quant4(algo=gptq) defaults to: the head at 4 bits, shared
GS = G[:-1] + ",symmetric=true)"  # GenAI's default int4 layout: no zero points
GS8 = GS.replace("lm_head=true", "lm_head=8")  # the same with the head (and the tied table read from it) at 8 bits
# (source export, passes, fuse): compile() appends `fuse` by default; fuse=False rows show what it is worth.
# "dynamo": torch's dynamo exporter with a KV cache (`real.smollm2_kv_onnx`, the form `fuse` knows: GroupQueryAttention);
# "optimum": Optimum's TorchScript export (attention stays decomposed; fuse fuses norms and packs projections only).
OURS = [("dynamo", "cleanup", False), ("dynamo", "cleanup", True), ("dynamo", Q, True), ("dynamo", G, False),
        ("dynamo", G, True), ("dynamo", f"slice(sparsity=0.25),{G}", True),
        ("dynamo", f"slice(sparsity=0.25,bases=model),{G}", True), ("dynamo", f"drop-blocks(n=6),{Q}", True),
        ("dynamo", f"slice(sparsity=0.25),drop-blocks(n=4),{G}", True), ("optimum", G, False), ("optimum", G, True),
        ("dynamo", f"drop-blocks(n=10),{G}", True), ("dynamo", f"drop-blocks(n=10),{HEAL},{G}", True),
        ("dynamo", GS, True), ("dynamo", f"slice(sparsity=0.25),{GS}", True),
        ("dynamo", f"slice(sparsity=0.25,bases=model),{GS}", True),
        ("dynamo", f"slice(sparsity=0.25,bases=model),{HEAL},{GS}", True),
        ("dynamo", f"drop-blocks(n=10),{HEAL},{GS}", True),
        ("dynamo", f"drop-blocks(n=10),{HEAL},spquant(sparsity=0,min_saving=0,scale_bits=8),{G}", True),
        ("dynamo", f"drop-blocks(n=10),{HEAL},spquant(sparsity=0,min_saving=0,scale_bits=8,symmetric=false),{G}", True),
        ("dynamo", f"drop-blocks(n=10),{HEAL},{GS8}", True),
        ("dynamo", f"drop-blocks(n=10),{HEAL},spquant(sparsity=0,min_saving=0,scale_bits=8),{GS8}", True)]
# --set pareto (issue 19, benchmarks/pareto.py): bytes against quality and decode speed, the head and the tied table at
# 4 bits in every row so that the rows differ only in how the projections are stored
H = "lm_head=true,embeddings=true"
PARETO = [("dynamo", f"quant4(block={b},{H})", True) for b in (32, 64, 128)] + \
         [("dynamo", G, True)] + [("dynamo", f"quant4(algo=gptq,block={b},{H})", True) for b in (64, 128)] + \
         [("dynamo", GS, True), ("dynamo", f"quant4(algo=gptq,block=128,keep8=24,{H})", True)] + \
         [("dynamo", f"spquant(sparsity={s}{',min_saving=0' if s == 0 else ''}),{G}", True) for s in (0, 0.1, 0.25, 0.5)] + \
         [("dynamo", f"spquant(sparsity=0,min_saving=0,scale_bits=8),{G}", True),  # block-32 groups at 4.25 bits
          # the same, with the head (and its tied table) stored as in the gptq block-128 row it is compared with
          ("dynamo", f"spquant(sparsity=0,min_saving=0,scale_bits=8),quant4(algo=gptq,block=128,{H})", True),
          # the head in the 4.25-bit format too (quant4 then stores only the tied table, for the Gather)
          ("dynamo", f"spquant(sparsity=0,min_saving=0,scale_bits=8,lm_head=true),{G}", True)] + \
         [("dynamo", f"spquant({o},min_saving=0,scale_bits=8),quant4(algo=gptq,block={b},{H})", True)  # fewer bytes
          for o, b in (("sparsity=0,block=64", 128), ("sparsity=0.1", 128), ("sparsity=0,block=64", 64))] + \
         [("dynamo", f"spquant(sparsity=0,block=64,{o}min_saving=0,scale_bits=8,lm_head=true)", True)  # the lookup
          for o in ("", "max_block=256,")]                                                     # reads the head's codes
ROW_SETS = {"decode": OURS, "pareto": PARETO}
HELD_OUT = ("Macbeth", "Hamlet")
HEAL_WINDOWS = 64  # rows that heal calibrate on 64 windows (docs/heal.md's SmolLM2 runs), 8 of them held back by heal
ANCHOR = "GenAI int4 default"  # the row every decode speed is also given as a per-round ratio to


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# data


def token_data(ppl_windows: int, calib_windows: int, max_context: int) -> dict[str, np.ndarray]:
    """prompt [1, max_context] (Hamlet), ppl [W, 128] (Macbeth), calib [C, 128] and calib_heal [HEAL_WINDOWS, 128]
    (the other works)."""
    from modelsurgeon import calibration as C
    from modelsurgeon.models import real

    tok = C.load_tokenizer(real.smollm2_tokenizer())
    texts = real.shakespeare_texts()
    others = [t for name, t in sorted(texts.items()) if name not in HELD_OUT]
    return {"prompt": C.tokenize_text(texts["Hamlet"], tok, 1, max_context),
            "ppl": C.tokenize_text(texts["Macbeth"], tok, ppl_windows, 128),
            "calib": C.tokenize_texts(others, tok, calib_windows, 128),
            "calib_heal": C.tokenize_texts(others, tok, HEAL_WINDOWS, 128)}


# ---------------------------------------------------------------------------------------------------------------
# producing the rows


def slug(passes: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in passes).strip("_")


def op_counts(path: pathlib.Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def folder_mib(folder: pathlib.Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data")) / 2**20


def row_name(source: str, passes: str, fuse: bool) -> str:
    return f"{passes}{'' if fuse else ' (no fuse)'} [{source}]"


def split_after_heal(passes: str) -> tuple[str, str] | None:
    """(the passes through the last `heal`, the passes after it), or None when no pass follows a heal."""
    from modelsurgeon.pipeline import split_top_level

    parts = split_top_level(passes)
    heals = [k for k, part in enumerate(parts) if part.strip().startswith("heal")]
    if not heals or heals[-1] == len(parts) - 1:
        return None
    return ",".join(parts[:heals[-1] + 1]), ",".join(parts[heals[-1] + 1:])


def compile_ours(src: pathlib.Path, source: str, passes: str, fuse: bool, work: pathlib.Path, calib_ids: np.ndarray,
                 recompile: bool) -> dict:
    """Compile `src` (a model file or an Optimum folder) with `passes` into work/<slug>; reuse a previous result
    unless `recompile`.

    A pipeline with passes after a `heal` compiles in two stages: the passes through heal (`fuse=False`), kept as a
    row of their own and shared by every row with the same prefix (heal takes up to 30 minutes), then the rest from
    that model, calibrated on the same windows: what one pipeline does, with the healed model saved in between."""
    import modelsurgeon
    from modelsurgeon import calibration as C
    from modelsurgeon.errors import UserError
    from modelsurgeon.model_io import load
    from modelsurgeon.runtime.generate import model_file

    out = work / slug(row_name(source, passes, fuse))
    meta = out / "bench.json"
    if meta.exists() and not recompile:
        return json.loads(meta.read_text())
    staged = split_after_heal(passes)
    if staged is not None and not src.is_dir():
        prefix, rest = staged
        first = compile_ours(src, source, prefix, False, work, calib_ids, recompile)
        if "refused" in first:
            return {**first, "passes": passes}
        healed = work / slug(row_name(source, prefix, False))
        # the rest's own work folder lies under the healed model's: rows healed otherwise may share the rest
        info = compile_ours(healed / "model.onnx", source, rest, fuse, healed / "then", calib_ids, recompile)
        if "refused" not in info:
            shutil.rmtree(out, ignore_errors=True)
            shutil.move(healed / "then" / slug(row_name(source, rest, fuse)), out)
            info = {**info, "passes": passes, "compile_s": first["compile_s"] + info["compile_s"],
                    "stages": [prefix, rest], "notes": {**first.get("notes", {}), **info.get("notes", {})}}
            (out / "bench.json").write_text(json.dumps(info, default=str))
        return info
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        data = C.from_token_ids(load(str(model_file(src))), calib_ids, source="shakespeare")
        result = modelsurgeon.compile(str(src), passes=passes, calibration=data, num_samples=len(calib_ids),
                                      verify=False, progress=False, fuse=fuse)
    except UserError as exc:
        info = {"passes": passes, "refused": str(exc)}
        out.mkdir(parents=True)
        meta.write_text(json.dumps(info))
        return info
    seconds = time.perf_counter() - t0
    info = {}
    out.mkdir(parents=True, exist_ok=True)
    try:
        result.save(out if src.is_dir() else out / "model.onnx")
    except UserError as exc:  # the folder's config cannot be updated: the model file alone, the source's config beside
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        result.save(out / "model.onnx")
        shutil.copy(src / "config.json", out / "config.json")
        info["folder_refused"] = str(exc)
    info.update({"passes": passes, "source": source, "fuse": fuse, "compile_s": seconds,
                 "notes": {r.name: r.notes for r in result.report.rows[1:]}})
    meta.write_text(json.dumps(info, default=str))
    return info


# ---------------------------------------------------------------------------------------------------------------
# measuring


def prefill_decode(decoder, prompt: np.ndarray, new: int) -> tuple[float, float, np.ndarray]:
    """Seconds of the prefill of `prompt` [1, P], seconds of `new` greedy decode steps after it, and the tokens."""
    kv = decoder.new_cache(1, prompt.shape[1] + new)
    t0 = time.perf_counter()
    logits = decoder.step_kv(prompt, kv)
    t1 = time.perf_counter()
    token = logits[:, -1].argmax(-1)
    tokens = []
    for _ in range(new):
        logits = decoder.step_kv(token[:, None], kv)
        token = logits[:, -1].argmax(-1)
        tokens.append(int(token[0]))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, np.array(tokens)


def perplexity(decoder, windows: np.ndarray) -> float:
    """exp(mean next-token NLL) over the windows, one full-window forward each with an empty cache."""
    from modelsurgeon.runtime.generate import _score

    nll = []
    for w in windows:
        logits, _ = decoder.step(w[None], decoder.empty_cache(1))
        nll.append(_score(logits[:, :-1], w[None, 1:])[0])
    return float(np.exp(np.concatenate(nll, axis=1).mean()))


def genai_decode(folder: pathlib.Path, prompt: np.ndarray, new: int) -> dict:
    """Seconds of the prefill and of `new` decode steps through onnxruntime_genai itself (2 intra-op threads)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    # genai_config's session_options take no ORT config entries: spinning stays as onnxruntime_genai sets it
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": THREADS}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + new + 1, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt.astype(np.int32))
    t1 = time.perf_counter()
    for _ in range(new):
        gen.generate_next_token()
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1}


LLAMA_CPP = [("llama.cpp Q4_1 (packaged GGUF)", None),  # (row, llama.cpp's quantization type applied to the GGUF)
             ("llama.cpp Q4_K_M (requantized from the packaged Q4_1)", "Q4_K_M"),
             ("llama.cpp Q8_0 (requantized from the packaged Q4_1)", "Q8_0")]


def requantized_gguf(src: pathlib.Path, kind: str, work: pathlib.Path) -> pathlib.Path:
    """The GGUF `src` through llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize
    --allow-requantize` runs) to `kind` ("Q4_K_M", "Q8_0"), cached in `work`. The packaged file's weights are the Q4_1
    grid, and so is every ONNX row's starting point (the fp32 model is that GGUF dequantized): these rows start from
    the same weights as ours."""
    import ctypes

    import llama_cpp

    out = work / f"smollm2-{kind}.gguf"
    if out.exists():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True
    params.nthread = THREADS
    work.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize to {kind} failed")
    tmp.rename(out)
    return out


class LlamaCpp:
    """llama.cpp through llama-cpp-python on a GGUF file, with the two calls the rounds make (2 threads)."""

    def __init__(self, gguf: pathlib.Path):
        import llama_cpp

        self.gguf = gguf
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS,
                                   n_batch=1024, verbose=False)
        self.vocab = self.llm.n_vocab()

    def last_logits(self) -> np.ndarray:
        """The last evaluated token's logits (without logits_all, `Llama.eval` copies none into `scores`)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))

    def prefill_decode(self, prompt: np.ndarray, new: int) -> tuple[float, float, np.ndarray]:
        """As `prefill_decode`: eval the prompt, then `new` greedy tokens one eval each."""
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt[0].tolist())
        t1 = time.perf_counter()
        token = int(np.argmax(self.last_logits()))
        tokens = []
        for _ in range(new):
            llm.eval([token])
            token = int(np.argmax(self.last_logits()))
            tokens.append(token)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, np.array(tokens)

    def perplexity(self, windows: np.ndarray) -> float:
        """As `perplexity`, through llama.cpp's logits of every position (a second context with logits_all=True)."""
        import llama_cpp

        from modelsurgeon.runtime.generate import _score

        llm = llama_cpp.Llama(model_path=str(self.gguf), n_ctx=512, n_threads=THREADS, n_threads_batch=THREADS,
                              logits_all=True, verbose=False)
        nll = []
        for w in windows:
            llm.reset()
            llm.eval(w.tolist())
            logits = np.asarray(llm.scores[: len(w)], np.float32)[None]
            nll.append(_score(logits[:, :-1], w[None, 1:])[0])
        del llm
        return float(np.exp(np.concatenate(nll, axis=1).mean()))


def profile_decode(path: pathlib.Path, prompt: np.ndarray, steps: int, source: pathlib.Path) -> dict[str, float]:
    """Milliseconds per decode step by op type (ORT profiling), averaged over `steps` steps after a 128-token prefill.
    MatMulNBits and SparseQuantMatMul are split by weight shape ("MatMulNBits 576x3072": K x N), with "<key> calls"
    beside each key."""
    import onnx

    from modelsurgeon.runtime import generate
    from modelsurgeon.runtime.session import make_session

    shapes = {n.name: f"{onnx.helper.get_node_attr_value(n, 'K')}x{onnx.helper.get_node_attr_value(n, 'N')}"
              for n in onnx.load(str(path), load_external_data=False).graph.node
              if n.op_type in ("MatMulNBits", "SparseQuantMatMul")}
    (ROOT / "build").mkdir(exist_ok=True)
    dec = generate.Decoder(str(path), threads=THREADS, source=str(source))
    # as the timed rows run: our library registered (spquant rows run its kernel, not the ONNX function)
    dec.session = make_session(str(path), threads=THREADS, profile_prefix=str(ROOT / "build" / "decode-profile"))
    kv = dec.new_cache(1, 128 + steps)  # as the timed rows run: a shared past/present buffer where the graph allows
    logits = dec.step_kv(prompt[:, :128], kv)
    for _ in range(steps):
        logits = dec.step_kv(logits[:, -1].argmax(-1)[:, None], kv)
    trace_file = pathlib.Path(dec.session.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    runs = [e for e in trace if e.get("name") == "model_run"][-steps:]
    totals: dict[str, float] = collections.Counter()
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if any(r["ts"] <= e["ts"] <= r["ts"] + r["dur"] for r in runs):
            op = e.get("args", {}).get("op_name", "?")
            node = e["name"][:-len("_kernel_time")]
            key = f"{op} {shapes[node]}" if node in shapes else op
            totals[key] += e["dur"] / 1000 / steps
            totals[f"{key} calls"] += 1 / steps
    totals["total"] = sum(v for k, v in totals.items() if not k.endswith(" calls"))
    return dict(sorted(totals.items(), key=lambda kv: (kv[0].endswith(" calls"), -kv[1])))


def profile_rows(chosen: list[dict], prompt: np.ndarray, rounds: int) -> dict[str, dict[str, float]]:
    """`profile_decode` of each chosen row, interleaved over `rounds` rounds; per key the median over rounds."""
    samples: dict[str, list[dict[str, float]]] = {r["name"]: [] for r in chosen}
    for i in range(rounds):
        for r in chosen:
            samples[r["name"]].append(profile_decode(r["model"], prompt, 16, r["model"]))
        log(f"profile round {i + 1}/{rounds} done")
    return {name: {k: float(np.median([s.get(k, 0.0) for s in runs])) for k in dict.fromkeys(k for s in runs for k in s)}
            for name, runs in samples.items()}


def measure(decoder):
    """`prefill_decode` bound to an ORT `Decoder`, or a `LlamaCpp`'s own."""
    if isinstance(decoder, LlamaCpp):
        return decoder.prefill_decode
    return lambda prompt, new: prefill_decode(decoder, prompt, new)


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--work", type=pathlib.Path, default=None)
    ap.add_argument("--recompile", action="store_true")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--no-genai-runtime", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-op profile of one decode step (MatMulNBits by weight shape), medians of up to 5 "
                    "interleaved rounds: the fastest of ours and GenAI int4, or with --only every measured ORT row")
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "results" / "decode.json")
    ap.add_argument("--set", choices=sorted(ROW_SETS), default="decode", help="which of our rows: decode (this page's) "
                    "or pareto (issue 19's bytes/quality/speed rows; benchmarks/pareto.py reads the result)")
    ap.add_argument("--only", default=None, help="compile and measure only the rows whose name matches this regular "
                    "expression (re.search); the table in docs/decode.md is left alone")
    ap.add_argument("--threads", type=int, default=THREADS, help="intra-op threads of every runtime (default 2)")
    args = ap.parse_args()
    THREADS = args.threads

    from modelsurgeon.errors import UserError
    from modelsurgeon.models import real
    from modelsurgeon.models.cache import cache_dir
    from modelsurgeon.runtime import generate

    start = time.perf_counter()
    load_before = os.getloadavg()
    work = args.work or cache_dir("decode-bench")
    data = token_data(args.ppl_windows, args.calib_windows, max(args.contexts))
    fp32 = real.smollm2_optimum_onnx("text-generation-with-past").parent
    rows: list[dict] = [{"name": "fp32 (Optimum KV export)", "by": "optimum", "folder": fp32}]
    for name, precision, algo in (("GenAI int4 default", "int4", None), ("GenAI int4 k_quant_mixed", "int4", "k_quant_mixed"),
                                  ("GenAI fp32", "fp32", None)):
        if args.only is not None and not re.search(args.only, name):
            continue  # not measured: not built either
        log(f"GenAI builder {name}")
        try:
            rows.append({"name": name, "by": "genai", "folder": real.smollm2_genai(precision, algo)})
        except Exception as exc:  # the builder failing is a result to record
            rows.append({"name": name, "by": "genai", "refused": str(exc)[:300]})
    sources = {"dynamo": real.smollm2_kv_onnx(), "optimum": fp32}
    for source, passes, fuse in ROW_SETS[args.set]:
        name = row_name(source, passes, fuse)
        if args.only is not None and not re.search(args.only, name):
            continue  # not measured: not compiled either
        log(f"compile {name}")
        calib = data["calib_heal" if "heal" in passes else "calib"]
        info = compile_ours(sources[source], source, passes, fuse, work, calib, args.recompile)
        row = {"name": name, "by": "ours", **info}
        if "refused" not in info:
            row["folder"] = work / slug(name)
            log(f"  {info['compile_s']:.0f} s")
        else:
            log(f"  refused: {info['refused']}")
        rows.append(row)
    if args.compile_only:
        return 0

    extra: dict = {}
    try:
        import llama_cpp  # noqa: F401

        for name, kind in LLAMA_CPP:
            if args.only is not None and not re.search(args.only, name):
                continue
            try:
                gguf = real.smollm2_gguf() if kind is None else requantized_gguf(real.smollm2_gguf(), kind, work)
            except Exception as exc:  # the quantizer failing is a result to record
                rows.append({"name": name, "by": "llama.cpp", "refused": str(exc)[:300]})
                continue
            rows.append({"name": name, "by": "llama.cpp", "size_MiB": gguf.stat().st_size / 2**20,
                         "llama_cpp": LlamaCpp(gguf)})
    except ImportError:
        extra["llama_cpp"] = "llama-cpp-python is not installed (pip install llama-cpp-python builds it from source)"
    live = [r for r in rows if "refused" not in r and (args.only is None or re.search(args.only, r["name"]))]
    rows = rows if args.only is None else live
    for r in live:
        if "llama_cpp" in r:
            r["decoder"] = r.pop("llama_cpp")
            continue
        r["model"] = generate.model_file(r["folder"])
        r["size_MiB"] = folder_mib(r["folder"])
        r["ops"] = op_counts(r["model"])
        try:
            r["decoder"] = generate.Decoder(str(r["model"]), label=r["name"], threads=THREADS)
        except UserError as exc:
            r["refused"] = f"does not load: {exc}"
        log(f"loaded {r['name']}: {r['size_MiB']:.0f} MiB")
    live = [r for r in live if "refused" not in r]
    # perplexity
    for r in live:
        r["ppl"] = r["decoder"].perplexity(data["ppl"]) if isinstance(r["decoder"], LlamaCpp) \
            else perplexity(r["decoder"], data["ppl"])
        log(f"ppl {r['name']}: {r['ppl']:.3f}")
    # warm-up
    for r in live:
        measure(r["decoder"])(data["prompt"][:, :128], 4)
    times = {(r["name"], c): {"prefill": [], "decode": []} for r in live for c in args.contexts}
    for rnd in range(args.rounds):
        for r in live:
            for c in args.contexts:
                pre, dec, tokens = measure(r["decoder"])(data["prompt"][:, :c], args.new)
                times[(r["name"], c)]["prefill"].append(c / pre)
                times[(r["name"], c)]["decode"].append(args.new / dec)
                r.setdefault("tokens", {})[c] = tokens.tolist()
        log(f"round {rnd + 1}/{args.rounds} done")
    anchor = next((x["name"] for x in live if x["name"] == ANCHOR), None)
    for r in live:
        for c in args.contexts:
            r[f"prefill_tps_{c}"] = statistics.median(times[(r["name"], c)]["prefill"])
            r[f"decode_tps_{c}"] = statistics.median(times[(r["name"], c)]["decode"])
            if anchor is not None:
                r[f"decode_vs_anchor_{c}"] = paired_ratio(times[(r["name"], c)]["decode"], times[(anchor, c)]["decode"])
        ref = next((x for x in live if x["by"] == "optimum"), None)
        if ref is not None:
            r["token_agreement_fp32"] = {c: float(np.mean(np.array(r["tokens"][c]) == np.array(ref["tokens"][c])))
                                         for c in args.contexts}
        del r["decoder"]

    if not args.no_genai_runtime:
        for r in [x for x in live if x["by"] == "genai"]:
            try:
                runs = {c: [genai_decode(r["folder"], data["prompt"][:, :c], args.new) for _ in range(args.rounds)]
                        for c in args.contexts}
                r["onnxruntime_genai"] = {f"decode_tps_{c}": statistics.median(args.new / x["decode_s"] for x in v)
                                          for c, v in runs.items()}
                r["onnxruntime_genai"].update({f"prefill_tps_{c}": statistics.median(c / x["prefill_s"] for x in v)
                                               for c, v in runs.items()})
            except Exception as exc:
                r["onnxruntime_genai"] = {"error": str(exc).splitlines()[0][:200]}
            log(f"onnxruntime_genai {r['name']}: {r['onnxruntime_genai']}")
    ours = [r for r in live if r["by"] == "ours"]
    if args.profile and ours and anchor is not None:
        # with --only: every ORT row measured; else the fastest of ours against the anchor
        chosen = [r for r in live if "model" in r] if args.only is not None else \
            [max(ours, key=lambda r: r[f"decode_tps_{args.contexts[0]}"]), next(x for x in live if x["name"] == anchor)]
        extra["profile_ms_per_decode_step"] = profile_rows(chosen, data["prompt"], max(1, min(args.rounds, 5)))

    for r in rows:
        for k in ("folder", "model", "decoder"):
            r.pop(k, None)
    doc = {"benchmark": "decode", "command": COMMAND + " " + " ".join(sys.argv[1:]), "threads": THREADS,
           "rounds": args.rounds, "new_tokens": args.new, "contexts": args.contexts, "ppl_windows": args.ppl_windows,
           "set": args.set, "calib_windows": args.calib_windows, "heal_calib_windows": HEAL_WINDOWS,
           "load_before": load_before, "load_after": os.getloadavg(), "seconds": time.perf_counter() - start,
           "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows, **extra}
    import onnxruntime

    doc["onnxruntime"] = onnxruntime.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str))
    log(f"wrote {args.out} in {doc['seconds']:.0f} s")
    if args.only is None and args.set == "decode":
        write_table(doc)
    return 0


def paired_ratio(ours: list[float], anchor: list[float]) -> float:
    """Median over rounds of ours / anchor, each ratio taken within one round (the two ran seconds apart, under the
    same load): steadier than the ratio of the two medians on shared cores."""
    return statistics.median(a / b for a, b in zip(ours, anchor))


def write_table(doc: dict) -> None:
    cs = doc["contexts"]
    head = ["row", "MiB", "nodes", "ppl Macbeth"] + [f"{k} tok/s @{c}" for c in cs for k in ("prefill", "decode")]
    paired = any(f"decode_vs_anchor_{c}" in r for r in doc["rows"] for c in cs)
    if paired:
        head += [f"decode / GenAI int4 @{c}" for c in cs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["rows"]:
        if "refused" in r:
            lines.append(f"| {r['name']} | refused: {r['refused'][:160]} |")
            continue
        cells = [r["name"], f"{r.get('size_MiB', 0):.0f}", str(sum(r["ops"].values())) if r.get("ops") else "-",
                 f"{r['ppl']:.2f}" if r.get("ppl") else "-"]
        cells += [f"{r.get(f'{k}_tps_{c}', float('nan')):.1f}" for c in cs for k in ("prefill", "decode")]
        if paired:
            cells += [f"{r[f'decode_vs_anchor_{c}']:.2f}x" if f"decode_vs_anchor_{c}" in r else "-" for c in cs]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    md = ROOT / "docs" / "decode.md"
    text = md.read_text() if md.exists() else "<!-- BEGIN RESULTS -->\n<!-- END RESULTS -->\n"
    a, b = text.index("<!-- BEGIN RESULTS -->"), text.index("<!-- END RESULTS -->")
    md.write_text(text[:a] + "<!-- BEGIN RESULTS -->\n" + table + "\n" + text[b:])


if __name__ == "__main__":
    sys.exit(main())
