"""heal and the ONNX -> torch interpreter it runs on (modelsurgeon.onnx_torch, passes/heal.py)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

import modelsurgeon
from modelsurgeon import calibration as cal
from modelsurgeon import onnx_torch
from modelsurgeon.context import PassContext
from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import get_pass
from modelsurgeon.runtime.session import make_session


def _ort_vs_torch(path, seq_len: int = 12) -> float:
    """Worst relative max error of the interpreter's outputs against ONNX Runtime's, on synthesized inputs."""
    model = ir.load(str(path))
    feeds = cal.synthesize(model, num_samples=2, seq_len=seq_len, seed=3).arrays
    session = make_session(model)
    names = [o.name for o in model.graph.outputs]
    ref = session.run(names, {i.name: feeds[i.name] for i in session.get_inputs()})
    with torch.no_grad():
        out = onnx_torch.graph_function(model)(onnx_torch.feeds_to_torch(feeds))
    worst = 0.0
    for name, r in zip(names, ref):
        got = out[name].double().numpy()
        assert got.shape == r.shape, name
        worst = max(worst, float(np.abs(got - r).max() / (np.abs(r).max() + 1e-12)))
    return worst


@pytest.mark.parametrize("kind", ["llama", "opt", "bert"])
def test_interpreter_matches_ort_on_reference_models(reference_onnx, kind):
    assert _ort_vs_torch(reference_onnx(kind, opset=18)) < 1e-5


@pytest.mark.parametrize("name", ["llama/torchscript", "llama/optimum-past", "gpt2/dynamo18", "phi3/dynamo18",
                                  "vit/dynamo18", "bert/torchscript", "llama/fp16", "qwen2/genai-fp32",
                                  "gemma/genai-fp32"])
def test_interpreter_matches_ort_on_corpus_models(corpus_model, name):
    # fp16 computes in float32 in torch (upcast): within fp16 rounding of ORT's float16 arithmetic
    assert _ort_vs_torch(corpus_model(name)) < (2e-3 if "fp16" in name else 1e-5)


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("loader", ["smollm2_onnx", "minilm_onnx", "efficientnet_lite0_onnx"])
def test_interpreter_matches_ort_on_real_models(loader):
    from modelsurgeon.models import real

    assert _ort_vs_torch(getattr(real, loader)()) < 1e-4


def test_interpreter_refuses_an_unknown_op_by_name(corpus_model):
    model = ir.load(str(corpus_model("llama/genai-int4")))  # 4-bit: MatMulNBits, GatherBlockQuantized
    with pytest.raises(UserError, match="has no com.microsoft:(MatMulNBits|GatherBlockQuantized) op"):
        onnx_torch.graph_function(model)


def test_interpreter_gradients_reach_the_chosen_initializers(reference_onnx):
    model = ir.load(str(reference_onnx("llama", opset=18)))
    weight = next(n for n, v in model.graph.initializers.items() if v.const_value.shape == (64, 64))
    p = torch.nn.Parameter(torch.from_numpy(model.graph.initializers[weight].const_value.numpy().copy()))
    g = onnx_torch.graph_function(model, {weight: p})
    feeds = onnx_torch.feeds_to_torch(cal.synthesize(model, num_samples=2, seq_len=8, seed=0).arrays)
    g(feeds)["logits"].square().mean().backward()
    assert p.grad is not None and float(p.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", ["llama/torchscript", "gpt2/dynamo18", "phi3/dynamo18", "bert/optimum"])
def test_interpreter_keeps_low_rank_weights_factored_with_the_same_values_and_gradients(corpus_model, name):
    # every matrix as base + a @ b: the interpreter computes with the factors where an op allows it (MatMul and Gemm
    # reading it on the right, 2-D Transpose, row Gather) and forms it only elsewhere; outputs and the factors'
    # gradients equal those of the formed matrices
    model = ir.load(str(corpus_model(name)))
    gen = torch.Generator().manual_seed(0)
    factors = {}
    for n, v in model.graph.initializers.items():
        if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT and len(v.const_value.shape) == 2:
            rows, cols = v.const_value.shape
            if min(rows, cols) > 4:
                base = torch.from_numpy(v.const_value.numpy().copy())
                a, b = torch.randn(rows, 2, generator=gen) * 0.1, torch.randn(2, cols, generator=gen) * 0.1
                factors[n] = (base, a, b)
    assert len(factors) >= 8
    feeds = onnx_torch.feeds_to_torch(cal.synthesize(model, num_samples=2, seq_len=8, seed=0).arrays)
    out_name = model.graph.outputs[0].name
    formed, results = [0], []
    dense = onnx_torch.LowRankSum.dense

    def counting(self):
        formed[0] += 1
        return dense(self)
    for factored in (False, True):
        ab = {n: (a.clone().requires_grad_(), b.clone().requires_grad_()) for n, (_, a, b) in factors.items()}
        params = {n: onnx_torch.LowRankSum(factors[n][0], *ab[n]) for n in factors}
        if not factored:
            params = {n: lr.dense() for n, lr in params.items()}
        else:
            onnx_torch.LowRankSum.dense = counting
        try:
            out = onnx_torch.graph_function(model, params, outputs=[out_name])(feeds)[out_name]
        finally:
            onnx_torch.LowRankSum.dense = dense
        out.square().mean().backward()
        results.append((out.detach(), {n: (a.grad, b.grad) for n, (a, b) in ab.items()}))
    (out0, g0), (out1, g1) = results
    assert torch.allclose(out0, out1, rtol=1e-4, atol=1e-4 * float(out0.abs().max()))
    for n in factors:
        for x, y in zip(g0[n], g1[n]):
            assert torch.allclose(x, y, rtol=1e-3, atol=1e-4 * float(x.abs().max()) + 1e-12), n
    assert formed[0] == 0, "every weight of these graphs is read by an op that keeps it factored"


# ---------------------------------------------------------------------------------------------------------- heal


def _run(model, ctx, spec: str, **opts):
    """Run one pass (with its requirements) on `model` as the manager does, without verification."""
    from modelsurgeon.pipeline import build_pipeline, parse_passes

    result = None
    for p in build_pipeline(parse_passes(spec), cleanup=False):
        ctx.model = model
        result = p.run(model, ctx)
        model = result.model
        if result.modified:
            ctx.analyses.invalidate(p.preserves)
    return model, result


def _setup(path, samples: int = 16, seq: int = 16):
    model = modelsurgeon.load(path)
    calib = cal.synthesize(model, num_samples=samples, seq_len=seq, seed=0)
    return model, PassContext(model=model, calibration=calib, progress=False)


def _outputs(model, feeds):
    session = make_session(model)
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("structural, mode", [("lowrank(ratio=0.3)", "blocks"), ("share(groups=2)", "blocks"),
                                              ("share(groups=2)", "e2e")])
def test_heal_lowers_the_error_it_matches(reference_onnx, structural, mode):
    path = reference_onnx("llama", opset=18)
    original = modelsurgeon.load(path)
    model, ctx = _setup(path)
    model, _ = _run(model, ctx, structural)
    feeds = ctx.calibration.head(8)
    before = _rel(_outputs(model, feeds), _outputs(original, feeds))
    model, res = _run(model, ctx, f"heal(steps=40,lr=3e-4,mode={mode})")
    after = _rel(_outputs(model, feeds), _outputs(original, feeds))
    notes = res.notes
    assert notes["mode"] == mode and notes["changed_initializers"] > 0
    assert notes["objective_after"] < 0.9 * notes["objective_before"]
    assert after < 0.95 * before  # the model's outputs on calibration samples moved towards the original's


def test_heal_leaves_untouched_weights_bit_identical(reference_onnx):
    from modelsurgeon.passes.heal import touched_initializers

    path = reference_onnx("llama", opset=18)
    model, ctx = _setup(path)
    model, _ = _run(model, ctx, "lowrank(ratio=0.3)")
    before = {n: v.const_value.numpy().tobytes() for n, v in model.graph.initializers.items()}
    touched = touched_initializers(model, ctx.original, ctx.analysis("blocks"))
    norms = [n for n in before if n not in touched and model.graph.initializers[n].const_value.size > 1]
    assert touched and norms  # lowrank's factors train; the norms' scales, the embedding and rotary tables do not
    model, res = _run(model, ctx, "heal(steps=10,lr=1e-3)")
    after = {n: v.const_value.numpy().tobytes() for n, v in model.graph.initializers.items()}
    assert after.keys() == before.keys()
    assert all(after[n] == before[n] for n in before if n not in touched)
    assert sum(after[n] != before[n] for n in touched) == res.notes["changed_initializers"] > 0
    # the original the compile started from is intact
    fresh = modelsurgeon.load(path)
    for name, value in ctx.original.graph.initializers.items():
        assert value.const_value.numpy().tobytes() == fresh.graph.initializers[name].const_value.numpy().tobytes()


def test_heal_with_zero_steps_is_exact(reference_onnx):
    path = reference_onnx("llama", opset=18)
    result = modelsurgeon.compile(str(path), "lowrank(ratio=0.3),heal(steps=0)", num_samples=8, seq_len=16,
                                  progress=False)
    lowrank, heal = _row(result, "lowrank"), _row(result, "heal")
    assert not heal.modified
    assert heal.rel_l2 == lowrank.rel_l2


def test_heal_retrains_the_block_after_a_dropped_one(reference_onnx):
    from modelsurgeon.passes.heal import touched_initializers

    path = reference_onnx("llama", opset=18, layers=4)
    model, ctx = _setup(path)
    model, _ = _run(model, ctx, "drop-blocks(n=1)")
    tb = ctx.analysis("blocks")
    touched = touched_initializers(model, ctx.original, tb)
    assert touched  # no weight changed, but a block now reads the stream of a block before the dropped one
    model, res = _run(model, ctx, "heal(steps=30,lr=3e-4)")
    assert res.notes["objective_after"] < res.notes["objective_before"]


def _row(result, name: str):
    return next(r for r in result.report.rows if r.name.startswith(name))


@pytest.mark.parametrize("name, mode", [("gpt2/dynamo18", "blocks"), ("llama/optimum-past", "e2e"),
                                        ("llama/optimum-past", "blocks"), ("qwen2/genai-fp32", "blocks"),
                                        ("phi3/genai-fp32", "e2e")])
def test_heal_on_other_exporters(corpus_model, name, mode):
    """GPT-2 (Gemm projections, a fused qkv Split, LayerNorm); Optimum's KV-cache export (TorchScript exporter,
    Constant nodes, empty past); GenAI's (GroupQueryAttention, skip norms, SiLU as x * Sigmoid(x)). Block by block,
    the finder tells the low-rank gate from the up projection by what their second factors feed, and GenAI's block
    outputs keep the names of the skip norms they were split from, which is how heal finds the original's."""
    result = modelsurgeon.compile(str(corpus_model(name)), f"lowrank(ratio=0.7),heal(steps=20,lr=1e-4,mode={mode})",
                                  num_samples=8, seq_len=16, progress=False)
    heal = _row(result, "heal")
    assert heal.modified and heal.notes["mode"].startswith(mode)
    assert heal.notes["objective_after"] < heal.notes["objective_before"]


def test_heal_trains_only_what_the_passes_touched_on_a_genai_graph(corpus_model):
    """canonicalize splits GenAI's skip norms before any pass: not a change of the passes, so heal trains the pruned
    MLP weights only (not every block's weights, nor the rotary cos/sin caches every GroupQueryAttention reads,
    which no `train` choice trains)."""
    from modelsurgeon.passes.heal import trainable

    model, ctx = _setup(corpus_model("qwen2/genai-fp32"))
    model, _ = _run(model, ctx, "prune(ffn=0.5),canonicalize")  # as in prune,heal: canonicalize runs before heal
    tb = ctx.analysis("blocks")
    mlp = {lin.weight.name for b in tb.blocks for lin in (b.gate, b.up, b.down)}
    assert trainable(model, ctx, "touched", tb) == mlp
    everything = trainable(model, ctx, "all")
    assert mlp < everything and not {"cos_cache", "sin_cache"} & everything
    assert {"cos_cache", "sin_cache"} <= set(model.graph.initializers)


def test_heal_refuses_a_4bit_model_and_says_to_quantize_after(corpus_model):
    from modelsurgeon.models import corpus

    out = corpus.run_cell(corpus_model("qwen2/genai-int4"), corpus.pass_spec("heal"))
    assert out.status == "refused"
    assert "already 4-bit (MatMulNBits)" in out.detail and "run heal on the float model, then quant4" in out.detail


def test_heal_without_anything_to_train_changes_nothing(reference_onnx):
    path = reference_onnx("llama", opset=18)
    result = modelsurgeon.compile(str(path), "heal", num_samples=8, seq_len=16, progress=False)
    row = _row(result, "heal")
    assert not row.modified and row.notes["trained_parameters"] == 0 and row.rel_l2 == 0


def test_heal_refuses_bad_options():
    with pytest.raises(UserError, match="train"):
        get_pass("heal")(train="everything")
    with pytest.raises(UserError, match="steps"):
        get_pass("heal")(steps=-1)
    for bad in (-0.1, 1.0):
        with pytest.raises(UserError, match="holdout"):
            get_pass("heal")(holdout=bad)
    with pytest.raises(UserError, match="rank"):
        get_pass("heal")(rank=-1)


def test_heal_objectives_count_real_tokens_only():
    from modelsurgeon.passes.heal import _kl, _nmse, _trim_padding

    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    feeds = {"input_ids": np.arange(12).reshape(2, 6), "attention_mask": mask}
    trimmed = _trim_padding(feeds)
    assert trimmed["input_ids"].shape == (2, 3) and trimmed["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    # a 4-D input with a sequence axis of its own: the batch stays whole
    assert _trim_padding({**feeds, "bias": np.zeros((2, 1, 6, 6))})["input_ids"].shape == (2, 6)
    assert _trim_padding({"input_ids": feeds["input_ids"], "attention_mask": np.ones((2, 6), np.int64)}) \
        ["input_ids"].shape == (2, 6)
    # a mask that also covers a KV cache's past positions ([batch, past + seq]) is not cut on its own
    assert _trim_padding({"input_ids": feeds["input_ids"][:, :4], "attention_mask": mask})["attention_mask"].shape == (2, 6)
    # outputs that differ from the target only where the mask is 0 match it exactly
    m = torch.from_numpy(trimmed["attention_mask"].astype(np.float32))
    target = torch.randn(2, 3, 5)
    out = target.clone()
    out[1, 2, 0] += 10.0  # (KL does not see a shift of all logits)
    assert float(_nmse(out, target, m)) == 0.0 and float(_nmse(out, target)) > 0.1
    assert float(_kl(out, target, m)) == 0.0 and float(_kl(out, target)) > 0.1
    # a per-sentence output ([batch, features]) is not weighted per token
    assert float(_nmse(out[:, 2], target[:, 2], m)) > 0.1


def test_heal_keeps_the_weights_best_on_held_out_batches():
    """Training pulls p to 1 (the training batch's optimum); the held-out batch's optimum is 0.3, so the weights kept
    are the best checkpoint on it, not the end of training, and the reported objective is the held-out one."""
    from modelsurgeon.passes.heal import _fit

    p = torch.nn.Parameter(torch.zeros(()))
    targets = {0: 1.0, 1: 0.3}
    fit = _fit({"p": p}, lambda b: (p - targets[b]) ** 2, [0], [1], steps=200, lr=0.01, deadline=float("inf"))
    assert fit.kept and fit.before == pytest.approx(0.09)
    value = float(p.detach())
    assert fit.after < 0.02 and abs(value - 0.3) < 0.15 and fit.after == pytest.approx((value - 0.3) ** 2)
    q = torch.nn.Parameter(torch.zeros(()))  # without held-out batches: trained to the end
    end = _fit({"q": q}, lambda b: (q - targets[b]) ** 2, [0], [], steps=200, lr=0.01, deadline=float("inf"))
    assert end.kept and float(q.detach()) > 0.6  # well past the held-out optimum


def test_heal_learning_rate_decays_by_the_time_budget_where_it_binds(monkeypatch):
    """A clock that moves 1 s per reading (one per step) and a 10 s budget for 1000 steps: the cosine decay follows
    the time spent, so the last step before the deadline runs at a small rate, not at the nearly full one of step 9
    of 1000."""
    from modelsurgeon.passes import heal

    clock = [0.0]

    def tick():
        clock[0] += 1.0
        return clock[0]
    monkeypatch.setattr(heal.time, "monotonic", tick)
    p = torch.nn.Parameter(torch.zeros(()))
    rates = []
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    fit = heal._fit({"p": p}, lambda b: (p - 1.0) ** 2, [0], [], steps=1000, lr=0.1, deadline=10.0)
    assert fit.steps == 9 and rates[0] == pytest.approx(0.1, rel=0.05)
    assert rates[-1] < 0.02 and all(a >= b for a, b in zip(rates, rates[1:]))
    rates.clear()  # without a deadline the decay runs over the steps alone
    heal._fit({"p": p}, lambda b: (p - 1.0) ** 2, [0], [], steps=4, lr=0.1, deadline=float("inf"))
    assert rates == pytest.approx([0.1, 0.1 * (1 + np.cos(np.pi / 4)) / 2, 0.05, 0.1 * (1 + np.cos(3 * np.pi / 4)) / 2])


def test_heal_with_held_out_samples_on_a_padded_encoder(reference_onnx):
    """BERT with right-padded calibration: heal trains on 7 of every 8 samples, keeps what lowers the error on the
    rest, and every [batch, seq] feed is cut to the batch's longest sentence."""
    from modelsurgeon.calibration import CalibrationData
    from modelsurgeon.passes.heal import split_batches

    path = reference_onnx("bert", opset=18)
    model = modelsurgeon.load(path)
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 10, size=32)
    lengths[0] = 24
    mask = (np.arange(24)[None, :] < lengths[:, None]).astype(np.int64)
    calib = CalibrationData({"input_ids": rng.integers(1, 256, size=(32, 24)) * mask, "attention_mask": mask}, "test")
    train, held = split_batches(calib, 8, 0.125)
    assert [len(b["input_ids"]) for b in train] == [8, 8, 8, 4] and [len(b["input_ids"]) for b in held] == [4]
    assert train[0]["input_ids"].shape[1] == 24 and all(b["input_ids"].shape[1] < 10 for b in train[1:] + held)
    ctx = PassContext(model=model, calibration=calib, progress=False)
    model, _ = _run(model, ctx, "lowrank(ratio=0.3)")
    model, res = _run(model, ctx, "heal(steps=30,lr=1e-3,holdout=0.125)")
    assert res.notes["heldout_batches"] == 1 and res.notes["changed_initializers"] > 0
    assert res.notes["objective_after"] < res.notes["objective_before"]


@pytest.mark.parametrize("mode, train", [("blocks", "touched"), ("e2e", "all")])
def test_heal_with_lora_deltas_changes_each_matrix_by_at_most_their_rank(corpus_model, mode, train):
    """rank=R: the matrices train as frozen value + A @ B (LoRA), folded in when stored. On Qwen2 from torch's dynamo
    exporter after drop-blocks (block mode: the block after the dropped one trains; e2e: every weight), every
    changed 2-D weight differs from its value before heal by a matrix of rank at most R, the objective goes down,
    and the optimizer moved fewer numbers than the weights it changed hold."""
    path = corpus_model("qwen2/dynamo18")
    model, ctx = _setup(path)
    model, _ = _run(model, ctx, "drop-blocks(n=1)")
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    model, res = _run(model, ctx, f"heal(steps=30,lr=3e-3,rank=2,mode={mode},train={train})")
    notes = res.notes
    assert notes["mode"] == mode
    assert notes["objective_after"] < notes["objective_before"] and notes["changed_initializers"] > 0
    assert 0 < notes["trained_parameters"] < notes["changed_parameters"]
    changed = {n: v.const_value.numpy() for n, v in model.graph.initializers.items()
               if not np.array_equal(v.const_value.numpy(), before[n])}
    assert len(changed) == notes["changed_initializers"]
    matrices = [n for n, w in changed.items() if w.ndim == 2]
    assert matrices
    for n in matrices:
        delta = changed[n].astype(np.float64) - before[n]
        s = np.linalg.svd(delta, compute_uv=False)
        assert s[2] <= 1e-4 * s[0], (n, s[:4])


def test_e2e_targets_are_kept_in_float16_within_their_budget():
    from modelsurgeon.passes.heal import _TargetCache

    class Original:
        calls = 0

        def run(self, feeds):
            Original.calls += 1
            return {"logits": feeds["x"] * np.float32(1 / 3), "ids": feeds["x"].astype(np.int64)}

    batches = [{"x": np.full((2, 4, 8), i + 1, np.float32)} for i in range(3)]
    one = 2 * 4 * 8 * (2 + 8)  # a batch's outputs: float16 logits and int64 ids
    cache = _TargetCache(Original(), batches, budget=one)
    for b in (0, 0, 1, 1, 0):
        got = cache.get(b)
        assert got["logits"].dtype == torch.float32 and got["ids"].dtype == torch.int64
    assert Original.calls == 3  # batch 0 once and kept; batch 1 past the budget, computed each time
    expected = np.float32(np.float16(np.float32(1 / 3)))  # kept logits are the float16-rounded values
    assert float(cache.get(0)["logits"][0, 0, 0]) == expected
    assert float(cache.get(1)["logits"][0, 0, 0]) == pytest.approx(2 / 3, rel=1e-7)


def test_kl_on_the_originals_top_logits_bounds_the_full_kl_and_is_it_with_every_entry():
    from modelsurgeon.passes.heal import TopLogits, _kl

    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, 40, generator=g) * 3
    out = (target + torch.randn(2, 5, 40, generator=g)).requires_grad_(True)
    full = float(_kl(out.detach(), target))
    every = TopLogits.of(target.numpy(), 40).for_loss()
    assert float(_kl(out.detach(), every)) == pytest.approx(full, rel=1e-4)
    top = TopLogits.of(target.numpy(), 8).for_loss()
    assert 0.0 < float(_kl(out.detach(), top)) < full
    assert float(_kl(target, top)) == pytest.approx(0.0, abs=1e-5)  # the original matches its own top entries
    # the gradient pulls each top entry towards the original's probability: p - q there
    loss = _kl(out, top)
    loss.backward()
    p, q = torch.softmax(out.detach(), -1), torch.softmax(target, -1)
    idx = top.index
    expect = (torch.gather(p, -1, idx) - torch.gather(q, -1, idx)) / 10  # mean over the 10 tokens
    assert torch.allclose(torch.gather(out.grad, -1, idx), expect, atol=1e-5)


def test_e2e_targets_past_the_budget_are_kept_as_their_top_logits():
    from modelsurgeon.passes.heal import TopLogits, _TargetCache

    class Original:
        calls = 0

        def run(self, feeds):
            Original.calls += 1
            return {"logits": feeds["x"], "other": feeds["x"][..., :1].copy()}

    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((2, 4, 64)).astype(np.float32)} for _ in range(3)]
    full = 2 * 4 * 64 * 2 + 2 * 4 * 2  # a batch in float16
    top = 2 * 4 * 8 * (4 + 4) + 2 * 4 * 4 + 2 * 4 * 2  # K=8: int32 index, float32 log-probabilities, the rest's mass
    # room for one batch in full and two as their top 8: batch 0 (asked first) stays whole only because the two
    # batches not yet seen still fit as their top entries; none is recomputed (keeping batch 1 whole too, first
    # come first kept, would have left batch 2 to ONNX Runtime at every read)
    cache = _TargetCache(Original(), batches, budget=full + 2 * top, top=("logits",), top_k=8)
    for b in (0, 1, 2, 0, 1, 2):
        cache.get(b)
    assert Original.calls == 3 and cache.left == 0
    assert TopLogits.nbytes_of(batches[1]["x"], 8) == cache.kept[1]["logits"].nbytes == top - 2 * 4 * 2
    assert torch.is_tensor(cache.get(0)["logits"])
    assert all(isinstance(cache.get(b)["logits"], TopLogits) for b in (1, 2))
    assert cache.get(1)["logits"].index.dtype == torch.int64
    assert cache.get(1)["other"].dtype == torch.float32  # outputs not named stay whole
    # room for less: every batch as its top 8 while they fit; one that fits neither way is computed at each read
    Original.calls = 0
    cache = _TargetCache(Original(), batches, budget=full + top, top=("logits",), top_k=8)
    for b in (0, 1, 2, 0, 1, 2):
        got = cache.get(b)
    assert Original.calls == 4
    assert all(isinstance(cache.get(b)["logits"], TopLogits) for b in (0, 1))
    assert torch.is_tensor(got["logits"])
    kept = cache.get(1)["logits"]
    q = torch.log_softmax(torch.from_numpy(batches[1]["x"]), -1)
    assert torch.equal(kept.index, torch.topk(q, 8, -1).indices)
    rest = torch.log1p(-torch.exp(torch.logsumexp(kept.logq, -1)))
    assert torch.allclose(kept.log_rest, rest, atol=1e-5)
