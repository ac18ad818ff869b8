"""`modelsurgeon sweep MODEL.onnx --grid "slice(sparsity=0.1|0.2),quant4(block=32|128)" -o DIR`: every
combination compiled, evaluated and benchmarked; table (CSV/JSON) and a size-against-quality plot with the Pareto front."""

from __future__ import annotations

import json

from modelsurgeon.commands.bench import add_runtime_options, command_line, providers_of
from modelsurgeon.commands.eval import add_eval_options
from modelsurgeon.argtypes import nonnegative_int, positive_int
from modelsurgeon.errors import UserError


def cmd_sweep(args) -> int:
    from modelsurgeon.sweep import run_sweep

    if args.num_samples < 1 or args.seq_len < 1:
        raise UserError("--num-samples and --seq-len must be positive")
    result = run_sweep(args.model, args.grid, args.output, task=args.task, data=args.data, tokenizer=args.tokenizer,
                       labels=args.labels, calibration=args.calib, num_samples=args.num_samples, seq_len=args.seq_len,
                       eval_samples=args.eval_samples, batch_size=args.batch_size, output=args.output_name,
                       bench=not args.no_bench, batch=args.batch, seq=args.seq, rounds=args.rounds, warmup=args.warmup,
                       number=args.number, providers=providers_of(args), threads=args.threads,
                       accuracy_level=args.accuracy_level, max_runs=args.max_runs, verify=not args.no_verify,
                       progress=not args.quiet, command=command_line(), plot=not args.no_plot)
    if args.json:
        print(json.dumps(result.as_dict(command_line()), indent=2, default=str))
    elif not args.quiet:
        print(result.table())
    return 0


def register(subparsers, add_common, add_calibration) -> None:
    from modelsurgeon.sweep import MAX_RUNS

    p = subparsers.add_parser("sweep", help="compile, evaluate and benchmark every combination of a grid of pass options")
    p.add_argument("model", help="the original .onnx model")
    p.add_argument("--grid", action="append", required=True,
                   help="passes with alternatives separated by '|', e.g. 'slice(sparsity=0.1|0.2),quant4(block=32|128)'; "
                        "repeat --grid to concatenate grids")
    p.add_argument("-o", "--output", required=True, help="folder for sweep.csv, sweep.json, sweep.png and models/")
    add_eval_options(p)
    p.add_argument("--eval-samples", type=positive_int, default=64, help="evaluation windows/sentences/samples (default 64)")
    add_calibration(p)
    p.add_argument("--batch", type=positive_int, default=1, help="benchmark: samples per run (default 1)")
    p.add_argument("--seq", type=positive_int, help="benchmark: length bound to symbolic non-batch dimensions (default 128)")
    p.add_argument("--rounds", type=positive_int, default=10, help="benchmark: interleaved rounds (default 10)")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="benchmark: warm-up runs per model (default 3)")
    p.add_argument("--number", type=positive_int, help="benchmark: runs per model per round (default: ~50 ms worth)")
    p.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check after each pass")
    p.add_argument("--max-runs", type=positive_int, default=MAX_RUNS, help=f"refuse grids with more pipelines (default {MAX_RUNS})")
    add_runtime_options(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_common(p)
    p.set_defaults(func=cmd_sweep)
