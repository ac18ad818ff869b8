"""Bad input through the CLI (issue 17, item 4): one line `modelsurgeon: error: ...`, exit code 2, nothing written.

What was tried, and what each now gives (the fixes are in compiler/calibration.py, compiler/manager.py,
compiler/argtypes.py and the passes' statistics code):

- calibration data with NaN/Inf (an .npz, one file of a folder, float64 beyond float32): refused when loaded,
  naming the input and the file (`calibration.check_against`), for every command that loads data;
- a model that produces NaN/Inf on its calibration data: with verification, refused before any pass (the
  reference outputs are not finite); with --no-verify, refused by the statistics of the pass that meets it
  (`calibration.require_finite`: quant4, spquant, quant8, lowrank, eora, share, prune, drop-blocks, slice);
- a graph input (or output) declared without any shape: compile refuses (ONNX requires one, and the checker run
  after every pass would otherwise blame the pass); bench/eval, which need no checker, take real inputs
  (--calib / --data) and refuse to make some up;
- --max-error <= 0, NaN or inf, and the other numeric options of compile/inspect/bench/eval/sweep out of range:
  refused while parsing (compiler/argtypes.py);
- an op ONNX Runtime cannot run, see `test_op_onnx_runtime_lacks`;
- calibration arrays with other names, text or complex values, fractions for token ids, integers out of the
  input type's range, no samples, a single value for a batched input, an empty .npz, a truncated .npz, a folder
  without .npz files; a model path that is a folder or an empty file (compile, inspect, bench, eval, sweep);
  malformed pipeline files (tested in test_core_pipeline/test_core_cli).

Also found and fixed on the way (were internal errors): quant8 and lowrank on models whose intermediate values
carry no type (value_info), lowrank naming an unnamed node after renaming its output, and scalar model inputs
(now given whole to every batch); sweep created its output folder before checking the model and the data.
"""

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modelsurgeon.errors import UserError


def run_cli(*args):
    """A real process: what a user sees, Python's own traceback printing included."""
    proc = subprocess.run([sys.executable, "-m", "modelsurgeon", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(code, out, err, expect_code=2):
    assert code == expect_code, (code, out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("modelsurgeon: error: "), lines[0]
    assert "Traceback" not in err + out and "internal error" not in err
    return lines[0]


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refused(run, tmp_path, *args, expect=(), expect_code=2):
    """Run; assert one error line holding every string of `expect`, and that no file appeared under tmp_path."""
    before = listing(tmp_path)
    line = one_line_error(*run(*args), expect_code=expect_code)
    for fragment in (expect,) if isinstance(expect, str) else expect:
        assert fragment in line, line
    assert listing(tmp_path) == before, "a file was written"
    return line


# ---------------------------------------------------------------------------------------------------- models

RNG = np.random.default_rng(0)


def _init(name, *shape, dtype=np.float32):
    return onnx.numpy_helper.from_array(RNG.standard_normal(shape).astype(dtype), name)


def save_model(path, nodes, inputs, outputs, inits, opset=18, extra_opsets=()):
    graph = helper.make_graph(nodes, "m", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return path


def mlp(path, middle="Relu", in_shape=("batch", 64), out_shape=("batch", 64), middle_domain=""):
    """x [batch, 64] -> MatMul -> `middle` -> MatMul -> Relu -> MatMul (the output head) -> y; intermediate values
    carry no type (no value_info)."""
    return save_model(
        path,
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node(middle, ["h"], ["m"], domain=middle_domain),
         helper.make_node("MatMul", ["m", "W2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r"]),
         helper.make_node("MatMul", ["r", "W3"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None if in_shape is None else list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None if out_shape is None else list(out_shape))],
        [_init("W1", 64, 64), _init("W2", 64, 64), _init("W3", 64, 64)],
        extra_opsets=[(middle_domain, 1)] if middle_domain else ())


def double_gelu(path):
    """A Gelu on doubles: valid ONNX, but ONNX Runtime has no kernel for it (its Erf lacks a double kernel)."""
    return save_model(
        path,
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Cast", ["h"], ["hd"], to=TensorProto.DOUBLE),
         helper.make_node("Gelu", ["hd"], ["gd"]), helper.make_node("Cast", ["gd"], ["g"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["g", "W2"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [_init("W1", 64, 64), _init("W2", 64, 64)], opset=20)


def token_model(path):
    """ids [batch, seq] int64 -> Gather of a 100-row table -> MatMul."""
    return save_model(
        path, [helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("MatMul", ["e", "W"], ["y"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 64])],
        [_init("E", 100, 64), _init("W", 64, 64)])


@pytest.fixture
def model(tmp_path):
    return mlp(tmp_path / "model.onnx")


def x_samples(n=8):
    return np.random.default_rng(1).standard_normal((n, 64)).astype(np.float32)


# ------------------------------------------------------------------------------------ 1. NaN and Inf data

@pytest.mark.parametrize("passes,case", [("quant8", "nan"), ("quant4(algo=gptq)", "inf"),
                                         ("quant4(algo=gptq)", "folder"), ("quant8", "float64")])
def test_non_finite_calibration_is_refused_naming_input_and_file(cli, model, tmp_path, passes, case):
    """Before: quant8 'internal error: ValueError: supplied range of [-inf, inf] is not finite', quant4(algo=gptq)
    'internal error: ValueError: array must not contain infs or NaNs' (scipy's Cholesky)."""
    x = x_samples()
    if case == "folder":  # the second file of a folder holds the NaN: that file is named
        calib = tmp_path / "calib"
        calib.mkdir()
        np.savez(calib / "a.npz", x=x)
        x[3, 5] = np.nan
        np.savez(calib / "b.npz", x=x)
        named, what = "b.npz", "NaN or infinite"
    else:
        calib = tmp_path / f"{case}.npz"
        if case == "float64":  # finite in the file, but beyond float32, the model's type
            x = x.astype(np.float64) * 1e300
        else:
            x[2, 7] = np.nan if case == "nan" else np.inf
        np.savez(calib, x=x)
        named, what = f"{case}.npz", ("too large for float32" if case == "float64" else "NaN or infinite")
    refused(cli, tmp_path, "compile", model, "-o", tmp_path / "out.onnx", "--passes", passes, "--calib", calib,
            expect=["calibration input 'x'", named, what])


def test_non_finite_calibration_as_a_process(model, tmp_path):
    x = x_samples()
    x[0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    refused(run_cli, tmp_path, "compile", model, "-o", tmp_path / "out.onnx", "--passes", "quant4(algo=gptq)",
            "--calib", tmp_path / "nan.npz", expect=["'x'", "nan.npz"])


@pytest.mark.parametrize("passes", ["quant4(algo=gptq)", "quant8", "lowrank(rank=8)"])
def test_model_producing_nan_is_refused_by_the_statistics(cli, tmp_path, passes):
    """The data is finite but the model is not (Log of negative values): with --no-verify nothing checks the
    outputs first, so the pass's statistics say so. Before: quant4(algo=gptq) and lowrank 'internal error:
    ValueError: array must not contain infs or NaNs', quant8 'supplied range of [-inf, inf] is not finite';
    quant4(algo=awq), eora and prune(importance=activation) wrote a model computed from NaN statistics."""
    model = mlp(tmp_path / "log.onnx", middle="Log")
    np.savez(tmp_path / "x.npz", x=x_samples())
    name = passes.split("(")[0]
    refused(cli, tmp_path, "compile", model, "-o", tmp_path / "out.onnx", "--passes", passes, "--calib",
            tmp_path / "x.npz", "--no-verify", expect=[f"error: {name}: activation 'm'", "NaN or infinite"])


def test_model_producing_nan_is_refused_before_verifying(cli, tmp_path):
    """Before: 'pass 'cleanup' broke the model: outputs contain NaN or Inf' (exit 1), blaming the pass."""
    model = mlp(tmp_path / "log.onnx", middle="Log")
    refused(cli, tmp_path, "compile", model, "-o", tmp_path / "out.onnx", "--passes", "cleanup",
            expect=["input model outputs NaN or Inf in 'y'", "--calib"])


# --------------------------------------------------------------------------------- 2. inputs without shapes

@pytest.mark.parametrize("which,calib", [("input", False), ("input", True), ("output", False)])
def test_compile_refuses_interface_without_shape(cli, tmp_path, which, calib):
    """ONNX requires graph inputs and outputs to declare a shape (the checker run after every pass says so), so
    real calibration data cannot rescue the compile: the model must be re-exported. Before: 'internal error:
    IndexError: too many indices for array' without --calib, 'pass 'cleanup' broke the model: ONNX checker:
    Field 'shape' of 'type' is required but missing' (exit 1) with it."""
    model = mlp(tmp_path / "noshape.onnx", **({"in_shape": None} if which == "input" else {"out_shape": None}))
    args = []
    if calib:
        np.savez(tmp_path / "x.npz", x=x_samples())
        args = ["--calib", tmp_path / "x.npz"]
    name = "x" if which == "input" else "y"
    refused(cli, tmp_path, "compile", model, "-o", tmp_path / "out.onnx", "--passes", "cleanup", *args,
            expect=[f"{which} '{name}' is declared without a shape", "re-export"])


def test_bench_and_eval_need_real_inputs_for_an_input_without_shape(cli, tmp_path):
    """bench and eval run no checker: they work on real inputs, and refuse to make some up. Before: bench
    'ONNX Runtime cannot run it on inputs {'x': ()}', eval 'internal error: TypeError: len() of unsized object'."""
    model = mlp(tmp_path / "noshape.onnx", in_shape=None)
    refused(cli, tmp_path, "bench", model, expect=["input 'x' is declared without a shape", "--calib"])
    refused(cli, tmp_path, "eval", model, "--reference", model, expect=["input 'x' is declared without a shape", "--data"])
    np.savez(tmp_path / "x.npz", x=x_samples())
    code, _, err = cli("bench", model, "--calib", tmp_path / "x.npz", "--rounds", "1", "--warmup", "0", "--number", "1", "-q")
    assert code == 0, err


def test_input_without_shape_as_a_process(tmp_path):
    model = mlp(tmp_path / "noshape.onnx", in_shape=None)
    refused(run_cli, tmp_path, "compile", model, "-o", tmp_path / "out.onnx", "--passes", "quant8",
            expect="input 'x' is declared without a shape")


# ------------------------------------------------------------------------------------ 3. numeric options

@pytest.mark.parametrize("args,expect", [
    (["compile", "{m}", "-o", "{o}", "--passes", "cleanup", "--max-error", "-1"], "--max-error: must be a positive number, not -1"),
    (["compile", "{m}", "-o", "{o}", "--passes", "cleanup", "--max-error", "0"], "--max-error: must be a positive number"),
    (["compile", "{m}", "-o", "{o}", "--passes", "cleanup", "--max-error", "nan"], "--max-error: must be a positive number"),
    (["compile", "{m}", "-o", "{o}", "--passes", "cleanup", "--max-error", "inf"], "--max-error: must be a positive number"),
    (["compile", "{m}", "-o", "{o}", "--passes", "cleanup", "--max-error", "lots"], "--max-error: 'lots' is not a number"),
    (["compile", "{m}", "-o", "{o}", "--passes", "cleanup", "--num-samples", "0"], "--num-samples: must be at least 1"),
    (["compile", "{m}", "-o", "{o}", "--passes", "cleanup", "--seq-len", "2.5"], "--seq-len: '2.5' is not an integer"),
    (["inspect", "{m}", "--top", "-1"], "--top: must be 0 or more"),
    (["bench", "{m}", "--rounds", "0"], "--rounds: must be at least 1"),
    (["bench", "{m}", "--warmup", "-1"], "--warmup: must be 0 or more"),
    (["bench", "{m}", "--threads", "-2"], "--threads: must be at least 1"),
    (["eval", "{m}", "--reference", "{m}", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["eval", "{m}", "--reference", "{m}", "--threads", "0"], "--threads: must be at least 1"),
    (["sweep", "{m}", "--grid", "quant4(block=32|64)", "-o", "{d}", "--rounds", "0"], "--rounds: must be at least 1"),
    (["sweep", "{m}", "--grid", "quant4(block=32|64)", "-o", "{d}", "--max-runs", "0"], "--max-runs: must be at least 1"),
    (["sweep", "{m}", "--grid", "quant4(block=32|64)", "-o", "{d}", "--eval-samples", "-5"], "--eval-samples: must be at least 1"),
])
def test_numeric_options_out_of_range(cli, model, tmp_path, args, expect):
    """Before: --max-error -1 failed the first pass's verification (exit 1), 0/NaN/inf were accepted (NaN and inf
    silently disable the bound); inspect --top -1 listed all weights but one; eval --threads 0 was accepted while
    bench refused it; sweep --rounds 0 was refused only after compiling and evaluating every pipeline."""
    args = [a.format(m=model, o=tmp_path / "out.onnx", d=tmp_path / "sweep") for a in args]
    refused(cli, tmp_path, *args, expect=expect)


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
def test_max_error_checked_in_the_api_too(model, bad):
    from modelsurgeon.manager import compile as compile_model

    with pytest.raises(UserError, match="--max-error must be a positive number"):
        compile_model(str(model), "cleanup", max_error=bad)


# ---------------------------------------------------------------------------- 4. ops ONNX Runtime lacks

@pytest.mark.parametrize("kind,op", [("unknown_contrib_op", "com.microsoft:FrobnicateGelu"), ("double_gelu", "Erf(13)")])
def test_op_onnx_runtime_lacks(cli, tmp_path, kind, op):
    """A model ONNX Runtime cannot load (an op name com.microsoft does not have; an op without a kernel for its
    type). What a user would expect:

    - with verification (the default): refused before any pass, naming the op (unchanged);
    - with --no-verify and passes that calibrate (quant8, quant4(algo=gptq), ...): they must run the model, so
      refused before any pass, naming the pass and the op. Before: quant8 'internal error: Fail:
      [ONNXRuntimeError] ...' from the activation capture;
    - with --no-verify and passes that never run the model (cleanup, quant4 round-to-nearest, ...): the compile is
      structural and finishes; a warning says ONNX Runtime cannot run the model, so the report has no MACs.
      Before: it finished too, silently, with MACs '?'.
    """
    path = tmp_path / f"{kind}.onnx"
    if kind == "unknown_contrib_op":
        mlp(path, middle="FrobnicateGelu", middle_domain="com.microsoft")
    else:
        double_gelu(path)
    out = tmp_path / "out.onnx"
    refused(cli, tmp_path, "compile", path, "-o", out, "--passes", "cleanup",
            expect=["the input model does not run in ONNX Runtime", op])
    refused(cli, tmp_path, "compile", path, "-o", out, "--passes", "quant8", "--no-verify", "-q",
            expect=["quant8 runs the model in ONNX Runtime", op])

    code, stdout, err = cli("compile", path, "-o", out, "--passes", "cleanup", "--no-verify")
    assert code == 0, err
    assert out.is_file() and "outputs not verified" in stdout
    warning = [line for line in err.splitlines() if line.strip()]
    assert len(warning) == 1 and "WARNING: ONNX Runtime cannot run the input model" in warning[0] and op in warning[0]


def test_op_onnx_runtime_lacks_as_a_process(tmp_path):
    path = mlp(tmp_path / "contrib.onnx", middle="FrobnicateGelu", middle_domain="com.microsoft")
    refused(run_cli, tmp_path, "compile", path, "-o", tmp_path / "out.onnx", "--passes", "quant4(algo=gptq)",
            "--no-verify", "-q", expect=["quant4 runs the model", "FrobnicateGelu"])


# ---------------------------------------------------------------------------------- 5. other bad inputs

def _calibration_case(tmp_path, case):
    """(model, calibration path, expected fragments) for one kind of bad calibration data."""
    model, x = mlp(tmp_path / "model.onnx"), x_samples()
    path = tmp_path / f"{case}.npz"
    if case == "other_names":
        np.savez(path, z=x)
        return model, path, ["lacks model input 'x'", "it has z"]
    if case == "text":
        np.savez(path, x=np.full((8, 64), "a"))
        return model, path, ["holds <U1 values", "float32"]
    if case == "complex":
        np.savez(path, x=x.astype(np.complex64))
        return model, path, ["holds complex64 values"]
    if case == "no_samples":
        np.savez(path, x=x[:0])
        return model, path, ["holds no samples"]
    if case == "single_value":
        np.savez(path, x=np.float32(1.0))
        return model, path, ["has rank 0, the model wants 2"]
    if case == "wrong_width":
        np.savez(path, x=x[:, :32])
        return model, path, ["has shape (8, 32)"]
    if case == "empty_npz":
        np.savez(path)
        return model, path, ["holds no arrays"]
    if case == "truncated_npz":
        np.savez(path, x=x)
        path.write_bytes(path.read_bytes()[:100])
        return model, path, ["not a readable .npz file"]
    if case == "empty_folder":
        path = tmp_path / "calib"
        path.mkdir()
        return model, path, ["folder holds no .npz files"]
    ids = token_model(tmp_path / "tokens.onnx")
    if case == "fractional_ids":
        np.savez(path, ids=np.full((4, 8), 2.5, np.float32))
        return ids, path, ["'ids' holds non-integer values", "int64"]
    if case == "ids_out_of_int64":
        np.savez(path, ids=np.full((4, 8), 2**63, np.uint64))
        return ids, path, ["'ids' holds values from 9223372036854775808", "outside the range of int64"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["other_names", "text", "complex", "no_samples", "single_value", "wrong_width",
                                  "empty_npz", "truncated_npz", "empty_folder", "fractional_ids", "ids_out_of_int64"])
def test_bad_calibration_data(cli, tmp_path, case):
    """Before: 'no_samples' ended in an internal error in the pass; 'fractional_ids' were truncated to integers
    and 'ids_out_of_int64' wrapped around without a word; the others were already one line."""
    model, calib, expect = _calibration_case(tmp_path, case)
    refused(cli, tmp_path, "compile", model, "-o", tmp_path / "out.onnx", "--passes", "quant4(algo=gptq)",
            "--calib", calib, expect=expect)


@pytest.mark.parametrize("command", ["compile", "inspect", "bench", "eval", "sweep"])
@pytest.mark.parametrize("what", ["folder", "empty"])
def test_model_path_that_is_no_model(cli, tmp_path, command, what):
    """Before: sweep created its output folder (with models/) before finding the model unreadable."""
    path = tmp_path / "model.onnx"
    if what == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"")
    args = {"compile": ["-o", tmp_path / "out.onnx", "--passes", "cleanup"], "inspect": [], "bench": [],
            "eval": ["--reference", path], "sweep": ["--grid", "quant4(block=32|64)", "-o", tmp_path / "sweep"]}[command]
    refused(cli, tmp_path, command, path, *args, expect=str(path.name))


def test_sweep_writes_nothing_when_the_data_is_bad(cli, model, tmp_path):
    x = x_samples()
    x[1, 1] = np.inf
    np.savez(tmp_path / "bad.npz", x=x)
    refused(cli, tmp_path, "sweep", model, "--grid", "quant4(block=32|64)", "-o", tmp_path / "sweep", "--calib",
            tmp_path / "bad.npz", "--no-bench", "--no-plot", expect=["'x'", "bad.npz"])
    (tmp_path / "afile").write_text("x")
    refused(cli, tmp_path, "sweep", model, "--grid", "quant4(block=32|64)", "-o", tmp_path / "afile" / "sweep",
            expect="is a file, not a folder")


# ------------------------------------------------------- inputs that were internal errors and now compile

def scalar_input_model(path):
    """y = (x @ W) * s with `s` a scalar input (shape [])."""
    return save_model(
        path, [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Mul", ["h", "s"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], [_init("W", 64, 64)])


def test_scalar_input_is_given_whole_to_every_batch(cli, tmp_path):
    """Before: 'internal error: IndexError: too many indices for array: array is 0-dimensional' (synthesized), and
    the same from a calibration .npz holding a 0-d array for it."""
    model = scalar_input_model(tmp_path / "scalar.onnx")
    code, _, err = cli("compile", model, "-o", tmp_path / "a.onnx", "--passes", "quant4(algo=gptq)", "-q")
    assert code == 0, err
    np.savez(tmp_path / "ok.npz", x=x_samples(), s=np.float32(2.0))
    code, _, err = cli("compile", model, "-o", tmp_path / "b.onnx", "--passes", "quant8", "--calib", tmp_path / "ok.npz", "-q")
    assert code == 0, err
    np.savez(tmp_path / "batched.npz", x=x_samples(), s=np.ones(8, np.float32))
    refused(cli, tmp_path, "compile", model, "-o", tmp_path / "c.onnx", "--passes", "quant8", "--calib",
            tmp_path / "batched.npz", expect=["'s' has rank 1, the model wants a scalar"])


@pytest.mark.parametrize("passes", ["quant8", "lowrank(rank=8)"])
def test_untyped_intermediate_values(cli, model, tmp_path, passes):
    """A model without value_info for its intermediate values (as onnx.helper builds them). Before: quant8
    'internal error: SerdeError ... Tensor(None)', lowrank 'internal error: KeyError: 'h.replaced''."""
    out = tmp_path / "out.onnx"
    code, _, err = cli("compile", model, "-o", out, "--passes", passes, "-q")
    assert code == 0, err
    assert out.is_file()


def test_int16_input_is_fed(cli, tmp_path):
    """Before: 'input 'x' has type INT16, which modelsurgeon cannot synthesize; pass --calib data', also with --calib."""
    model = save_model(
        tmp_path / "int16.onnx",
        [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["xf", "W"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.INT16, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], [_init("W", 64, 64)])
    code, _, err = cli("compile", model, "-o", tmp_path / "out.onnx", "--passes", "cleanup", "-q")
    assert code == 0, err
    assert os.path.isfile(tmp_path / "out.onnx")
