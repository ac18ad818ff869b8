"""The CLI end to end: compile, inspect, passes, and every bad input as one line with exit code 2."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from modelsurgeon import model_io
from modelsurgeon.runtime import run_model


def run_cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "modelsurgeon", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(code, out, err, expect_code=2):
    assert code == expect_code, (code, out, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("modelsurgeon: error: ")
    assert "Traceback" not in err + out
    return lines[0]


@pytest.fixture
def model_path(tmp_path):
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Identity", ["h"], ["h2"]),
         helper.make_node("Relu", ["h2"], ["y"])], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [onnx.numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W")])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_compile_inspect_passes(model_path, tmp_path):
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    code, stdout, err = run_cli("compile", model_path, "--passes", "cleanup", "-o", out, "--report", report)
    assert code == 0, err
    assert "cleanup" in stdout and "rel L2" in stdout
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(run_model(str(out), {"x": x})["y"], run_model(str(model_path), {"x": x})["y"], atol=1e-6)
    assert "Identity" not in [n.op_type for n in onnx.load(out).graph.node]
    assert json.loads(report.read_text())["passes"][-1]["name"] == "cleanup"

    code, stdout, _ = run_cli("inspect", model_path)
    assert code == 0 and "MatMul x1" in stdout and "parameters: 256" in stdout and "x: FLOAT [batch, 16]" in stdout
    code, stdout, _ = run_cli("inspect", model_path, "--json")
    assert json.loads(stdout)["parameters"] == 256
    code, stdout, _ = run_cli("passes")
    assert code == 0 and "cleanup" in stdout and "fold-constants" in stdout
    names = {p["name"] for p in json.loads(run_cli("passes", "--json")[1])}
    assert {"cleanup", "dce", "dedup"} <= names


def test_pipeline_file_and_no_verify(model_path, tmp_path):
    pipe = tmp_path / "p.json"
    pipe.write_text(json.dumps(["dce", {"name": "remove-identity"}]))
    code, stdout, err = run_cli("compile", model_path, "--pipeline", pipe, "-o", tmp_path / "o.onnx", "--no-verify")
    assert code == 0, err
    assert "not verified" in stdout


def test_external_data_flag(model_path, tmp_path):
    out = tmp_path / "ext.onnx"
    code, _, err = run_cli("compile", model_path, "--passes", "dce", "-o", out, "--external-data", "-q")
    assert code == 0, err
    assert (tmp_path / "ext.onnx.data").exists()
    code, _, err = run_cli("compile", out, "--passes", "dce", "-o", tmp_path / "again.onnx", "-q")
    assert code == 0, err


def _corrupt(tmp_path, model_path):
    data = model_path.read_bytes()
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(data[: len(data) // 2] + b"\xff\xfe" * 50)
    return bad


def _missing_data(tmp_path, model_path):
    path = tmp_path / "ext" / "m.onnx"
    path.parent.mkdir()
    ir.save(model_io.load(model_path), path, external_data="m.onnx.data", size_threshold_bytes=0)
    os.remove(str(path) + ".data")
    return path


def _unknown_domain(tmp_path, model_path):
    m = onnx.load(model_path)
    m.graph.node.append(helper.make_node("Warp", ["y"], ["z"], domain="com.example.secret"))
    m.opset_import.append(helper.make_opsetid("com.example.secret", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(m, path)
    return path


@pytest.mark.parametrize("case,expect", [
    ("corrupt", "not a valid ONNX model"),
    ("text", "not a valid ONNX model"),
    ("missing", "no such file"),
    ("missing_external", "external data file 'm.onnx.data'"),
    ("unknown_domain", "unknown domain 'com.example.secret'"),
    ("folder_output", "is a folder"),
    ("no_parent", "does not exist"),
    ("parent_is_file", "not a folder"),
    ("overwrite_input", "is the input model"),
    ("bad_passes", "unclosed '('"),
    ("unknown_pass", "unknown pass 'shrink'"),
    ("unknown_option", "unknown option 'blok'"),
    ("no_passes", "--passes"),
    ("bad_calib", "calibration data not found"),
    ("bad_flag", "unrecognized arguments"),
])
def test_bad_input_is_one_line_exit_2_input_untouched(case, expect, model_path, tmp_path):
    out = tmp_path / "out.onnx"
    src = model_path
    args = ["--passes", "cleanup"]
    if case == "corrupt":
        src = _corrupt(tmp_path, model_path)
    elif case == "text":
        src = tmp_path / "notes.onnx"
        src.write_text("this is not a model\n")
    elif case == "missing":
        src = tmp_path / "nope.onnx"
    elif case == "missing_external":
        src = _missing_data(tmp_path, model_path)
    elif case == "unknown_domain":
        src = _unknown_domain(tmp_path, model_path)
    elif case == "folder_output":
        out = tmp_path
    elif case == "no_parent":
        out = tmp_path / "no" / "such" / "out.onnx"
    elif case == "parent_is_file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out.onnx"
    elif case == "overwrite_input":
        out = model_path
    elif case == "bad_passes":
        args = ["--passes", "cleanup(fold=true"]
    elif case == "unknown_pass":
        args = ["--passes", "shrink"]
    elif case == "unknown_option":
        args = ["--passes", "cleanup(blok=3)"]
    elif case == "no_passes":
        args = []
    elif case == "bad_calib":
        args += ["--calib", tmp_path / "nothing.npz"]
    elif case == "bad_flag":
        args += ["--frobnicate"]
    before = digest(src) if src.exists() else None
    listing = sorted(os.listdir(tmp_path))
    line = one_line_error(*run_cli("compile", src, "-o", out, *args))
    assert expect in line, line
    if before is not None:
        assert digest(src) == before
    if case not in ("overwrite_input", "folder_output"):
        assert not out.exists() or out.is_dir()
    assert sorted(os.listdir(tmp_path)) == listing  # no half-written or temporary files


def test_inspect_bad_input(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_bytes(b"\x00\x01garbage")
    assert "not a valid ONNX model" in one_line_error(*run_cli("inspect", p))


def test_debug_shows_traceback(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_text("nope")
    code, _, err = run_cli("inspect", p, "--debug")
    assert code != 0 and "Traceback" in err


def test_verification_failure_names_the_pass(model_path, tmp_path):
    # (--max-error must be positive: a 4-bit pass exceeds a tiny bound)
    code, out, err = run_cli("compile", model_path, "--passes", "quant4", "-o", tmp_path / "o.onnx", "--max-error", "1e-6")
    line = one_line_error(code, out, err, expect_code=1)
    assert "pass 'quant4'" in line and "--max-error" in line
    assert not (tmp_path / "o.onnx").exists()
