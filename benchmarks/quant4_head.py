"""quant4's output head: float, 8 or 4 bits, under rtn and gptq, on SmolLM2-135M with its KV cache.

Measures what `lm_head=auto` chooses between (passes/quant4.py `head_bits`): for each algorithm and head setting
(float with the table float too; 8 and 4 bits with the tied table read from the head's codes), the compiled size,
perplexity on held-out Macbeth (16 windows of 128 tokens) and decode tokens/s after a 128-token prompt (median of
7 interleaved rounds, 2 threads, spinning off), through the decode benchmark's loop (benchmarks/decode.py).

    python benchmarks/quant4_head.py        # ~10 min on 2 cores

Writes docs/results/quant4_head.json; docs/quant.md gives the table.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import decode as D  # noqa: E402


def main() -> int:
    from modelsurgeon.models import real
    from modelsurgeon.models.cache import cache_dir
    from modelsurgeon.runtime import generate

    start = time.perf_counter()
    work = cache_dir("quant4-head-bench")
    data = D.token_data(16, 32, 128)
    src = real.smollm2_kv_onnx()
    rows = []
    for algo in ("rtn", "gptq"):
        for head in ("float", "8", "4"):
            passes = f"quant4(algo={algo},lm_head={head},embeddings={'false' if head == 'float' else 'auto'})"
            info = D.compile_ours(src, "dynamo", passes, True, work, data["calib"], False)
            folder = work / D.slug(D.row_name("dynamo", passes, True))
            decoder = generate.Decoder(str(generate.model_file(folder)), label=passes, threads=D.THREADS)
            rows.append({"name": passes, "MiB": D.folder_mib(folder), "ppl": D.perplexity(decoder, data["ppl"]),
                         "compile_s": info.get("compile_s"), "decoder": decoder, "tps": []})
            D.log(f"{passes}: {rows[-1]['MiB']:.0f} MiB, ppl {rows[-1]['ppl']:.2f}")
    for r in rows:
        D.measure(r["decoder"])(data["prompt"][:, :128], 4)
    for _ in range(7):
        for r in rows:
            _, seconds, _ = D.measure(r["decoder"])(data["prompt"][:, :128], 32)
            r["tps"].append(32 / seconds)
    for r in rows:
        r["decode_tps_128"] = statistics.median(r.pop("tps"))
        del r["decoder"]
    out = ROOT / "docs" / "results" / "quant4_head.json"
    out.write_text(json.dumps({"benchmark": "quant4_head", "command": "python benchmarks/quant4_head.py",
                               "seconds": time.perf_counter() - start, "rows": rows}, indent=1))
    D.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
