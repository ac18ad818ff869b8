"""Run every benchmark script in benchmarks/ and regenerate docs/results.md from docs/results/*.json.

    python benchmarks/run_all.py                 # run all scripts, then write docs/results.md
    python benchmarks/run_all.py --only quant    # run benchmarks/quant.py only (the page still lists every JSON)
    python benchmarks/run_all.py --no-run        # only regenerate docs/results.md from the JSON files present

A benchmark script is any `benchmarks/*.py` except this one and files starting with `_`. Each writes one or
more JSON files into docs/results/ in this convention (anything else in the file is kept but not shown):

    {"benchmark": "quant",                        # name (defaults to the file name)
     "command": "python benchmarks/quant.py",     # how to reproduce the numbers
     "machine": {"cpu": ..., "cores": ..., ...},  # or a string; modelsurgeon.runtime.benchmark.machine_info()
     "rows": [{"column": value, ...}, ...],       # the table; columns in order of first appearance
     "notes": ["one line per remark", ...]}       # optional

A PNG with the same stem (docs/results/NAME.png) is shown under its table. Scripts run one after another with
the repository root as working directory; a failing script is reported on the page and in the exit code, and
the page is written all the same from the JSON files that exist.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
RESULTS_DIR = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "results.md"


def scripts() -> list[pathlib.Path]:
    return sorted(p for p in BENCH_DIR.glob("*.py") if p.name != "run_all.py" and not p.name.startswith("_"))


def run_scripts(selected: list[pathlib.Path], timeout: float | None) -> list[dict[str, Any]]:
    runs = []
    for script in selected:
        print(f"== {script.relative_to(ROOT)}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        seconds = time.perf_counter() - t0
        print(f"== {script.name}: {'ok' if code == 0 else f'FAILED ({code})'} in {seconds:.0f}s", flush=True)
        runs.append({"script": script.name, "status": "ok" if code == 0 else f"failed ({code})", "seconds": seconds})
    return runs


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e4:
            return f"{value:.4g}"
        if 1e4 <= abs(value) < 1e15:
            return f"{value:.0f}"
        return f"{value:.3e}"
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str, separators=(",", ":"))
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _machine(machine: Any) -> str:
    if isinstance(machine, dict):
        return ", ".join(f"{k} {v}" for k, v in machine.items() if v not in (None, ""))
    return str(machine) if machine else "not recorded"


def _written(path: pathlib.Path) -> datetime.datetime:
    """When the results file was written: its last commit's time where the file is committed as it is (a fresh
    clone gives every file the clone's time), else the file's own modification time."""
    seconds = path.stat().st_mtime
    try:
        git = ["git", "-C", str(path.parent)]
        if subprocess.run(git + ["diff", "--quiet", "HEAD", "--", path.name], capture_output=True).returncode == 0:
            committed = subprocess.run(git + ["log", "-1", "--format=%ct", "--", path.name], capture_output=True,
                                       text=True).stdout.strip()
            seconds = int(committed) if committed else seconds
    except OSError:  # no git
        pass
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def section(path: pathlib.Path) -> tuple[str, str | None]:
    """(markdown, problem): one results file as a section, or why it could not be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return "", f"not valid JSON ({exc})"
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        return "", "no \"rows\" list (see the convention at the top of this page)"
    rows = [r if isinstance(r, dict) else {"value": r} for r in data["rows"]]
    name = str(data.get("benchmark") or path.stem)
    out = [f"## {name} ({path.name})", ""]
    doc = ROOT / "docs" / f"{name}.md"
    if doc.exists():
        out += [f"Details: [{doc.name}]({doc.name}).", ""]
    out += [f"- command: `{data['command']}`" if data.get("command") else "- command: not recorded",
            f"- machine: {_machine(data.get('machine'))}"]
    out += [f"- written: {_written(path):%Y-%m-%d %H:%M} UTC", ""]
    out.append(markdown_table(rows) if rows else "(no rows)")
    png = path.with_suffix(".png")
    if png.exists():
        out += ["", f"![{name}](results/{png.name})"]
    notes = data.get("notes") or []
    if isinstance(notes, str):
        notes = [notes]
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out), None


def write_page(runs: list[dict[str, Any]] | None) -> pathlib.Path:
    files = sorted(RESULTS_DIR.glob("*.json")) if RESULTS_DIR.exists() else []
    parts = ["# Results", "",
             "Generated by `python benchmarks/run_all.py` from `docs/results/*.json`; do not edit by hand. Every "
             "number below comes from the command printed above its table, run on the machine named there. "
             "Timings are medians of interleaved runs (see [design.md](design.md#runtime)), so ratios within one "
             "table are comparable; absolute times depend on the machine.", ""]
    if runs:
        parts += ["Last run of the scripts:", "", markdown_table(runs), ""]
    sections, problems = [], []
    for f in files:
        text, problem = section(f)
        if problem:
            problems.append(f"- `{f.name}`: {problem}")
        else:
            sections.append(text)
    if not sections:
        parts.append("No results yet: run `python benchmarks/run_all.py`.")
    parts += ["\n\n".join(sections)]
    if problems:
        parts += ["", "## Files not shown", ""] + problems
    parts += ["", "## Writing a benchmark", "",
              "Put a script in `benchmarks/NAME.py` that writes `docs/results/NAME.json` (and optionally "
              "`docs/results/NAME.png`) in this shape, then run `python benchmarks/run_all.py --only NAME`:", "",
              "```json",
              '{"benchmark": "NAME", "command": "python benchmarks/NAME.py", "machine": {"cpu": "...", "cores": 2},',
              ' "rows": [{"model": "...", "size_MiB": 1.0, "rel_l2": 0.01, "latency_ms": 2.0}],',
              ' "notes": ["how the numbers were measured"]}',
              "```", "",
              "`modelsurgeon.runtime.benchmark.machine_info()` gives the machine record; `modelsurgeon bench --json` "
              "and `modelsurgeon sweep` write this shape already.", ""]
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    tmp = PAGE.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, PAGE)
    return PAGE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="run only this script (name without .py); repeatable")
    ap.add_argument("--skip", action="append", default=[], help="do not run this script; repeatable")
    ap.add_argument("--no-run", action="store_true", help="only regenerate docs/results.md")
    ap.add_argument("--timeout", type=float, help="seconds allowed per script")
    args = ap.parse_args(argv)
    available = scripts()
    names = {p.stem for p in available}
    for n in (args.only or []) + args.skip:
        if n not in names:
            ap.error(f"no benchmark script '{n}'; present: {', '.join(sorted(names)) or 'none'}")
    selected = [p for p in available if (not args.only or p.stem in args.only) and p.stem not in args.skip]
    runs = None if args.no_run else run_scripts(selected, args.timeout)
    page = write_page(runs)
    print(f"wrote {page.relative_to(ROOT)}")
    return 0 if not runs or all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
