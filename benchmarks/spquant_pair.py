"""Our op against MatMulNBits on the real layer shapes, one cache-resident weight each: a quick pair check.

`benchmarks/spquant.py` streams many copies of each weight from DRAM and runs every variant; this script times one
copy of our op (dense, 8-bit scale codes, tiles of 8: the 4.25-bit format at block 32, 4.125 bits at --block 64) and
one MatMulNBits (4 bits, block 32 or --nbits-block, accuracy_level=4), interleaved, at 1 and 128 rows, and prints one line per shape and row count. It is what ran on the
device machine's Xeon (AVX-512 VNNI), where a whole spquant.py run did not fit the time lent:

    MODELSURGEON_CUSTOM_OPS_LIB=... taskset -c 2,3 python benchmarks/spquant_pair.py --threads 2 --out r.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPES = [(576, 192), (1536, 384), (576, 576), (576, 960), (576, 3072), (1536, 576), (384, 1536)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--shapes", help="KxN,KxN,... instead of the default list")
    ap.add_argument("--block", type=int, default=32, help="our op's block (rows per group)")
    ap.add_argument("--nbits-block", type=int, default=32, help="MatMulNBits' block_size")
    ap.add_argument("--out", type=pathlib.Path, help="JSON of the medians")
    ap.add_argument("--baseline-library", type=pathlib.Path,
                    help="another build of our library (e.g. the previous commit's), timed as a third session in the "
                         "same interleaved rounds")
    args = ap.parse_args(argv)
    spec = importlib.util.spec_from_file_location("spquant_bench", ROOT / "benchmarks" / "spquant.py")
    sb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sb)
    from modelsurgeon.runtime.custom_ops import kernel_info

    rows = []
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    for K, N in shapes:
        rng = np.random.default_rng(0)
        nbits, _ = sb.matmulnbits_model(rng, K, N, 1, block=args.nbits_block)
        ours, _, _ = sb.sparse_model(rng, K, N, 1, tile=8, dense8=True, block=args.block)
        sessions = {"MatMulNBits": sb.session(nbits, False, threads=args.threads),
                    "ours": sb.session(ours, True, threads=args.threads)}
        if args.baseline_library:
            sessions["baseline"] = sb.session(ours, str(args.baseline_library), threads=args.threads)
        for M in (1, 128):
            A = np.random.default_rng(1).normal(size=(M, K)).astype(np.float32)
            times = {name: [] for name in sessions}
            for _ in range(args.rounds):
                for name, s in sessions.items():
                    calls = 200 if M == 1 else 20
                    start = time.perf_counter()
                    for _ in range(calls):
                        s.run(None, {"A": A})
                    times[name].append((time.perf_counter() - start) / calls * 1e6)
            med = {name: float(np.median(t)) for name, t in times.items()}
            rows.append({"K": K, "N": N, "M": M, "us": med, "ours_faster": med["MatMulNBits"] / med["ours"]})
            line = (f"{K}x{N} M={M} threads={args.threads}: MatMulNBits {med['MatMulNBits']:.1f} us, ours "
                    f"{med['ours']:.1f} us, ours faster {rows[-1]['ours_faster']:.2f}x")
            if "baseline" in med:
                rows[-1]["baseline_faster"] = med["MatMulNBits"] / med["baseline"]
                line += f"; baseline library {med['baseline']:.1f} us ({rows[-1]['baseline_faster']:.2f}x)"
            print(line, flush=True)
    if args.out:
        args.out.write_text(json.dumps({"benchmark": "spquant_pair",
                                        "command": "python benchmarks/spquant_pair.py " + " ".join(sys.argv[1:]),
                                        "kernel": kernel_info(), "threads": args.threads, "rounds": args.rounds,
                                        "block": args.block, "nbits_block": args.nbits_block,
                                        "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
