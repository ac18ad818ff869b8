"""`modelsurgeon bench`, `eval`, `sweep` (issue 8) on the reference models, through the CLI and the library,
with their numbers checked against independent computations; progress bars and -q/-v of `compile`."""

from __future__ import annotations

import collections
import fcntl
import inspect
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from modelsurgeon.errors import UserError
from modelsurgeon.runtime import run_model


# ------------------------------------------------------------------------------------------------ helpers

def run_cli(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "modelsurgeon", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


_MANY = """
import contextlib, io, json, sys
from modelsurgeon.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def run_cli_many(*argvs, timeout=300):
    """Several CLI invocations (`modelsurgeon.cli.main`, what the console script calls) in one interpreter:
    [(exit code, stdout, stderr), ...]. For the quick bad-argument cases, to save interpreter start-ups."""
    proc = subprocess.run([sys.executable, "-c", _MANY, json.dumps([[str(a) for a in argv] for argv in argvs])],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def expect_errors(*cases):
    """cases: (argv tuple, text the one-line error must contain or None); every case exits 2 with one line."""
    for (argv, contains), result in zip(cases, run_cli_many(*(argv for argv, _ in cases))):
        one_line_error(*result, contains=contains)


def one_line_error(code, out, err, *, contains=None):
    assert code == 2, (code, out, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("modelsurgeon: error: ")
    assert "Traceback" not in err + out
    if contains:
        assert contains in lines[0], lines[0]
    return lines[0]


def run_cli_on_tty(*args, timeout=300):
    """Run the CLI with stderr on a pseudo-terminal (80x24): returns (code, stdout, bytes written to the terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "modelsurgeon", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    out = proc.stdout.read().decode()
    proc.wait(timeout=10)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


def perturb(src, dst, scale, seed=0):
    """A lossy copy of a model: every float weight matrix gets Gaussian noise of `scale` times its std."""
    model = ir.load(src)
    rng = np.random.default_rng(seed)
    for value in model.graph.initializers.values():
        w = value.const_value.numpy()
        if w.dtype == np.float32 and w.ndim >= 2:
            noisy = w + scale * w.std() * rng.standard_normal(w.shape).astype(np.float32)
            value.const_value = ir.tensor(noisy, name=value.name)
    ir.save(model, dst)
    return dst


def matmul_chain(path, depth, width=256):
    """x [batch, width] -> `depth` MatMul+Relu layers: a model whose cost grows with depth."""
    rng = np.random.default_rng(depth)
    nodes, inits, cur = [], [], "x"
    for i in range(depth):
        inits.append(onnx.numpy_helper.from_array((rng.standard_normal((width, width)) / 16).astype(np.float32), f"W{i}"))
        nodes += [helper.make_node("MatMul", [cur, f"W{i}"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        cur = f"r{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("evalbench")


@pytest.fixture(scope="session")
def text_data(work):
    """Running text, one-sentence-per-line text and a word-level tokenizer.json whose ids fit the reference models' 256-row vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    import argparse

    text = inspect.getsource(argparse)
    words = re.findall(r"\w+|[^\w\s]", text)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [w for w, _ in collections.Counter(words).most_common(240)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(work / "tokenizer.json"))
    (work / "text.txt").write_text(text)
    sentences = [l.strip() for l in text.splitlines() if len(l.strip().split()) >= 4][:40]
    (work / "sentences.txt").write_text("\n".join(sentences))
    return {"tokenizer": work / "tokenizer.json", "text": work / "text.txt", "sentences": work / "sentences.txt",
            "num_sentences": len(sentences)}


@pytest.fixture(scope="session")
def llama(reference_onnx):
    return reference_onnx("llama")


@pytest.fixture(scope="session")
def llama_noisy(llama, work):
    return perturb(llama, work / "llama_noisy.onnx", 0.2)


@pytest.fixture(scope="session")
def bert(reference_onnx):
    return reference_onnx("bert")


@pytest.fixture(scope="session")
def bert_noisy(bert, work):
    return perturb(bert, work / "bert_noisy.onnx", 0.2)


# ------------------------------------------------------------------------------------------------ bench

def test_benchmark_ratios_follow_the_work(work):
    """Interleaved measurement: a model doing 16x the work is measured several times slower, ratio against the first."""
    from modelsurgeon.runtime.benchmark import benchmark

    fast, slow = matmul_chain(work / "fast.onnx", 1), matmul_chain(work / "slow.onnx", 16)
    report = benchmark([fast, slow, fast], batch=8, rounds=4, number=5, warmup=2)
    first, heavy, again = report.rows
    assert first.latency_ratio == pytest.approx(1.0) and first.speedup == pytest.approx(1.0)
    assert heavy.latency_ratio > 3.0, report.table()
    assert heavy.speedup == pytest.approx(1 / heavy.latency_ratio)
    assert all(r.runs == 4 * 5 for r in report.rows)
    for r in report.rows:
        assert r.min_ms <= r.q25_ms <= r.median_ms <= r.q75_ms
        assert r.items_per_s == pytest.approx(8 / (r.median_ms / 1e3))
        assert r.tokens is None and r.tokens_per_s is None
    assert heavy.size_ratio > 10  # 16 weight matrices against 1
    assert report.settings["inputs"] == {"x": [8, 256]}


def test_file_size_counts_external_data(llama, work):
    from modelsurgeon.runtime.benchmark import file_size

    model = ir.load(llama)
    ir.save(model, work / "external.onnx", external_data="external.onnx.data")
    both = os.path.getsize(work / "external.onnx") + os.path.getsize(work / "external.onnx.data")
    assert os.path.getsize(work / "external.onnx") < 0.5 * both
    assert file_size(work / "external.onnx") == both
    assert file_size(llama) == os.path.getsize(llama)


def test_bench_cli(llama, llama_noisy, work):
    code, out, err = run_cli("bench", llama, llama_noisy, "--batch", 2, "--seq", 16, "--rounds", 2, "--warmup", 1,
                             "--number", 2, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["benchmark"] == "bench" and res["command"].startswith("modelsurgeon bench")
    assert {"cpu", "cores", "onnxruntime", "threads"} <= set(res["machine"])
    assert res["settings"]["inputs"] == {"input_ids": [2, 16]}
    a, b = res["rows"]
    assert a["model"] == llama.name and b["model"] == "llama_noisy.onnx"
    assert a["latency_ratio"] == 1.0 and b["runs"] == 4
    assert a["tokens"] == 32 and a["tokens_per_s"] == pytest.approx(32 / (a["median_ms"] / 1e3))
    assert a["bytes"] == os.path.getsize(llama)

    # inputs from calibration data: 3 samples of 12 tokens, repeated to a batch of 4; a readable table
    np.savez(work / "ids.npz", input_ids=np.arange(36, dtype=np.int64).reshape(3, 12))
    code, out, err = run_cli("bench", llama, llama_noisy, "--calib", work / "ids.npz", "--batch", 4, "--rounds", 1,
                             "--warmup", 0, "--number", 1, "--threads", 1)
    assert code == 0, err
    assert "speedup" in out and "llama_noisy.onnx" in out and "batch 4, seq 12" in out and "threads 1" in out
    assert "\r" not in err and "it/s" not in err  # no progress bar when stderr is not a terminal


def test_bench_bad_arguments(llama, reference_onnx, work):
    expect_errors(
        (("bench", work / "missing.onnx"), "missing.onnx"),
        (("bench", llama, "--batch", 0), "--batch"),
        (("bench", llama, "--providers", "NoSuchExecutionProvider"), "NoSuchExecutionProvider"),
        (("bench", llama, reference_onnx("mlp")), "needs input 'x'"),
        (("bench", llama, "--rounds", "many"), "--rounds"),
        (("bench",), None))


# ------------------------------------------------------------------------------------------------ eval

def test_lm_perplexity_matches_torch(llama, llama_noisy, text_data):
    """Perplexity of the ONNX model equals cross-entropy of the torch reference module on the same windows."""
    import torch

    from modelsurgeon import calibration
    from modelsurgeon.models import reference
    from modelsurgeon.runtime.evaluate import evaluate

    res = evaluate(llama_noisy, llama, task="lm", data=text_data["text"], tokenizer=text_data["tokenizer"],
                   num_samples=6, seq_len=32, batch_size=4)
    ids = calibration.tokenize_text(text_data["text"].read_text(), calibration.load_tokenizer(text_data["tokenizer"]), 6, 32)
    module, _ = reference.build("llama")
    with torch.no_grad():
        logits = module(torch.from_numpy(ids))
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                torch.from_numpy(ids[:, 1:]).reshape(-1))
    assert res.metrics["tokens"] == 6 * 31 and res.samples == 6
    assert res.metrics["perplexity_reference"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)
    assert res.metrics["perplexity_ratio"] == pytest.approx(res.metrics["perplexity"] / res.metrics["perplexity_reference"])
    # the noisy model differs: its outputs, next-token choices and distributions
    ref_logits = run_model(str(llama), {"input_ids": ids})["logits"]
    got_logits = run_model(str(llama_noisy), {"input_ids": ids})["logits"]
    assert res.metrics["rel_l2"] == pytest.approx(np.linalg.norm(got_logits - ref_logits) / np.linalg.norm(ref_logits), rel=1e-4)
    agree = np.mean(got_logits[:, :-1].argmax(-1) == ref_logits[:, :-1].argmax(-1))
    assert res.metrics["top1_agreement"] == pytest.approx(agree) and 0 < agree < 1
    assert res.metrics["kl_divergence"] > 1e-3
    accuracy = np.mean(ref_logits[:, :-1].argmax(-1) == ids[:, 1:])
    assert res.metrics["top1_accuracy_reference"] == pytest.approx(accuracy)

    same = evaluate(llama, llama, task="lm", data=text_data["text"], tokenizer=text_data["tokenizer"], num_samples=6, seq_len=32)
    assert same.metrics["top1_agreement"] == 1.0 and same.metrics["rel_l2"] == 0.0
    assert abs(same.metrics["kl_divergence"]) < 1e-9
    assert same.metrics["perplexity"] == pytest.approx(res.metrics["perplexity_reference"], rel=1e-6)


def test_eval_cli_lm_and_classification(llama, llama_noisy, reference_onnx, text_data, work):
    code, out, err = run_cli("eval", llama_noisy, "--reference", llama, "--task", "lm", "--data", text_data["text"],
                             "--tokenizer", text_data["tokenizer"], "--num-samples", 4, "--seq-len", 24, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["task"] == "lm" and res["headline"] == "perplexity" and res["higher_is_better"] is False
    assert res["metrics"]["tokens"] == 4 * 23 and res["metrics"]["perplexity"] > 1
    assert set(res["outputs"]) == {"logits"}

    # classification on the resnet: agreement and accuracy against numpy on the same inputs
    resnet = reference_onnx("resnet")
    noisy = perturb(resnet, work / "resnet_noisy.onnx", 0.5)
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((20, 3, 32, 32)).astype(np.float32)
    ref_pred = run_model(str(resnet), {"pixels": pixels})["logits"].argmax(1)
    got_pred = run_model(str(noisy), {"pixels": pixels})["logits"].argmax(1)
    labels = np.where(np.arange(20) % 2 == 0, ref_pred, (ref_pred + 1) % 10)  # the reference is right on half
    np.savez(work / "images.npz", pixels=pixels, labels=labels)
    code, out, err = run_cli("eval", noisy, "--reference", resnet, "--task", "classification", "--data",
                             work / "images.npz", "--batch-size", 6)
    assert code == 0, err
    values = dict(re.findall(r"^\s+(\w+)\s+([-\d.e+]+)", out, re.M))
    assert float(values["top1_agreement"]) == pytest.approx(np.mean(ref_pred == got_pred), abs=1e-6)
    assert float(values["accuracy_reference"]) == pytest.approx(0.5)
    assert float(values["accuracy"]) == pytest.approx(np.mean(got_pred == labels), abs=1e-6)
    assert "accuracy" in out.splitlines()[[i for i, l in enumerate(out.splitlines()) if "<-" in l][0]]


def test_embedding_metrics_properties():
    from modelsurgeon.runtime.evaluate import embedding_metrics

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((30, 16))
    same = embedding_metrics(ref * 3.0, ref)  # scale does not matter
    assert same["cosine_mean"] == pytest.approx(1.0) and same["similarity_spearman"] == pytest.approx(1.0)
    assert same["nearest_neighbour_agreement"] == 1.0 and same["top5_neighbour_overlap"] == 1.0
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    rotated = embedding_metrics(ref @ q, ref)  # a rotation keeps every similarity but moves every vector
    assert rotated["cosine_mean"] < 0.5
    assert rotated["similarity_spearman"] == pytest.approx(1.0) and rotated["nearest_neighbour_agreement"] == 1.0
    shuffled = embedding_metrics(ref[rng.permutation(30)], ref)
    assert abs(shuffled["similarity_spearman"]) < 0.3 and shuffled["nearest_neighbour_agreement"] < 0.5


def test_eval_embedding_masks_padding(bert, bert_noisy, text_data):
    """Sentence embeddings mean-pool over the attention mask: batching (hence padding) does not change them."""
    from modelsurgeon.runtime.evaluate import evaluate

    kw = dict(task="embedding", data=text_data["sentences"], tokenizer=text_data["tokenizer"], seq_len=48)
    one = evaluate(bert_noisy, bert, batch_size=1, **kw)
    many = evaluate(bert_noisy, bert, batch_size=16, **kw)
    assert one.samples == many.samples == text_data["num_sentences"]
    for key in ("cosine_mean", "cosine_min", "similarity_spearman", "nearest_neighbour_agreement"):
        assert one.metrics[key] == pytest.approx(many.metrics[key], abs=1e-5), key
    assert 0.5 < many.metrics["cosine_mean"] < 0.9999 and many.metrics["cosine_min"] <= many.metrics["cosine_mean"]
    same = evaluate(bert, bert, batch_size=16, **kw)
    assert same.metrics["cosine_mean"] == pytest.approx(1.0) and same.metrics["similarity_spearman"] == pytest.approx(1.0)


def test_eval_cli_embedding(bert, bert_noisy, text_data):
    code, out, err = run_cli("eval", bert_noisy, "--reference", bert, "--task", "embedding", "--data", text_data["sentences"],
                             "--tokenizer", text_data["tokenizer"], "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["headline"] == "cosine_mean" and res["samples"] == text_data["num_sentences"]
    assert 0 < res["metrics"]["cosine_mean"] < 1 and -1 <= res["metrics"]["similarity_spearman"] <= 1


def test_eval_bad_arguments(llama, bert, text_data, work):
    np.savez(work / "big_ids.npz", input_ids=np.full((2, 8), 1000, np.int64))
    expect_errors(
        (("eval", llama, "--task", "poetry"), "--task"),
        (("eval", llama, "--reference", llama, "--task", "lm"), "--data"),
        (("eval", llama, "--task", "lm", "--data", text_data["text"]), "--tokenizer"),
        (("eval", bert, "--task", "embedding", "--data", text_data["sentences"], "--tokenizer", text_data["tokenizer"]),
         "--reference"),
        (("eval", llama, "--reference", work / "nope.onnx"), "nope.onnx"),
        (("eval", llama, "--task", "lm", "--data", work / "big_ids.npz"), "256 rows"),
        (("eval", llama, "--reference", llama, "--task", "lm", "--data", text_data["text"], "--tokenizer",
          text_data["tokenizer"], "--output-name", "hidden"), "no such output"),
        (("eval", llama, "--reference", llama, "--data", work / "missing.npz"), "missing.npz"))


# ------------------------------------------------------------------------------------------------ sweep

def test_expand_grid_and_pareto():
    from modelsurgeon.sweep import expand_grid, pareto_front

    assert expand_grid("slice(sparsity=0.1|0.2|0.3),quant4(block=32|128)") == [
        "slice(sparsity=0.1),quant4(block=32)", "slice(sparsity=0.1),quant4(block=128)",
        "slice(sparsity=0.2),quant4(block=32)", "slice(sparsity=0.2),quant4(block=128)",
        "slice(sparsity=0.3),quant4(block=32)", "slice(sparsity=0.3),quant4(block=128)"]
    assert expand_grid(["cleanup", "cleanup(fold=true|false)", "cleanup"]) == ["cleanup", "cleanup(fold=true)", "cleanup(fold=false)"]
    assert expand_grid("p(a=f(1)|f(2),b=x)") == ["p(a=f(1),b=x)", "p(a=f(2),b=x)"]
    with pytest.raises(UserError):
        expand_grid("quant4(block=32||64)")
    points = [(10, 5.0), (8, 6.0), (8, 7.0), (12, 4.0), (20, 4.0), (5, 9.0)]
    assert pareto_front(points, higher_is_better=False) == [True, True, False, True, False, True]
    assert pareto_front(points, higher_is_better=True) == [False, False, False, False, False, True]  # (5, 9) beats all
    points = [(5, 1.0), (8, 2.0), (8, 1.5), (10, 2.0), (12, 3.0)]
    assert pareto_front(points, higher_is_better=True) == [True, True, False, False, True]


def test_sweep_cli_table_and_plot(llama, text_data, work):
    from modelsurgeon.pass_api import registered_passes

    grids = ["cleanup(fold=true|false)"]
    if "quant4" in registered_passes():
        grids.append("quant4(block=32|64)")
    args = [a for g in grids for a in ("--grid", g)]
    refused = "drop-blocks" in registered_passes()  # a pipeline that fails: its row says why, the sweep goes on
    if refused:
        args += ["--grid", "drop-blocks(n=5)"]  # the model has 2 blocks
    out_dir = work / "sweep"
    code, out, err = run_cli("sweep", llama, *args, "-o", out_dir, "--task", "lm", "--data", text_data["text"],
                             "--tokenizer", text_data["tokenizer"], "--eval-samples", 4, "--seq-len", 32,
                             "--rounds", 2, "--warmup", 1, "--number", 2, "--seq", 16)
    assert code == 0, err
    assert "Pareto" in out and "perplexity" in out
    n = 1 + 2 * len(grids)
    import csv

    rows = list(csv.DictReader(open(out_dir / "sweep.csv")))
    if refused:
        failed = rows.pop()
        assert failed["pipeline"] == "drop-blocks(n=5)" and failed["status"].startswith("failed: drop-blocks")
        assert failed["latency_ms"] == "" and failed["pareto"] == "False" and "drop-blocks(n=5)" in out
    assert len(rows) == n and rows[0]["pipeline"] == "(original)"
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    base_ppl = float(rows[0]["quality"])
    for r in rows[1:3]:  # cleanup is exact: same perplexity, same outputs
        assert float(r["quality"]) == pytest.approx(base_ppl, rel=1e-5) and float(r["rel_l2"]) < 1e-5
        assert os.path.exists(r["path"])
    if len(grids) == 2:  # 4-bit weights: smaller, and the outputs move
        for r in rows[3:]:
            assert float(r["size_ratio"]) < 0.75 and float(r["rel_l2"]) > 1e-4
        assert float(rows[3]["bytes"]) > float(rows[4]["bytes"])  # block 32 stores more scales than block 64
        assert rows[4]["pareto"] == "True"  # the smallest model is always on the front
    assert all(float(r["latency_ms"]) > 0 for r in rows)
    assert any(r["pareto"] == "True" for r in rows)

    res = json.loads((out_dir / "sweep.json").read_text())
    assert res["benchmark"] == "sweep" and len(res["rows"]) == n + refused and res["metric"] == "perplexity"
    assert res["command"].startswith("modelsurgeon sweep")

    import matplotlib.image

    png = matplotlib.image.imread(out_dir / "sweep.png")
    assert png.shape[0] >= 400 and png.shape[1] >= 600, png.shape
    assert png[..., :3].std() > 0.05  # not a blank canvas
    assert os.path.getsize(out_dir / "sweep.png") > 10_000


def test_sweep_bad_arguments(llama, work):
    (work / "afile").write_text("x")
    expect_errors(
        (("sweep", llama, "--grid", "cleanup(fold=maybe|true)", "-o", work / "s1"), "fold"),
        (("sweep", llama, "--grid", "nosuchpass(x=1|2)", "-o", work / "s2"), "unknown pass"),
        (("sweep", llama, "--grid", "cleanup(fold=true|false)", "-o", work / "s3", "--max-runs", 1), "--max-runs"),
        (("sweep", llama, "--grid", "cleanup", "-o", work / "afile"), "is a file"),
        (("sweep", llama, "-o", work / "s4"), "--grid"),
        (("sweep", llama, "--grid", "cleanup", "-o", work / "s5", "--task", "lm"), "--data"))
    assert not any((work / f"s{i}").exists() for i in range(1, 6))  # refused before anything ran


# ------------------------------------------------------------------------------------------------ compile: progress and log levels

def test_compile_progress_bars_only_on_a_terminal(reference_onnx, work):
    from modelsurgeon.pass_api import registered_passes

    loop_pass = next((p for p in ("lowrank(ratio=0.2)", "quant4(algo=gptq)") if p.split("(")[0] in registered_passes()), None)
    if loop_pass is None:
        pytest.skip("no pass with a calibration loop is registered yet")
    mlp, out = reference_onnx("mlp"), work / "progress.onnx"
    code, stdout, term = run_cli_on_tty("compile", mlp, "--passes", loop_pass, "-o", out)
    assert code == 0, term
    assert "it/s" in term and "%|" in term, term  # tqdm drew a bar on the terminal
    assert "rel L2" in stdout
    code, stdout, term = run_cli_on_tty("compile", mlp, "--passes", loop_pass, "-o", out, "-q")
    assert code == 0 and stdout == "" and term.strip() == "", term  # -q: no bar, no warning
    code, stdout, err = run_cli("compile", mlp, "--passes", loop_pass, "-o", out)
    assert code == 0 and "%|" not in err and "\r" not in err, err
    assert "WARNING" in err  # warnings still show (synthesized calibration)


def test_compile_log_levels(reference_onnx, work):
    mlp, out = reference_onnx("mlp"), work / "levels.onnx"
    common = ("--passes", "cleanup", "-o", out)
    verbose, default, quiet_before, quiet_after = run_cli_many(
        ("compile", mlp, *common, "-v"), ("compile", mlp, *common), ("-q", "compile", mlp, *common),
        ("compile", mlp, *common, "-q"))
    code, stdout, err = verbose
    assert code == 0 and "INFO" in err and "running cleanup" in err and "rel L2" in stdout
    code, stdout, err = default
    assert code == 0 and "INFO" not in err and "rel L2" in stdout
    for code, stdout, err in (quiet_before, quiet_after):  # -q before or after the command
        assert code == 0 and stdout == "" and err == "", (stdout, err)


# ------------------------------------------------------------------------------------------------ benchmarks/run_all.py

def _load_run_all():
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location("run_all", pathlib.Path(__file__).parent.parent / "benchmarks" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    return run_all


def test_run_all_regenerates_results_page(tmp_path, monkeypatch):
    """run_all runs every script, reports failures, and renders each results JSON of the convention as a table."""
    run_all = _load_run_all()
    root = tmp_path
    (root / "benchmarks").mkdir()
    (root / "docs" / "results").mkdir(parents=True)
    monkeypatch.setattr(run_all, "ROOT", root)
    monkeypatch.setattr(run_all, "BENCH_DIR", root / "benchmarks")
    monkeypatch.setattr(run_all, "RESULTS_DIR", root / "docs" / "results")
    monkeypatch.setattr(run_all, "PAGE", root / "docs" / "results.md")
    (root / "benchmarks" / "good.py").write_text(
        "import json, pathlib\n"
        "rows = [{'model': 'a|b', 'rel_l2': 0.012345678, 'ok': True}, {'model': 'c', 'latency_ms': 2.5, 'iqr': [1, 2]}]\n"
        "pathlib.Path('docs/results/good.json').write_text(json.dumps({'benchmark': 'good', 'command': 'python benchmarks/good.py',"
        " 'machine': {'cpu': 'X', 'cores': 2}, 'rows': rows, 'notes': ['a note']}))\n")
    (root / "benchmarks" / "broken.py").write_text("raise SystemExit(3)\n")
    (root / "benchmarks" / "_helper.py").write_text("raise SystemExit('helpers are not run')\n")
    (root / "docs" / "results" / "odd.json").write_text(json.dumps({"benchmark": "odd", "table": []}))
    (root / "docs" / "good.md").write_text("# good\n")

    assert run_all.main([]) == 1  # broken.py failed
    page = (root / "docs" / "results.md").read_text()
    assert "| broken.py | failed (3) |" in page and "| good.py | ok |" in page and "_helper" not in page
    assert "## good (good.json)" in page and "[good.md](good.md)" in page and "`python benchmarks/good.py`" in page
    assert "| model | rel_l2 | ok | latency_ms | iqr |" in page
    assert "| a\\|b | 0.01235 | yes |  |  |" in page and "| c |  |  | 2.5 | [1,2] |" in page
    assert "- a note" in page and "cpu X, cores 2" in page
    assert "`odd.json`: no \"rows\" list" in page
    assert run_all.main(["--no-run"]) == 0 and "Last run" not in (root / "docs" / "results.md").read_text()
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nosuch"])


def test_run_all_dates_a_committed_result_by_its_commit(tmp_path):
    """A fresh clone stamps every file with the clone's time: the page dates a results file committed as it is by
    its commit, and one changed since (or never committed) by the file itself."""
    import datetime

    run_all = _load_run_all()
    result = tmp_path / "r.json"
    result.write_text("{}")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_COMMITTER_DATE": "2001-02-03T04:05:00+00:00"}
    for cmd in (["init", "-q"], ["add", "r.json"], ["-c", "commit.gpgsign=false", "commit", "-q", "-m", "r"]):
        subprocess.run(["git", "-C", str(tmp_path), *cmd], check=True, env=env)
    assert f"{run_all._written(result):%Y-%m-%d %H:%M}" == "2001-02-03 04:05"
    result.write_text('{"rows": []}')
    os.utime(result, (1e9, 1e9))  # 2001-09-09 01:46 UTC
    assert run_all._written(result) == datetime.datetime.fromtimestamp(1e9, datetime.timezone.utc)


# ------------------------------------------------------------------------------------------------ real model

@pytest.mark.real
def test_eval_embedding_on_minilm(request, work):
    """4-bit MiniLM against the original on real sentences: embeddings close, similarity ranking kept."""
    real = pytest.importorskip("modelsurgeon.models.real")
    minilm = request.getfixturevalue("minilm")
    sentences = work / "real_sentences.txt"
    sentences.write_text("\n".join(real.sentences(48, 0)))
    q4 = work / "minilm.q4.onnx"
    code, _, err = run_cli("compile", minilm.onnx, "--passes", "quant4(block=32)", "-o", q4, "-q")
    assert code == 0, err
    code, out, err = run_cli("eval", q4, "--reference", minilm.onnx, "--task", "embedding", "--data", sentences,
                             "--tokenizer", minilm.tokenizer, "--json")
    assert code == 0, err
    m = json.loads(out)["metrics"]
    assert json.loads(out)["samples"] == 48
    assert 0.9 < m["cosine_mean"] < 1.0 and m["similarity_spearman"] > 0.9 and m["nearest_neighbour_agreement"] > 0.7


def test_next_token_nll_scores_each_position_against_the_next_token():
    from modelsurgeon.runtime.evaluate import next_token_nll

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    ids = rng.integers(0, 7, size=(2, 5))
    nll, count = next_token_nll(logits, ids)
    expected = 0.0
    for b in range(2):
        for t in range(4):
            z = logits[b, t].astype(np.float64)
            expected -= z[ids[b, t + 1]] - np.log(np.exp(z).sum())
    assert count == 8
    assert nll == pytest.approx(expected, rel=1e-12)
    uniform, n = next_token_nll(np.zeros((1, 600, 7), np.float32), np.zeros((1, 600), np.int64))  # > one chunk
    assert n == 599 and uniform == pytest.approx(599 * np.log(7), rel=1e-12)
