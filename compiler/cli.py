"""The `modelsurgeon` command line: compile, inspect, passes (and commands from modelsurgeon.commands).

Every user error prints one line on stderr and exits with code 2 (a failed verification exits 1);
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import pkgutil
import signal
import sys
import threading
import time
import warnings

from modelsurgeon.argtypes import input_shape, nonnegative_int, positive_float, positive_int
from modelsurgeon.errors import UserError

log = logging.getLogger("modelsurgeon")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one UserError line (exit 2) instead of usage text."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _add_common(p: argparse.ArgumentParser) -> None:
    # Defaults are suppressed here and set once on the top-level parser, so that a subcommand's parser does not
    # reset `modelsurgeon -q compile ...` to the defaults (argparse copies every subparser default over).
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="more detail")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", help="calibration data: .npz (input name -> array, samples first), a folder of .npz, a text file, or a "
                        "folder of .txt files (windows spread evenly over them; text needs --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer.json or a folder holding one (for text calibration)")
    p.add_argument("--num-samples", type=positive_int, default=32, help="calibration samples (default 32)")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per text sample (default 128)")


def _check_compile_output(args) -> None:
    """Before any work: the output may be written (a folder for a GenAI or Optimum folder, unless it names an .onnx)."""
    import pathlib

    from modelsurgeon.model_io import check_output_path

    if pathlib.Path(args.model).is_dir():
        from modelsurgeon import model_folder

        folder = model_folder.open_folder(args.model)
        if not str(args.output).endswith(".onnx"):
            return model_folder.check_output(args.output, folder, report=args.report)
        args_model = folder.model_file
    else:
        args_model = args.model
    check_output_path(args.output, args_model, report=args.report)


def cmd_compile(args) -> int:
    from modelsurgeon.manager import compile as compile_model
    from modelsurgeon.model_io import check_output_path, load

    if not args.passes and not args.pipeline:
        raise UserError("say what to run: --passes 'cleanup' or --pipeline FILE.json (list passes with `modelsurgeon passes`)")
    _check_compile_output(args)
    if args.num_samples < 1 or args.seq_len < 1:
        raise UserError("--num-samples and --seq-len must be positive")
    from modelsurgeon.pipeline import build_pipeline, load_pipeline_file, parse_passes

    specs = load_pipeline_file(args.pipeline) if args.pipeline else parse_passes(args.passes)
    build_pipeline(specs, cleanup=not args.no_cleanup, fuse=not args.no_fuse)  # validate the pipeline before loading anything big
    model = load(args.model)
    t0 = time.perf_counter()
    shapes = dict(args.input_shape or ())
    if len(shapes) < len(args.input_shape or ()):
        raise UserError("--input-shape names the same input twice; give each input once")
    result = compile_model(model, specs, calibration=args.calib, tokenizer=args.tokenizer, num_samples=args.num_samples,
                           seq_len=args.seq_len, verify=not args.no_verify, max_error=args.max_error,
                           cleanup=not args.no_cleanup, fuse=not args.no_fuse, progress=not args.quiet,
                           input_shapes=shapes,
                           eval_data=args.eval, holdout=args.holdout, quality=args.quality,
                           min_quality=args.min_quality, allow_degraded=args.allow_degraded)
    result.input_path = args.model
    result.report.input = args.model
    out = result.save(args.output, external_data=True if args.external_data else None)
    if args.report:
        result.report.write_json(args.report)
    if not args.quiet:
        print(result.report.table())
        print(f"\nwrote {out} in {time.perf_counter() - t0:.1f}s" + (f"; report {args.report}" if args.report else ""))
    return 0


def cmd_inspect(args) -> int:
    from modelsurgeon.inspect_model import analysis_description, describe_model, format_description
    from modelsurgeon.model_io import load

    model = load(args.model)
    info = describe_model(model, top=args.top)
    sections = {"blocks": None, "groups": None}
    if not args.no_blocks:
        sections["blocks"] = analysis_description(model, "blocks")
    if args.groups:
        sections["groups"] = analysis_description(model, "channel_groups")
        if sections["groups"] is None:
            raise UserError("channel-group analysis is not available in this install")
    if args.json:
        info.update({k: v for k, v in sections.items() if v is not None})
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(format_description(info))
    if sections["blocks"]:
        print("\ntransformer blocks:\n" + sections["blocks"])
    if sections["groups"]:
        print("\nchannel groups:\n" + sections["groups"])
    return 0


def cmd_passes(args) -> int:
    from modelsurgeon.pipeline import describe_passes

    rows = describe_passes()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        req = f"  (requires {', '.join(r['requires'])})" if r["requires"] else ""
        print(f"{r['name']:<16}{r['stage']:<10}{r['summary']}{req}")
        for k, o in r["options"].items():
            choices = f" {{{'|'.join(map(str, o['choices']))}}}" if o.get("choices") else ""
            print(f"    {k}={o['default']}{choices}  {o['help']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modelsurgeon", description="Graph-rewriting compiler for compressed ONNX models.")
    _add_common(parser)
    parser.set_defaults(debug=False, quiet=False, verbose=False)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser("compile", help="run passes on a model and save the result")
    p.add_argument("model", help="input .onnx file, or an ONNX Runtime GenAI or Optimum decoder folder (docs/folders.md)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file (never the input); for a model folder, "
                        "an output folder of the same kind")
    p.add_argument("--passes", help="e.g. 'slice(sparsity=0.25),quant4(block=32,algo=gptq)'")
    p.add_argument("--pipeline", help="JSON pipeline file instead of --passes")
    _add_calibration(p)
    p.add_argument("--input-shape", type=input_shape, action="append", metavar="NAME=D0,D1,...",
                   help="sizes for an input's symbolic dimensions when inputs are made up (no --calib), e.g. "
                        "pixel_values=1,3,224,224 (repeatable; the first, sample axis is chosen by calibration)")
    p.add_argument("--max-error", type=positive_float, help="stop at the pass whose output error (relative L2, worst output) exceeds this")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime comparison after each pass")
    p.add_argument("--eval", metavar="DATA", help="verify on this data (as --calib takes it; its first 8 samples, or "
                        "--holdout) instead of calibration samples held back from the passes")
    p.add_argument("--holdout", type=nonnegative_int, metavar="N", help="calibration samples held back from the passes "
                        "to verify on (default: a quarter of --num-samples, at most 8; 0: verify on the samples the "
                        "passes calibrate on)")
    p.add_argument("--quality", choices=("ppl", "cosine", "top1", "rel-l2"), help="the report's task metric: "
                        "perplexity ratio, embedding cosine, top-1 agreement or relative L2 (default: chosen from the "
                        "model's outputs)")
    p.add_argument("--min-quality", type=positive_float, metavar="X", help="the quality floor that stops the compile "
                        "(exit 1, nothing written): a cosine or top-1 agreement (default 0.5, 0.3), or the largest "
                        "perplexity ratio (default 10)")
    p.add_argument("--allow-degraded", action="store_true", help="keep a model past the quality floor (with a warning)")
    p.add_argument("--no-cleanup", action="store_true", help="do not append the cleanup pass")
    p.add_argument("--no-fuse", action="store_true", help="do not append the fuse pass (ONNX Runtime's fused norms, "
                        "rotary embeddings, attention and packed projections); the output keeps the exporter's ops")
    p.add_argument("--report", help="also write the report as JSON here")
    p.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data (automatic over 1.5 GB)")
    _add_common(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("inspect", help="opsets, ops, inputs/outputs, parameters, largest weights, transformer blocks")
    p.add_argument("model")
    p.add_argument("--groups", action="store_true", help="print the coupled channel groups (pruning analysis)")
    p.add_argument("--no-blocks", action="store_true", help="skip the transformer block finder")
    p.add_argument("--top", type=nonnegative_int, default=10, help="how many of the largest weights to list")
    p.add_argument("--json", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list the available passes and their options")
    p.add_argument("--json", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_passes)

    import modelsurgeon.commands as commands

    for mod in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"{commands.__name__}.{mod.name}")
        module.register(sub, _add_common, _add_calibration)
    return parser


def _configure_logging(args) -> None:
    level = logging.ERROR if getattr(args, "quiet", False) else logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="modelsurgeon: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    log.setLevel(level)  # the command line's -q/-v decide, whatever a host program set on this logger before
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers"):
        logging.getLogger(noisy).setLevel(max(level, logging.ERROR))
    if not getattr(args, "verbose", False):
        warnings.filterwarnings("ignore")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that every `finally` removes its temporary files."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if threading.current_thread() is threading.main_thread() else None
    try:
        return _main(argv, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str], debug: bool) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        _configure_logging(args)
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            raise
        print(f"modelsurgeon: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print("modelsurgeon: interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # output piped into `head` and friends: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError:
        if debug:
            raise
        print("modelsurgeon: error: out of memory; use fewer --num-samples or a smaller --seq-len", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: still one line, with how to get the details
        if debug:
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        print(f"modelsurgeon: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
