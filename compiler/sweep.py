"""Sweeps: compile every combination of a grid of pass options, evaluate and benchmark each, find the Pareto front.

Grid syntax is the `--passes` syntax with alternatives separated by `|` inside option values:
`slice(sparsity=0.1|0.2|0.3),quant4(block=32|128)` expands to the 3 x 2 pipelines
`slice(sparsity=0.1),quant4(block=32)`, ... Several grids may be given; their expansions are concatenated
(duplicates dropped). The original model is always the first row (the baseline).

Each pipeline is compiled from the original (with verification, so a pass that breaks the model fails its row
instead of the sweep), saved, evaluated against the original on the task data, and finally all models are
benchmarked together, interleaved, so latency ratios are comparable. The results table is written as CSV and
JSON (docs/results.md convention) and plotted: size against the task's headline metric, latency as colour,
the Pareto front (smallest size for the best quality) marked. The plot needs matplotlib, the `plot` extra: without
it the sweep still runs and writes the table, and says so in one warning line before it starts.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import json
import logging
import pathlib
import re
import time
from typing import Any, Sequence

from modelsurgeon.errors import UserError
from modelsurgeon.pipeline import build_pipeline, parse_passes

log = logging.getLogger("modelsurgeon")

PLOT_NEEDS = "the sweep plot needs matplotlib, which is not installed"

MAX_RUNS = 64


def _split_alternatives(value: str) -> list[str]:
    """Split on `|` outside parentheses: `0.1|0.2` -> ['0.1', '0.2']."""
    parts, depth, cur = [], 0, []
    for ch in value:
        if ch == "|" and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur.append(ch)
    parts.append("".join(cur).strip())
    if any(not p for p in parts):
        raise UserError(f"--grid: empty alternative in '{value}'; write values like 0.1|0.2")
    return parts


def expand_grid(grids: str | Sequence[str]) -> list[str]:
    """Pipeline strings for every combination of the `|` alternatives in one or more grids."""
    grids = [grids] if isinstance(grids, str) else list(grids)
    pipelines: list[str] = []
    for grid in grids:
        if not grid or not grid.strip():
            raise UserError("--grid is empty; give e.g. 'quant4(block=32|128)'")
        axes: list[list[str]] = []
        for name, opts in parse_passes(grid):
            keys = list(opts)
            choices = [_split_alternatives(opts[k]) for k in keys]
            axes.append([f"{name}({','.join(f'{k}={v}' for k, v in zip(keys, combo))})" if keys else name
                         for combo in itertools.product(*choices)])
        for combo in itertools.product(*axes):
            text = ",".join(combo)
            if text not in pipelines:
                pipelines.append(text)
    return pipelines


def slug(pipeline: str, index: int) -> str:
    """A file name for a pipeline's model: `03-quant4-block-32`."""
    s = re.sub(r"[^A-Za-z0-9.]+", "-", pipeline).strip("-")
    return f"{index:02d}-{s[:60]}"


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool) -> list[bool]:
    """Which (size, quality) points no other point beats: no smaller-or-equal size with better-or-equal quality
    and one of them strictly better."""
    def better_eq(a, b):
        return a >= b if higher_is_better else a <= b

    def better(a, b):
        return a > b if higher_is_better else a < b

    front = []
    for i, (s_i, q_i) in enumerate(points):
        dominated = any(s_j <= s_i and better_eq(q_j, q_i) and (s_j < s_i or better(q_j, q_i))
                        for j, (s_j, q_j) in enumerate(points) if j != i)
        front.append(not dominated)
    return front


@dataclasses.dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    metric: str
    higher_is_better: bool
    task: str
    model: str
    machine: dict[str, Any] | None = None
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    COLUMNS = ("index", "pipeline", "status", "bytes", "size_ratio", "parameters", "macs", "quality", "rel_l2",
               "latency_ms", "latency_q25_ms", "latency_q75_ms", "speedup", "pareto", "compile_s", "path")

    def table(self) -> str:
        from modelsurgeon.stats import human_bytes

        show_error = self.metric != "rel_l2"  # the raw output error, unless it is the metric already
        head = ["#", "pipeline", "size", "params", self.metric] + (["rel L2"] if show_error else []) + ["latency", "speedup", "pareto"]
        lines = [head]
        for r in self.rows:
            if r["status"] != "ok":
                lines.append([str(r["index"]), r["pipeline"], r["status"][:70]] + [""] * (len(head) - 3))
                continue
            lines.append([str(r["index"]), r["pipeline"],
                          human_bytes(r["bytes"]) + (f" ({r['size_ratio']:.0%})" if r["index"] else ""),
                          f"{r['parameters']:,}" if r["parameters"] is not None else "?", _num(r["quality"])]
                         + ([_num(r["rel_l2"])] if show_error else [])
                         + [f"{r['latency_ms']:.3f} ms" if r["latency_ms"] is not None else "-",
                            f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-",
                            "*" if r["pareto"] else ""])
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        out = []
        for j, row in enumerate(lines):
            out.append("  ".join(c.ljust(w) if i <= 1 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
            if j == 0:
                out.append("  ".join("-" * w for w in widths))
        out.append("")
        out.append(f"{self.metric}: {'higher' if self.higher_is_better else 'lower'} is better; * = on the Pareto front "
                   "of size against quality")
        for what, path in self.files.items():
            out.append(f"{what}: {path}")
        return "\n".join(out)

    def as_dict(self, command: str | None = None) -> dict[str, Any]:
        return {"benchmark": "sweep", "command": command, "machine": self.machine, "model": self.model, "task": self.task,
                "metric": self.metric, "higher_is_better": self.higher_is_better, "rows": self.rows,
                "notes": [f"quality = {self.metric} ({'higher' if self.higher_is_better else 'lower'} is better); "
                          "latency from one interleaved benchmark of all rows; row 0 is the original model"]}

    def write(self, out_dir: pathlib.Path, command: str | None = None, plot: bool = True) -> dict[str, str]:
        csv_path, json_path, png_path = out_dir / "sweep.csv", out_dir / "sweep.json", out_dir / "sweep.png"
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for r in self.rows:
                writer.writerow(r)
        self.files = {"table": str(csv_path), "json": str(json_path)}
        if plot:
            plot_sweep(self, png_path)
            self.files["plot"] = str(png_path)
        json_path.write_text(json.dumps(self.as_dict(command), indent=2, default=str))
        return self.files


def _num(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    return f"{x:.4g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.3e}"


def plot_sweep(result: SweepResult, path: pathlib.Path) -> pathlib.Path:
    """Size (x) against quality (y), colour = latency, Pareto front joined and ringed, baseline a star."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"{PLOT_NEEDS}; pip install 'modelsurgeon[plot]'") from None

    ok = [r for r in result.rows if r["status"] == "ok" and r["quality"] is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=100)
    if ok:
        xs = [r["bytes"] / 2**20 for r in ok]
        ys = [r["quality"] for r in ok]
        lat = [r["latency_ms"] if r["latency_ms"] is not None else float("nan") for r in ok]
        has_lat = any(v == v for v in lat)
        sc = ax.scatter(xs, ys, c=lat if has_lat else "tab:blue", cmap="viridis", s=60, zorder=3,
                        marker="o", edgecolors="none")
        if has_lat:
            fig.colorbar(sc, ax=ax, label="latency (ms, median)")
        front = sorted((x, y) for x, y, r in zip(xs, ys, ok) if r["pareto"])
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:red", lw=1, zorder=2)
            ax.scatter([p[0] for p in front], [p[1] for p in front], s=160, facecolors="none", edgecolors="tab:red",
                       linewidths=1.5, zorder=4, label="Pareto front")
        base = next((r for r in ok if r["index"] == 0), None)
        if base is not None:
            ax.scatter([base["bytes"] / 2**20], [base["quality"]], marker="*", s=260, color="black", zorder=5,
                       label="original")
        at: dict[tuple[float, float], list[str]] = {}
        for x, y, r in zip(xs, ys, ok):  # coincident points share one label "0,1,2"
            at.setdefault((x, y), []).append(str(r["index"]))
        for (x, y), names in at.items():
            ax.annotate(",".join(names), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no successful runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel(f"{result.metric} ({'higher' if result.higher_is_better else 'lower'} is better)")
    ax.set_title(f"sweep of {pathlib.Path(result.model).name}: {result.task} task (numbers = row index)", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_sweep(model: str | pathlib.Path, grids: str | Sequence[str], out_dir: str | pathlib.Path, *, task: str = "output",
              data: Any = None, tokenizer: Any = None, labels: Any = None, calibration: Any = None,
              num_samples: int = 32, seq_len: int = 128, eval_samples: int = 64, eval_seq_len: int | None = None,
              batch_size: int = 8, output: str | None = None, bench: bool = True, batch: int = 1, seq: int | None = None,
              rounds: int = 10, warmup: int = 3, number: int | None = None, providers: Sequence[str] | None = None,
              threads: int | None = None, accuracy_level: int | None = None, max_runs: int = MAX_RUNS,
              verify: bool = True, progress: bool = True, command: str | None = None, plot: bool = True) -> SweepResult:
    """Compile, evaluate and benchmark every pipeline of the grid(s); write sweep.csv/.json/.png into `out_dir`."""
    from modelsurgeon import calibration as calib_mod
    from modelsurgeon.manager import compile as compile_model
    from modelsurgeon.model_io import load
    from modelsurgeon.progress import progress as progress_bar
    from modelsurgeon.runtime.benchmark import benchmark, check_providers, file_size, machine_info
    from modelsurgeon.runtime.evaluate import check_request, evaluate
    from modelsurgeon.stats import count_parameters

    check_request(task, data, tokenizer, True, eval_samples, eval_seq_len or seq_len, batch_size)
    model = pathlib.Path(model)
    if not model.is_file():
        raise UserError(f"{model}: no such model file; give the path of an .onnx model")
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: is a file; give a folder for the sweep results")
    above = next(p for p in out_dir.absolute().parents if p.exists())
    if not out_dir.exists() and not above.is_dir():
        raise UserError(f"{out_dir}: {above} is a file, not a folder; give a folder for the sweep results")
    pipelines = expand_grid(grids)
    if len(pipelines) > max_runs:
        raise UserError(f"the grid expands to {len(pipelines)} pipelines, more than --max-runs {max_runs}; "
                        "use fewer alternatives or raise --max-runs")
    for p in pipelines:
        build_pipeline(parse_passes(p))  # every option checked before anything runs
    providers = check_providers(providers)
    if plot and importlib.util.find_spec("matplotlib") is None:  # said before the work starts, not after it
        log.warning("sweep: %s: writing the table only (pip install 'modelsurgeon[plot]', or --no-plot)", PLOT_NEEDS)
        plot = False
    original = load(model)
    calib = None
    if calibration is not None:  # load once for all pipelines
        calib = calib_mod.load_calibration(original, calibration, tokenizer=tokenizer, num_samples=num_samples,
                                           seq_len=seq_len)
    eval_kw = dict(task=task, data=data, tokenizer=tokenizer, labels=labels, num_samples=eval_samples,
                   seq_len=eval_seq_len or seq_len, batch_size=batch_size, output=output, providers=providers,
                   threads=threads, accuracy_level=accuracy_level)

    rows: list[dict[str, Any]] = []
    base_eval = evaluate(model, model, **eval_kw)  # the original against itself: its own perplexity/accuracy
    metric, higher = base_eval.headline, base_eval.higher_is_better
    rows.append({"index": 0, "pipeline": "(original)", "status": "ok", "bytes": file_size(model), "size_ratio": 1.0,
                 "parameters": count_parameters(original), "macs": None, "quality": base_eval.quality,
                 "rel_l2": base_eval.metrics.get("rel_l2", 0.0), "metrics": base_eval.metrics,
                 "compile_s": 0.0, "path": str(model)})
    del original
    # created only now that the model, the data and the evaluation have been checked: bad input leaves nothing behind
    out_dir.mkdir(parents=True, exist_ok=True)
    models_dir = out_dir / "models"
    models_dir.mkdir(exist_ok=True)

    for i, pipeline in enumerate(progress_bar(pipelines, desc="sweep", total=len(pipelines), enabled=progress), start=1):
        row: dict[str, Any] = {"index": i, "pipeline": pipeline, "status": "ok", "bytes": None, "size_ratio": None,
                               "parameters": None, "macs": None, "quality": None, "rel_l2": None, "metrics": {},
                               "compile_s": None, "path": None}
        rows.append(row)
        log.info("sweep %d/%d: %s", i, len(pipelines), pipeline)
        t0 = time.perf_counter()
        try:
            result = compile_model(str(model), pipeline, calibration=calib, tokenizer=tokenizer, num_samples=num_samples,
                                   seq_len=seq_len, verify=verify, progress=progress, providers=providers,
                                   allow_degraded=True)  # a degraded point is still a point of the trade-off
            path = result.save(models_dir / f"{slug(pipeline, i)}.onnx")
            row["compile_s"] = time.perf_counter() - t0
            final = result.report.final
            row.update(path=str(path), bytes=file_size(path), parameters=final.parameters, macs=final.macs)
            row["size_ratio"] = row["bytes"] / rows[0]["bytes"]
            rows[0]["macs"] = rows[0]["macs"] or result.report.rows[0].macs
            ev = evaluate(path, model, **eval_kw)
            row.update(quality=ev.quality, rel_l2=ev.metrics.get("rel_l2"), metrics=ev.metrics)
        except Exception as exc:  # a pass refused, broke the model or crashed: that row fails, the sweep goes on
            what = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            row["status"] = f"failed: {what}" if isinstance(exc, UserError) else f"error: {type(exc).__name__}: {what}"
            row["path"] = None
            log.warning("sweep: %s %s (modelsurgeon compile --passes '%s' --debug shows the details)",
                        pipeline, row["status"], pipeline)

    ok = [r for r in rows if r["status"] == "ok"]
    if bench:
        report = benchmark([r["path"] for r in ok], labels=[str(r["index"]) for r in ok], batch=batch, seq=seq,
                           # the calibration data's shapes, unless --seq asks for another length
                           calibration=calibration if seq is None and not isinstance(calibration, dict) else None,
                           tokenizer=tokenizer, providers=providers, threads=threads, warmup=warmup, rounds=rounds,
                           number=number, accuracy_level=accuracy_level, progress=progress)
        for r, b in zip(ok, report.rows):
            r.update(latency_ms=b.median_ms, latency_q25_ms=b.q25_ms, latency_q75_ms=b.q75_ms, speedup=b.speedup)
        machine = report.machine
    else:
        machine = machine_info(providers, threads)
    for r in rows:
        r.setdefault("latency_ms", None)
        r.setdefault("latency_q25_ms", None)
        r.setdefault("latency_q75_ms", None)
        r.setdefault("speedup", None)
    scored = [r for r in ok if r["quality"] is not None]
    for r, on in zip(scored, pareto_front([(r["bytes"], r["quality"]) for r in scored], higher)):
        r["pareto"] = on
    for r in rows:
        r.setdefault("pareto", False)
    result = SweepResult(rows, metric, higher, task, str(model), machine)
    result.write(out_dir, command, plot=plot)
    return result
