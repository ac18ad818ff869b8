"""Time and peak memory of `cleanup` and `quant4` on models of 1, 3 and 6 GB (external data).

    python benchmarks/large.py                  # writes docs/results/large.json
    python benchmarks/large.py --sizes 1,3      # fewer sizes

Each model is a chain of 16384x16384 fp32 MatMuls (`modelsurgeon.models.large.build`, 1 GiB each, stored
64 KiB-aligned in one data file). Each compile runs through the command line in a child process with
verification on; peak memory is that process's own maximum resident set (`VmHWM`), which counts the pages
of the input's data file that were read through memory maps as well as allocated memory. Models and outputs
are written to a temporary folder (--workdir) and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
BOUNDS = {"cleanup": 1.5, "quant4": 2.0}  # peak memory allowed, times the model's size (issue: large models)


def main(argv: list[str] | None = None) -> int:
    from modelsurgeon.models import large
    from modelsurgeon.runtime.benchmark import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,3,6", help="model sizes in GiB, comma-separated (default 1,3,6)")
    parser.add_argument("--workdir", help="folder for the models (default: a temporary folder)")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s]
    command = "python benchmarks/large.py" + ("" if args.sizes == "1,3,6" else f" --sizes {args.sizes}")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = pathlib.Path(tmp)
        for gib in sizes:
            (tmp / f"m{gib:g}").mkdir()
            src = large.build(tmp / f"m{gib:g}" / "model.onnx", gib)
            size = large.data_bytes(src)
            for passes, bound in BOUNDS.items():
                out = tmp / f"out-{gib:g}-{passes}" / "model.onnx"
                out.parent.mkdir()
                r = large.run_measured(["compile", src, "--passes", passes, "-o", out, "-q"], tmp)
                if r["code"] != 0:
                    print(r["stderr"], file=sys.stderr)
                row = {"model_GiB": round(size / 2**30, 2), "passes": passes, "exit": r["code"],
                       "seconds": round(r["seconds"], 1),
                       "peak_GiB": None if r["peak_bytes"] is None else round(r["peak_bytes"] / 2**30, 2),
                       "peak_over_model": None if r["peak_bytes"] is None else round(r["peak_bytes"] / size, 2),
                       "bound": bound,
                       "output_GiB": round(large.data_bytes(out) / 2**30, 2) if out.exists() else None}
                print(json.dumps(row), flush=True)
                rows.append(row)
                shutil.rmtree(out.parent)
            shutil.rmtree(src.parent)
    data = {"benchmark": "large", "command": command, "machine": machine_info(), "rows": rows,
            "notes": ["model: a chain of 16384x16384 fp32 MatMuls in one external data file; input x [batch, 16384]",
                      "each compile: `modelsurgeon compile model.onnx --passes P -o out/model.onnx -q` with verification "
                      "(2 synthesized samples), in a child process; seconds include start-up, verification and saving",
                      "peak: the child's own VmHWM (not ru_maxrss, which exec carries over from the parent), which counts pages of the input's data file read through memory maps",
                      "quant4 stores the last MatMul (it writes the graph output, as an LM head does) at 8 bits "
                      "(lm_head=auto); before that default it kept it in float, copied from the input's data file"]}
    out_dir = ROOT / "docs" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "large.json").write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
