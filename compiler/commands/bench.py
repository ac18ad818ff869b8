"""`modelsurgeon bench A.onnx [B.onnx ...]`: interleaved latency and throughput, ratios against the first model."""

from __future__ import annotations

import json
import shlex
import sys

from modelsurgeon.argtypes import nonnegative_int, positive_int
from modelsurgeon.errors import UserError


def add_runtime_options(p) -> None:
    """ONNX Runtime options shared by bench, eval and sweep."""
    p.add_argument("--providers", help="comma-separated execution providers (default CPUExecutionProvider)")
    p.add_argument("--threads", type=positive_int, help="intra-op threads (default: ONNX Runtime's choice)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4),
                   help="session.qdq_matmulnbits_accuracy_level for int4 models (4: int8 activations)")


def providers_of(args) -> list[str] | None:
    return [p.strip() for p in args.providers.split(",") if p.strip()] if getattr(args, "providers", None) else None


def add_timing_options(p) -> None:
    p.add_argument("--batch", type=positive_int, default=1, help="samples per run (default 1)")
    p.add_argument("--seq", type=positive_int, help="length bound to symbolic non-batch dimensions (default 128)")
    p.add_argument("--warmup", type=nonnegative_int, default=5, help="untimed runs per model first (default 5)")
    p.add_argument("--rounds", type=positive_int, default=10, help="interleaved measuring rounds (default 10)")
    p.add_argument("--number", type=positive_int, help="runs per model per round (default: enough for ~50 ms)")


def cmd_bench(args) -> int:
    import pathlib

    from modelsurgeon.runtime.benchmark import benchmark

    for m in args.models:
        path = pathlib.Path(m)
        if not path.is_file():
            raise UserError(f"{m}: no such model file; give paths of .onnx files")
    report = benchmark(args.models, batch=args.batch, seq=args.seq, calibration=args.calib, tokenizer=args.tokenizer,
                       providers=providers_of(args), threads=args.threads, warmup=args.warmup, rounds=args.rounds,
                       number=args.number, accuracy_level=args.accuracy_level, progress=not args.quiet)
    if args.json:
        print(json.dumps(report.as_dict(command=command_line()), indent=2, default=str))
    elif not args.quiet:
        print(report.table())
    return 0


def command_line() -> str:
    return "modelsurgeon " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def register(subparsers, add_common, add_calibration) -> None:
    p = subparsers.add_parser("bench", help="latency and throughput on ONNX Runtime, interleaved, ratios against the first model")
    p.add_argument("models", nargs="+", metavar="MODEL", help=".onnx files (the first is the baseline)")
    add_timing_options(p)
    p.add_argument("--calib", help="take the inputs from this calibration data (.npz, folder, or text with --tokenizer) "
                                   "instead of synthesizing them")
    p.add_argument("--tokenizer", help="tokenizer.json (or a folder holding one) for text --calib")
    add_runtime_options(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON (docs/results.md convention)")
    add_common(p)
    p.set_defaults(func=cmd_bench)
