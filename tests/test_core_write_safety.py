"""The output never touches the input, and saved models are self-contained.

Every refused target exits 2 with one line, before any work, and leaves the input model and its data file
byte for byte as they were; a saved model references only the data file written with it.
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import modelsurgeon
from modelsurgeon.errors import UserError


def _run_cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "modelsurgeon", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    return proc.returncode, proc.stderr


def _digests(folder: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _external_model(folder: pathlib.Path, name: str = "m.onnx", data: str | None = None, n: int = 128) -> pathlib.Path:
    """Two MatMuls whose weights live in an external data file (`data`, default `<name>.data`)."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32) / 8, f"w{i}") for i in range(2)]
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y"])],
                          "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    path = folder / name
    onnx.save(model, path, save_as_external_data=True, location=data or name + ".data", size_threshold=0)
    return path


def _run(path: pathlib.Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


CASES = {
    # name: (arguments after the input, expected words)
    "output is the input's data file": (["-o", "m.onnx.data"], "is the input's data file m.onnx.data"),
    "output through ..": (["-o", "../in/m.onnx"], "is the input model"),
    "output is a symlink to the data file": (["-o", "link.onnx"], "is the input's data file"),
    "output is a hard link to the data file": (["-o", "hard.onnx"], "is the input's data file"),
    "output's data file is the input's": (["-o", "out.onnx", "--external-data"], "output's data file path is the input's data file"),
    "report is the input's data file": (["-o", "../elsewhere.onnx", "--report", "m.onnx.data"], "report path is the input's data file"),
    "report is the output": (["-o", "../o.onnx", "--report", "../o.onnx"], "are the same file"),
    "output is /dev/null": (["-o", "/dev/null"], "not a regular file"),
    "output is /dev/full": (["-o", "/dev/full"], "not a regular file"),
    "output is a pipe": (["-o", "fifo"], "not a regular file"),
    "output folder takes no files": (["-o", "/proc/x.onnx"], "cannot write in folder /proc"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_that_would_touch_the_input_is_refused(tmp_path, case):
    args, expect = CASES[case]
    folder = tmp_path / "in"
    folder.mkdir()
    # the input's data file is named out.onnx.data: `-o out.onnx --external-data` would write over it
    data = "out.onnx.data" if case == "output's data file is the input's" else None
    src = _external_model(folder, data=data)
    if "symlink" in case:
        os.symlink(folder / "m.onnx.data", folder / "link.onnx")
    elif "hard link" in case:
        os.link(folder / "m.onnx.data", folder / "hard.onnx")
    elif "pipe" in case:
        os.mkfifo(folder / "fifo")
    before = _digests(folder)
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    code, err = _run_cli("compile", "m.onnx", "--passes", "cleanup", *args, cwd=folder)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("modelsurgeon: error: "), err
    assert expect in lines[0], lines[0]
    assert _digests(folder) == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing
    assert pathlib.Path("/dev/null").is_char_device() and pathlib.Path("/dev/full").is_char_device()


def test_output_keeps_no_reference_to_the_input_data_and_runs_after_moving(tmp_path):
    """A model whose tensors are still read from the input's file (as models over 1.5 GB are) is saved with
    those tensors copied into the output's own data file: moved elsewhere, it still runs."""
    folder = tmp_path / "in"
    folder.mkdir()
    src = _external_model(folder)
    model = ir.load(src)  # keeps the weights as references into m.onnx.data
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    result = modelsurgeon.compile(model, "cleanup", progress=False)
    (tmp_path / "out").mkdir()
    out = result.save(tmp_path / "out" / "model.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    locations = {e.value for t in onnx.load(out, load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    moved = tmp_path / "moved"
    shutil.move(str(out.parent), str(moved))
    shutil.move(str(folder), str(tmp_path / "gone"))  # the input's data is no longer where it was
    x = np.random.default_rng(2).standard_normal((3, 128)).astype(np.float32)
    np.testing.assert_allclose(_run(moved / "model.onnx", x), _run(tmp_path / "gone" / "m.onnx", x), rtol=1e-5, atol=1e-6)


def test_api_save_refuses_the_data_file_the_model_reads(tmp_path):
    src = _external_model(tmp_path)
    before = _digests(tmp_path)
    result = modelsurgeon.compile(ir.load(src), "cleanup", progress=False)
    with pytest.raises(UserError, match="is the input's data file m.onnx.data"):
        result.save(tmp_path / "m.onnx.data")
    assert _digests(tmp_path) == before


def test_sessions_read_external_weights_in_place(tmp_path, monkeypatch):
    """Verification and activation capture of a model whose weights stay in the input's file write nothing."""
    import tempfile

    src = _external_model(tmp_path)
    model = ir.load(src)

    def no_writes(*args, **kwargs):
        raise AssertionError("a session wrote a copy of the model")

    for module, name in ((tempfile, "mkdtemp"), (tempfile, "mkstemp"), (ir, "save")):
        monkeypatch.setattr(module, name, no_writes)  # what the old sessions did: a copy in a temporary folder
    from modelsurgeon.capture import ActivationCapture
    from modelsurgeon.runtime.session import make_session
    from modelsurgeon.verify import structural_problems

    x = np.ones((2, 128), np.float32)
    expected_y = _run(src, x)  # stock ONNX Runtime reading the file itself
    np.testing.assert_allclose(make_session(model).run(None, {"x": x})[0], expected_y, rtol=1e-5)
    assert ActivationCapture(model, ["h"]).run({"x": x})["h"].shape == (2, 128)
    assert structural_problems(model) == []
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
