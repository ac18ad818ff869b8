"""`modelsurgeon eval MODEL.onnx --reference ORIGINAL.onnx --task lm|embedding|classification|output|generate --data ...`
(MODEL and ORIGINAL may be GenAI or Optimum folders)."""

from __future__ import annotations

import json
import pathlib

from modelsurgeon.commands.bench import add_runtime_options, command_line, providers_of
from modelsurgeon.argtypes import positive_int
from modelsurgeon.errors import UserError


def add_eval_options(p, data_required: bool = False) -> None:
    """Task and data options shared by eval and sweep."""
    from modelsurgeon.runtime.evaluate import TASKS

    p.add_argument("--task", choices=TASKS, default="output",
                   help="lm: perplexity; embedding: cosine and similarity-ranking agreement; classification: top-1 "
                        "agreement/accuracy; output: raw output error only (default); generate (KV-cache decoders): "
                        "greedy generation agreement and perplexity through the cached decode path")
    p.add_argument("--data", required=data_required,
                   help="evaluation data: a text file (lm: running text; embedding: one sentence per line; with "
                        "--tokenizer) or an .npz of model inputs (classification: plus a 'labels' array)")
    p.add_argument("--labels", help="class labels: .npy or one integer per line (classification)")
    p.add_argument("--output-name", metavar="NAME", help="the output holding logits or embeddings (default: found by name)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="samples per ONNX Runtime run (default 8)")


def cmd_eval(args) -> int:
    from modelsurgeon.runtime.evaluate import evaluate

    from modelsurgeon.runtime.generate import model_file

    for m in [args.model] + ([args.reference] if args.reference else []):
        if not pathlib.Path(m).is_file() and not pathlib.Path(m).is_dir():
            raise UserError(f"{m}: no such model file; give paths of .onnx files")
    # a GenAI or Optimum folder: its model file (whose folder's configs size the KV cache)
    args.model = str(model_file(args.model))
    args.reference = str(model_file(args.reference)) if args.reference else None
    result = evaluate(args.model, args.reference, task=args.task, data=args.data, tokenizer=args.tokenizer, gen_tokens=args.gen_tokens,
                      labels=args.labels, num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                      output=args.output_name, providers=providers_of(args), threads=args.threads,
                      accuracy_level=args.accuracy_level, progress=not args.quiet)
    if args.json:
        print(json.dumps(result.as_dict(command=command_line()), indent=2, default=str))
    elif not args.quiet:
        print(result.table())
    return 0


def register(subparsers, add_common, add_calibration) -> None:
    p = subparsers.add_parser("eval", help="quality against the original: perplexity, embedding agreement, top-1, output error")
    p.add_argument("model", help="the (compressed) .onnx model")
    p.add_argument("--reference", help="the original .onnx model to compare with")
    add_eval_options(p)
    p.add_argument("--tokenizer", help="tokenizer.json or a folder holding one (for text --data)")
    p.add_argument("--num-samples", type=positive_int, default=64, help="text windows (lm), sentences or samples to use (default 64)")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per window (lm) or most tokens per sentence (default 128)")
    p.add_argument("--gen-tokens", type=positive_int, default=32, help="tokens generated per prompt (generate; default 32)")
    add_runtime_options(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_common(p)
    p.set_defaults(func=cmd_eval)
