"""The pass matrix on the corpus (models/corpus.py): every registered pass on exported models from every exporter.

Each cell must end verified or refused in one line: an internal error or a broken model (one that failed the pass
manager's checks, or that ONNX Runtime cannot load) fails the test wherever it appears. The test also holds each cell
to its line in models/corpus_expected.json (verified -> anything else is a regression) and the recorded matrix to the
contract of `corpus.required_passes` (every quantizer and prune on every model; slice, drop-blocks, share and lowrank
on every pre-norm decoder from every exporter). Improvements are printed; `python benchmarks/corpus.py
--update-expected` rewrites the file (from the whole corpus) once they land.

The slow test runs `corpus.TEST_MODELS`, a subset that covers every architecture and every exporter (the whole corpus
takes about 10 minutes; `MODELSURGEON_CORPUS=all` runs it here). Models from .venv-exporters (Optimum) and the corpus
extra (ONNX Runtime GenAI) are skipped with a note when those are not installed, and fail the test under CI=true.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from modelsurgeon.models import corpus

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "models" / "corpus_expected.json"
BAD = tuple(corpus.BAD)  # "broken", "internal error"


def expected() -> dict[str, str]:
    return json.loads(EXPECTED.read_text())


def status_of(line: str) -> str:
    return line.split(":", 1)[0]


def judge(cell: str, outcome: corpus.Outcome, known: dict[str, str]) -> tuple[str | None, str | None]:
    """(problem, improvement) for one cell's outcome against its expected line (either may be None)."""
    now = outcome.expectation()
    line = known.get(cell)
    if outcome.status in BAD:
        return f"{cell}: {now}", None
    if line is None:
        return None, None
    was = status_of(line)
    if was == "verified" and outcome.status != "verified":
        return f"{cell}: was verified, now {now}", None
    if was in BAD:
        return None, f"{cell}: was {line}, now {now}"
    if was == "refused" and outcome.status == "verified":
        return None, f"{cell}: was {line}, now verified"
    return None, None


def test_expectations_name_corpus_models_and_registered_passes():
    names = {e.name for e in corpus.entries()}
    passes = set(corpus.pass_names())
    lines = expected()
    for key, line in lines.items():
        model, _, name = key.partition("|")
        assert model in names, f"{EXPECTED.name}: {key} is not a corpus model"
        if name:
            assert name in passes, f"{EXPECTED.name}: {key} names no registered pass"
            assert status_of(line) in ("verified", "refused", *BAD), f"{key}: {line}"
        else:
            assert line == "exported" or line.startswith("unavailable: "), f"{key}: {line}"
    missing = [m for m in corpus.TEST_MODELS if m not in lines]
    assert not missing, f"{EXPECTED.name} has no line for {missing}: run benchmarks/corpus.py --update-expected"


def test_the_recorded_matrix_keeps_the_contract():
    """The whole corpus, as last recorded by `benchmarks/corpus.py --update-expected` (the slow test reruns a subset):
    no internal error or broken model anywhere, every model exports, and every cell `corpus.required_passes` names
    verified."""
    lines = expected()
    bad = [f"{k}: {v}" for k, v in lines.items() if status_of(v) in BAD]
    assert not bad, "\n".join(bad)
    unexported = [f"{e.name}: {lines.get(e.name)}" for e in corpus.entries() if lines.get(e.name) != "exported"]
    assert not unexported, unexported
    missing = [f"{e.name}|{p}: {lines.get(f'{e.name}|{p}', 'no line')}" for e in corpus.entries()
               for p in sorted(corpus.required_passes(e)) if lines.get(f"{e.name}|{p}") != "verified"]
    assert not missing, f"{len(missing)} required cells do not verify:\n" + "\n".join(missing)


def test_required_passes_follow_the_architecture():
    assert corpus.required_passes(corpus.entry("llama/optimum-past")) >= {"slice", "share", "drop-blocks", "lowrank",
                                                                          "quant4", "prune"}
    assert not {"slice", "share"} & corpus.required_passes(corpus.entry("llama/genai-int4"))
    assert not {"slice", "drop-blocks"} & corpus.required_passes(corpus.entry("bert/optimum"))
    assert corpus.required_passes(corpus.entry("light-squeezenet/onnx zoo")) == {*corpus.QUANTIZERS, "prune"}


def test_test_subset_covers_every_architecture_and_exporter():
    chosen = [corpus.entry(name) for name in corpus.TEST_MODELS]
    assert {e.arch for e in chosen} >= set(corpus.ARCHS) | {"helper"}
    assert {e.exporter for e in chosen} >= set(corpus.EXPORTERS)
    assert all(corpus.applies(e.arch, e.exporter) for e in chosen if e.arch in corpus.ARCHS)


def test_helper_graph_has_no_value_info_and_cells_classify(tmp_path):
    import onnx

    path = corpus.build_helper(tmp_path / "helper.onnx")
    assert not onnx.load(path).graph.value_info
    assert corpus.run_cell(path, "cleanup").status == "verified"
    refused = corpus.run_cell(path, "prune(ratio=2)")
    assert refused.status == "refused" and "\n" not in refused.detail
    assert judge("m|p", corpus.Outcome("refused", "x"), {"m|p": "verified"})[0]
    assert judge("m|p", corpus.Outcome("internal error", "x"), {"m|p": "refused: y"})[0]
    assert judge("m|p", corpus.Outcome("internal error", "x"), {})[0]
    assert judge("m|p", corpus.Outcome("verified"), {"m|p": "internal error: y"}) == (None, "m|p: was internal error: y, now verified")
    assert judge("m|p", corpus.Outcome("internal error", "z"), {"m|p": "internal error: y"})[0]  # never tolerated
    assert judge("m|p", corpus.Outcome("broken", "z"), {"m|p": "verified"})[0]


@pytest.mark.slow
def test_pass_matrix_on_the_corpus(capsys):
    known = expected()
    everything = os.environ.get("MODELSURGEON_CORPUS") == "all"
    models = corpus.entries() if everything else [corpus.entry(name) for name in corpus.TEST_MODELS]
    in_ci = os.environ.get("CI") == "true"
    problems, improvements, skipped = [], [], []
    counts: dict[str, int] = {}
    for e in models:
        try:
            path = e.path()
        except corpus.Unavailable as exc:
            line = known.get(e.name, "")
            if line.startswith("unavailable"):
                continue
            if not in_ci and ("bash setup.sh" in str(exc)):  # the venv or the corpus extra is not installed here
                skipped.append(f"{e.name}: {exc}")
                continue
            problems.append(f"{e.name}: {line or 'a new model'}, now unavailable: {exc}")
            continue
        if known.get(e.name, "").startswith("unavailable"):
            improvements.append(f"{e.name}: was {known[e.name]}, now exported")
        for name in corpus.pass_names():
            outcome = corpus.run_cell(path, corpus.pass_spec(name))
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
            problem, better = judge(f"{e.name}|{name}", outcome, known)
            if problem:
                problems.append(problem)
            if better:
                improvements.append(better)
    with capsys.disabled():
        print(f"\ncorpus: {len(models)} models, " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        for line in improvements:
            print(f"corpus improvement: {line[:200]}")
        for line in skipped:
            print(f"corpus skipped: {line}")
    assert not problems, (f"{len(problems)} corpus cells regressed (expectations: {EXPECTED.name}; after a fix, "
                          "`python benchmarks/corpus.py --update-expected`):\n" + "\n".join(problems))


def test_an_exporter_that_cannot_start_is_not_cached_as_failed(tmp_path, monkeypatch):
    """An interpreter that vanished (a venv removed under a running session) says nothing about the exporter: the
    entry is unavailable now and tried again next time, where an exporter's own failure is recorded once."""
    monkeypatch.setenv("MODELSURGEON_CACHE", str(tmp_path))
    entry = corpus.Entry("llama", "optimum")

    def missing_python(out):
        corpus._run_exporter([str(tmp_path / "no-venv" / "python"), "-c", "pass"], out)

    with pytest.raises(corpus.Unavailable, match="could not start"):
        corpus._cached(entry, {"test": 1}, missing_python)
    assert not list((tmp_path / "corpus").glob("*.failed"))

    def failing(out):
        raise RuntimeError("the exporter's own bug")

    with pytest.raises(corpus.Unavailable, match="own bug"):
        corpus._cached(entry, {"test": 2}, failing)
    assert len(list((tmp_path / "corpus").glob("*.failed"))) == 1
