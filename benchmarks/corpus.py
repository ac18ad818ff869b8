"""corpus benchmark: every registered pass on every corpus model (models/corpus.py), as a matrix.

    python benchmarks/corpus.py                          # the whole corpus; about 10 minutes from a warm cache
    python benchmarks/corpus.py --models llama,helper    # only models whose name starts with one of these
    python benchmarks/corpus.py --update-expected        # also rewrite models/corpus_expected.json from this run

Each cell is one `modelsurgeon.compile(model, pass)` with default options (drop-blocks n=1, prune ratio=0.25) and
calibration synthesized by the compile's defaults, whose output is saved and loaded again in ONNX Runtime. It ends
verified (the pass manager's checks passed: ONNX checker, strict shape inference, an ORT run against the input,
exact passes within 1e-4), refused (a one-line `UserError`), broken (a `VerificationError`: the pass wrote a model
that failed those checks) or internal error (any other exception: a bug).

Writes docs/results/corpus.json (results convention of benchmarks/run_all.py: one row per model, one column per
pass; every cell's detail under "cells") and the matrix of docs/corpus.md (between its BEGIN/END MATRIX markers).
With --update-expected it also writes models/corpus_expected.json, which tests/test_corpus.py holds the code to.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "corpus.md"
RESULTS = ROOT / "docs" / "results" / "corpus.json"
EXPECTED = ROOT / "models" / "corpus_expected.json"
BEGIN, END = "<!-- BEGIN MATRIX (benchmarks/corpus.py) -->", "<!-- END MATRIX -->"
SHORT = {"verified": "ok", "refused": "refused", "broken": "broken", "internal error": "error"}
PREFIX = {"refused": "R", "broken": "B", "internal error": "E", "unavailable": "U"}


def _select(models: list, prefixes: str | None) -> list:
    if not prefixes:
        return models
    wanted = [p.strip() for p in prefixes.split(",") if p.strip()]
    return [m for m in models if any(m.name.startswith(p) for p in wanted)]


def run(models: list, passes: list[str]) -> dict:
    from modelsurgeon.models import corpus

    done = [0]
    total = len(models)

    def progress(model, name, outcome):
        if name is None or name == passes[0]:
            done[0] += 1
            print(f"[{done[0]}/{total}] {model}" + (": unavailable" if name is None else ""), flush=True)
        if outcome is not None and outcome.status != "verified":
            print(f"    {name}: {outcome.expectation()}", flush=True)

    return corpus.matrix(models, passes, progress=progress)


def generic(detail: str) -> str:
    """A cell's line without what varies between models and passes that fail alike: node names, the pass's name."""
    from modelsurgeon.models import corpus

    names = "|".join(re.escape(p) for p in sorted(corpus.pass_names(), key=len, reverse=True))
    text = re.sub(r"Name:'[^']*'", "Name:'…'", detail)
    text = re.sub(r"\bnode_[A-Za-z]+_\d+\b", "node_…", text)
    text = re.sub(rf"^pass '(?:{names})' broke", "pass '…' broke", text)
    text = re.sub(rf"^(?:{names}) runs (?:{names}) first, which refused: ", "", text)
    text = re.sub(rf"^(?:{names}): ", "", text)
    text = re.sub(rf"^(?:{names}) needs a transformer, and no", "needs a transformer, and no", text)
    return text


def footnotes(table: dict) -> dict[tuple[str, str], str]:
    """(status, detail) -> label such as R3, numbered by first appearance; details alike (`generic`) share one."""
    labels: dict[tuple[str, str], str] = {}
    by_generic: dict[tuple[str, str], str] = {}
    counters: collections.Counter = collections.Counter()
    for row in table.values():
        cells = list(row["cells"].values())
        items = [(o.status, o.detail) for o in cells if o.status != "verified"]
        if row["export"] != "ok":
            items.append(("unavailable", row["export"][len("unavailable: "):]))
        for item in items:
            if item in labels:
                continue
            key = (item[0], generic(item[1]))
            if key not in by_generic:
                counters[item[0]] += 1
                by_generic[key] = f"{PREFIX[item[0]]}{counters[item[0]]}"
            labels[item] = by_generic[key]
    return labels


def cell_text(outcome, labels) -> str:
    if outcome.status == "verified":
        if outcome.modified is False:
            return "ok, no change"
        return "ok" if outcome.rel_l2 is None else f"ok {outcome.rel_l2:.1e}"
    return f"{SHORT[outcome.status]} {labels[(outcome.status, outcome.detail)]}"


def markdown(table: dict, passes: list[str], seconds: float) -> str:
    labels = footnotes(table)
    counts = collections.Counter(o.status for row in table.values() for o in row["cells"].values())
    unavailable = [name for name, row in table.items() if row["export"] != "ok"]
    lines = [BEGIN, "",
             f"{len(table)} models ({len(unavailable)} unavailable) x {len(passes)} passes: "
             + ", ".join(f"{counts[s]} {s}" for s in ("verified", "refused", "broken", "internal error")) +
             f" ({seconds / 60:.1f} minutes). A verified cell shows the worst output's relative L2 error against the "
             "input model (\"no change\": the pass found nothing to rewrite); the others name their line below.", "",
             "| model | " + " | ".join(passes) + " |", "|---|" + "---|" * len(passes)]
    for name, row in table.items():
        if row["export"] != "ok":
            label = labels[("unavailable", row["export"][len("unavailable: "):])]
            lines.append(f"| {name} | unavailable {label} |" + " |" * (len(passes) - 1))
            continue
        lines.append(f"| {name} | " + " | ".join(cell_text(row["cells"][p], labels) if p in row["cells"] else ""
                                                  for p in passes) + " |")
    lines.append("")
    names = {"R": "Refusals", "B": "Broken (the pass wrote a model that failed verification)",
             "E": "Internal errors", "U": "Unavailable models"}
    where: dict[str, list[str]] = collections.defaultdict(list)
    for model, row in table.items():
        for p, o in row["cells"].items():
            if o.status != "verified":
                where[labels[(o.status, o.detail)]].append((model, p))
        if row["export"] != "ok":
            where[labels[("unavailable", row["export"][len("unavailable: "):])]].append((model, ""))
    for prefix, title in names.items():
        items: dict[str, str] = {}
        for (status, detail), label in labels.items():
            if label.startswith(prefix) and label not in items:
                items[label] = generic(detail)
        if not items:
            continue
        lines += [f"{title}:", ""]
        for label, detail in items.items():
            hits = where[label]
            exporters = sorted({m.split("/", 1)[1] for m, _ in hits})
            hit = {p for _, p in hits}
            if prefix == "U":
                scope = ", ".join(m for m, _ in hits)
            else:
                scope = (f"{len(hits)} cells; exporters: {', '.join(exporters)}; passes: "
                         + ("all" if hit >= set(passes) else ", ".join(p for p in passes if p in hit)))
            lines.append(f"- **{label}** ({scope}): `{detail.replace('`', chr(39))}`")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_page(text: str) -> None:
    page = PAGE.read_text() if PAGE.exists() else f"# Corpus\n\n{BEGIN}\n{END}\n"
    if BEGIN not in page or END not in page:
        page = page.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = page.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    PAGE.write_text(head + text + tail)


def expectations(table: dict) -> dict[str, str]:
    """The expectations file's content: "model" -> "exported" | "unavailable: ...", "model|pass" -> outcome line."""
    out: dict[str, str] = {}
    for name, row in table.items():
        out[name] = "exported" if row["export"] == "ok" else row["export"]
        for p, o in row["cells"].items():
            out[f"{name}|{p}"] = o.expectation()
    return out


def load_table(path: pathlib.Path) -> tuple[dict, list[str], float]:
    """The table, passes and seconds of a docs/results/corpus.json written earlier (for --from-json)."""
    from modelsurgeon.models import corpus

    data = json.loads(path.read_text())
    table: dict = {name: {"export": e["export"], "seconds": e["seconds"], "cells": {}}
                   for name, e in data["exports"].items()}
    passes: list[str] = []
    for key, c in data["cells"].items():
        name, p = key.split("|", 1)
        table[name]["cells"][p] = corpus.Outcome(c["status"], c["detail"], c["rel_l2"], c["max_abs"], c["seconds"],
                                                 c.get("modified"))
        if p not in passes:
            passes.append(p)
    return table, passes, float(data.get("seconds", 0.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated name prefixes (llama/, bert, light-)")
    parser.add_argument("--passes", help="comma-separated pass names (default: every registered pass)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--update-expected", action="store_true",
                        help=f"rewrite {EXPECTED.relative_to(ROOT)} (after --models/--passes, merged: cells not run keep their line)")
    parser.add_argument("--no-page", action="store_true", help="do not rewrite docs/corpus.md")
    parser.add_argument("--from-json", metavar="JSON",
                        help="run nothing: rewrite the page (and with --update-expected the expectations) from this file")
    args = parser.parse_args()

    from modelsurgeon.models import corpus
    from modelsurgeon.runtime.benchmark import machine_info

    if args.from_json:
        table, passes, seconds = load_table(pathlib.Path(args.from_json))
        if not args.no_page:
            write_page(markdown(table, passes, seconds))
        if args.update_expected:
            update_expected(table, merge=False)
        return 0
    models = _select(corpus.entries(), args.models)
    passes = args.passes.split(",") if args.passes else corpus.pass_names()
    start = time.perf_counter()
    table = run(models, passes)
    seconds = time.perf_counter() - start

    rows = []
    labels = footnotes(table)
    for name, row in table.items():
        out = {"model": name, "export": row["export"] if row["export"] == "ok" else "unavailable"}
        for p in passes:
            if p in row["cells"]:
                out[p] = cell_text(row["cells"][p], labels)
        rows.append(out)
    counts = collections.Counter(o.status for row in table.values() for o in row["cells"].values())
    result = {"benchmark": "corpus", "command": "python benchmarks/corpus.py", "machine": machine_info(),
              "seconds": round(seconds, 1), "rows": rows,
              "notes": [f"{len(table)} models x {len(passes)} passes in {seconds:.0f}s: "
                        + ", ".join(f"{counts[s]} {s}" for s in ("verified", "refused", "broken", "internal error")),
                        "cells: ok REL_L2 (verified; worst output's relative L2 error), refused/broken/error LABEL: "
                        "the lines are in docs/corpus.md and under 'cells' in this file"],
              "versions": {**corpus.main_versions(), **_venv_versions(corpus)},
              "cells": {f"{name}|{p}": {"status": o.status, "detail": o.detail, "rel_l2": o.rel_l2,
                                        "max_abs": o.max_abs, "modified": o.modified, "seconds": round(o.seconds, 3)}
                        for name, row in table.items() for p, o in row["cells"].items()},
              "exports": {name: {"export": row["export"], "seconds": round(row["seconds"], 2)}
                          for name, row in table.items()}}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if not args.no_page:
        write_page(markdown(table, passes, seconds))
    if args.update_expected:
        update_expected(table, merge=bool(args.models or args.passes))
    print(result["notes"][0])
    return 0


def update_expected(table: dict, merge: bool) -> None:
    """Write this run's lines into models/corpus_expected.json; with `merge` (a partial run) the cells not run keep
    theirs, else the file is replaced."""
    merged = json.loads(EXPECTED.read_text()) if merge and EXPECTED.exists() else {}
    merged.update(expectations(table))
    EXPECTED.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")


def _venv_versions(corpus) -> dict:
    try:
        return {f"venv {k}": v for k, v in corpus.venv_versions().items()}
    except corpus.Unavailable:
        return {}


if __name__ == "__main__":
    sys.exit(main())
