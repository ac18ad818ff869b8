"""benchmarks/pareto.py's front and benchmarks/decode.py's row sets: the rows are valid pipelines and the front keeps
exactly the rows nothing beats."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from modelsurgeon.pipeline import build_pipeline, parse_passes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pareto():
    return _load("pareto")


def test_front_keeps_only_undominated_points(pareto):
    # (bytes, error): b is beaten by a on both, c trades bytes for error, d ties a exactly (neither dominates)
    pts = [(10.0, 1.0), (12.0, 2.0), (8.0, 3.0), (10.0, 1.0), (8.0, 3.5)]
    assert pareto.pareto_front(pts) == [True, False, True, True, False]


def test_fronts_respect_the_direction_of_quality_and_speed(pareto):
    rows = [{"label": "small-good", "size_MiB": 1.0, "cosine": 0.99, "ms": 5.0},
            {"label": "big-worse", "size_MiB": 2.0, "cosine": 0.98, "ms": 1.0},
            {"label": "big-better", "size_MiB": 2.0, "cosine": 0.995, "ms": 6.0}]
    pareto.mark_fronts(rows, "cosine", True, "ms")
    assert [r["front_size_quality"] for r in rows] == [True, False, True]
    # faster than both: on the three-way front although worse in bytes and quality
    assert [r["front_size_quality_speed"] for r in rows] == [True, True, True]
    rows[1]["ms"] = 7.0
    pareto.mark_fronts(rows, "cosine", True, "ms")
    assert [r["front_size_quality_speed"] for r in rows] == [True, False, True]


@pytest.mark.parametrize("set_name", ["decode", "pareto"])
def test_every_benchmark_row_is_a_valid_pipeline(set_name):
    decode = _load("decode")
    for _source, passes, _fuse in decode.ROW_SETS[set_name]:
        assert build_pipeline(parse_passes(passes), cleanup=False), passes


def test_every_minilm_pareto_row_is_a_valid_pipeline(pareto):
    for label, passes in pareto.MINILM_ROWS.items():
        if passes:
            assert build_pipeline(parse_passes(passes), cleanup=False), label
