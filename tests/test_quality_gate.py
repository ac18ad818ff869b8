"""Verification on samples the passes never saw, the report's task-aware quality line, and the quality gate."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx_ir as ir
import pytest

import modelsurgeon
from modelsurgeon import calibration as cal
from modelsurgeon.calibration import CalibrationData, from_token_ids
from modelsurgeon.cli import main
from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Option, Pass, PassResult, get_pass
from modelsurgeon.quality import DegradedError, choose
from modelsurgeon.runtime.session import run_model
from modelsurgeon.verify import compare_arrays


class _Noise(Pass):
    """Adds noise of `scale` standard deviations to every float matrix (a lossy pass whose damage is set by a dial),
    and records the calibration data it was given."""

    name = "test-noise"
    options = {"scale": Option(float, 0.1)}
    needs_calibration = True
    seen: list[CalibrationData] = []

    def run(self, model, ctx):
        type(self).seen.append(ctx.calibration)
        rng = np.random.default_rng(0)
        for v in list(model.graph.initializers.values()):
            a = v.const_value.numpy() if v.const_value is not None else None
            if a is None or a.ndim < 2 or a.dtype != np.float32:
                continue
            noisy = a + self.config["scale"] * a.std() * rng.standard_normal(a.shape)
            v.const_value = ir.tensor(noisy.astype(np.float32), name=v.name)
        return PassResult(model, self.config["scale"] > 0)


@pytest.fixture(scope="module")
def llama_text(reference_onnx):
    """The reference Llama and 16 windows of 24 tokens it generated greedily: data it predicts far better than
    chance (perplexity about 12 of 256 tokens), as a real model predicts real text."""
    path = reference_onnx("llama", opset=18)
    model = modelsurgeon.load(path)
    ids = np.random.default_rng(0).integers(0, 256, (16, 1))
    for _ in range(23):
        logits = run_model(model, from_token_ids(model, ids).arrays)["logits"]
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return path, ids


def _compile(path, passes, calib, **kw):
    return modelsurgeon.compile(str(path), passes, calibration=calib, progress=False, **kw)


# ------------------------------------------------------------------------------------------------ held-out data

def test_holdout_comes_after_the_calibration_samples_or_from_their_end(reference_onnx, tmp_path):
    model = modelsurgeon.load(reference_onnx("llama", opset=18))
    ids = np.arange(40 * 4, dtype=np.int64).reshape(40, 4) % 256
    # more samples than num_samples: the passes get exactly what load_calibration gives, the held-out ones follow
    rest, held, where = cal.load_with_holdout(model, {"input_ids": ids}, num_samples=32)
    plain = cal.load_calibration(model, {"input_ids": ids}, num_samples=32)
    np.testing.assert_array_equal(rest.arrays["input_ids"], plain.arrays["input_ids"])
    np.testing.assert_array_equal(held.arrays["input_ids"], ids[32:40])
    assert "8 held-out" in where and "after the 32" in where
    # no more than num_samples: the last quarter (at most 8) is held back; none below 4 samples
    rest, held, where = cal.load_with_holdout(model, {"input_ids": ids[:12]}, num_samples=32)
    assert rest.num_samples == 9 and np.array_equal(held.arrays["input_ids"], ids[9:12]) and "last 3" in where
    assert cal.load_with_holdout(model, {"input_ids": ids[:3]}, num_samples=32)[1] is None
    assert cal.load_with_holdout(model, {"input_ids": ids}, num_samples=32, holdout=0)[1] is None
    # text: the windows after the calibration's, in one text and in a folder of texts
    tok = tmp_path / "tokenizer.json"
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(200)]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tok))
    text = " ".join(words)
    (tmp_path / "a.txt").write_text(text)
    rest, held, _ = cal.load_with_holdout(model, tmp_path / "a.txt", tokenizer=tok, num_samples=8, seq_len=10)
    assert rest.arrays["input_ids"][0, 0] == 0 and rest.num_samples == 8
    assert held.num_samples == 2 and held.arrays["input_ids"][0, 0] == 80  # windows 8 and 9 of the text
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.txt").write_text(" ".join(words[i * 50:(i + 1) * 50]))
    rest, held, _ = cal.load_with_holdout(model, folder, tokenizer=tok, num_samples=8, seq_len=10)
    starts = set(rest.arrays["input_ids"][:, 0]) | set(held.arrays["input_ids"][:, 0])
    assert len(starts) == 10 and held.num_samples == 2  # disjoint windows


def test_report_errors_come_from_the_held_out_samples(llama_text):
    path, ids = llama_text
    _Noise.seen.clear()
    result = _compile(path, [_Noise(scale=0.05)], CalibrationData({"input_ids": ids}, "greedy"))
    assert _Noise.seen[0].num_samples == 12  # the passes calibrate on 12 of the 16 windows
    np.testing.assert_array_equal(_Noise.seen[0].arrays["input_ids"], ids[:12])
    row = result.report.rows[1]
    feeds = {"input_ids": ids[12:]}
    expected = compare_arrays(run_model(modelsurgeon.load(path), feeds)["logits"], run_model(result.model, feeds)["logits"])
    assert row.rel_l2 == pytest.approx(expected.rel_l2, rel=1e-5)
    assert "4 held-out sample(s) of greedy" in result.report.verified_on
    assert "errors measured on 4 held-out" in result.report.table()


# ------------------------------------------------------------------------------------------------ the metric

def test_quality_metric_is_chosen_from_the_outputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (4, 9))
    logits = rng.standard_normal((4, 9, 50)).astype(np.float32)
    logits[np.arange(4)[:, None], np.arange(8)[None, :], ids[:, 1:]] += 6  # the original predicts the next token
    q = choose({"input_ids": ids}, {"logits": logits, "present.0.key": np.zeros((4, 2, 9, 8), np.float32)})
    assert q.kind == "ppl" and q.output == "logits" and q.gate_off == ""
    worse = logits.copy()
    worse[..., 0] += 3

    def ppl(z):
        z = z[:, :-1].astype(np.float64)
        lp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
        return np.exp(-np.mean(np.take_along_axis(lp, ids[:, 1:, None], -1)))

    assert q.value({"logits": logits}) == pytest.approx(1.0)
    assert q.value({"logits": worse}) == pytest.approx(ppl(worse) / ppl(logits), rel=1e-9)
    assert q.reference_ppl == pytest.approx(ppl(logits), rel=1e-9) and q.tokens == 32
    # random ids, which the original predicts no better than chance: no perplexity shown, no gate
    flat = choose({"input_ids": ids}, {"logits": rng.standard_normal((4, 9, 50)).astype(np.float32)})
    assert flat.kind == "rel-l2" and "no better than chance" in flat.note and flat.gate_off
    assert choose({"input_ids": ids}, {"logits": logits}, real_data=False).kind == "rel-l2"

    # an encoder: mean cosine per sample of the mask-pooled embedding
    hidden = rng.standard_normal((3, 5, 8))
    mask = np.ones((3, 5), np.int64)
    mask[0, 3:] = 0
    enc = choose({"input_ids": ids[:3, :5], "attention_mask": mask}, {"last_hidden_state": hidden})
    assert enc.kind == "cosine"
    other = hidden.copy()
    other[0, 3:] = -100  # padding positions do not count
    other[1] *= -1
    assert enc.value({"last_hidden_state": other}) == pytest.approx((1 - 1 + 1) / 3)

    # a classifier, and a plain output
    cls = choose({"pixels": np.zeros((4, 3), np.float32)}, {"logits": np.eye(4, 6, dtype=np.float32)})
    assert cls.kind == "top1" and cls.value({"logits": np.eye(4, 6, k=1, dtype=np.float32)}) == 0.0
    plain = choose({"x": np.zeros((4, 3), np.float32)}, {"y": np.eye(4, 6, dtype=np.float32)})
    assert plain.kind == "rel-l2" and "no task metric" in plain.gate_off
    assert choose({"x": np.zeros((4, 3), np.float32)}, {"y": np.eye(4, 6, dtype=np.float32)}, requested="top1").kind == "top1"
    with pytest.raises(UserError, match="--quality ppl needs logits"):
        choose({"x": np.zeros((4, 3), np.float32)}, {"y": np.eye(4, 6, dtype=np.float32)}, requested="ppl")


# ------------------------------------------------------------------------------------------------ the gate

def test_gate_warns_stops_and_keeps_with_allow_degraded(llama_text, caplog):
    path, ids = llama_text
    calib = CalibrationData({"input_ids": ids}, "greedy")
    with caplog.at_level(logging.WARNING, logger="modelsurgeon"):
        mild = _compile(path, [_Noise(scale=0.05)], calib)
    assert mild.report.quality["metric"] == "ppl" and mild.report.quality["gate"] == "on"
    assert 0.8 < mild.report.final.quality < 2 and not caplog.records  # measured 0.96x
    assert mild.report.rows[0].quality == 1.0 and "ppl ratio" in mild.report.table()
    with caplog.at_level(logging.WARNING, logger="modelsurgeon"):
        warned = _compile(path, [_Noise(scale=0.3)], calib)
    assert 2 < warned.report.final.quality < 10  # measured 4.0x
    assert [r.getMessage() for r in caplog.records if "warning level 2x" in r.getMessage()][0].startswith("test-noise")
    with pytest.raises(DegradedError, match=r"pass 'test-noise\(scale=1.0\)' degraded the model past the quality "
                                            r"floor: .*x the original's perplexity on 4 held-out .*--allow-degraded"):
        _compile(path, [_Noise(scale=1.0)], calib)
    kept = _compile(path, [_Noise(scale=1.0)], calib, allow_degraded=True)
    assert kept.report.final.quality > 10 and kept.report.quality["degraded"] == ["test-noise(scale=1.0)"]
    assert "DEGRADED" in kept.report.table()
    with pytest.raises(DegradedError, match=r"floor 1.5x"):  # --min-quality moves the floor
        _compile(path, [_Noise(scale=0.3)], calib, min_quality=1.5)


class _Restore(Pass):
    """A recovery pass that puts the original's weights back (a perfect heal), or with `undo=False` changes nothing."""

    name = "test-restore"
    options = {"undo": Option(bool, True)}
    recovers = True

    def run(self, model, ctx):
        if self.config["undo"]:
            for name, v in ctx.original.graph.initializers.items():
                model.graph.initializers[name].const_value = v.const_value
        return PassResult(model, self.config["undo"])


def test_gate_waits_for_a_recovery_pass_later_in_the_pipeline(llama_text, caplog):
    """A pass past the floor with heal (a pass that `recovers`) after it is warned, not stopped: the floor is judged
    after the recovery, which here brings the model back; a recovery that does not is reported against the pass that
    crossed the floor."""
    path, ids = llama_text
    calib = CalibrationData({"input_ids": ids}, "greedy")
    with caplog.at_level(logging.WARNING, logger="modelsurgeon"):
        healed = _compile(path, [_Noise(scale=1.0), _Restore()], calib)
    assert healed.report.rows[1].quality > 10 and healed.report.final.quality == pytest.approx(1.0, abs=1e-3)
    assert any(r.getMessage().startswith("test-noise(scale=1.0) took the model past the quality floor") and
               "test-restore comes later" in r.getMessage() for r in caplog.records)
    with pytest.raises(DegradedError, match=r"pass 'test-noise\(scale=1.0\)' degraded .* after "
                                            r"test-restore\(undo=False\), which did not bring it back .*give "
                                            r"test-restore\(undo=False\) more steps"):
        _compile(path, [_Noise(scale=1.0), _Restore(undo=False)], calib)
    # past the warning level alone (4x): no warning before the recovery, none after one that brings the model back,
    # and one that names the pass after one that does not
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modelsurgeon"):
        _compile(path, [_Noise(scale=0.3), _Restore()], calib)
    assert not [r for r in caplog.records if "warning level" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="modelsurgeon"):
        kept = _compile(path, [_Noise(scale=0.3), _Restore(undo=False)], calib)
    warned = [r.getMessage() for r in caplog.records if "warning level" in r.getMessage()]
    assert 2 < kept.report.final.quality < 10 and len(warned) == 1
    assert warned[0].startswith("test-noise(scale=0.3) left the model at") and "after test-restore(undo=False)" in \
        warned[0] and "give test-restore(undo=False) more steps" in warned[0]
    # the real heal declares itself a recovery pass
    assert get_pass("heal").recovers and not get_pass("prune").recovers


def test_gate_is_off_on_synthesized_inputs(llama_text, caplog):
    path, _ = llama_text
    with caplog.at_level(logging.WARNING, logger="modelsurgeon"):
        result = _compile(path, [_Noise(scale=3.0)], None)  # 1000x perplexity on text; random ids measure nothing
    assert result.report.quality["metric"] == "rel-l2" and "random token ids" in result.report.quality["note"]
    assert any("synthesizing random inputs" in r.getMessage() and "quality gate" in r.getMessage() for r in caplog.records)
    assert "synthesized" in result.report.verified_on and "perplexity not shown" in result.report.table()
    with pytest.raises(UserError, match="--min-quality needs"):
        _compile(path, [_Noise(scale=0.1)], None, min_quality=5)
    with pytest.raises(UserError, match="drop --no-verify"):
        _compile(path, [_Noise(scale=0.1)], None, verify=False, quality="ppl")


def test_cli_gate_exit_1_writes_nothing_and_allow_degraded_writes(llama_text, tmp_path, capsys):
    path, ids = llama_text
    np.savez(tmp_path / "calib.npz", input_ids=ids)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    args = ["compile", str(path), "-o", str(out), "--passes", "drop-blocks(n=1)", "--calib", str(tmp_path / "calib.npz"),
            "--report", str(report), "--min-quality", "1.01"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "pass 'drop-blocks(n=1)' degraded the model past the quality floor" in err and "floor 1.01x" in err
    assert not out.exists() and not report.exists() and list(tmp_path.iterdir()) == [tmp_path / "calib.npz"]
    assert main(args + ["--allow-degraded", "-q"]) == 0
    data = json.loads(report.read_text())
    assert data["quality"]["degraded"] == ["drop-blocks(n=1)"] and data["summary"]["quality"] > 1.01
    assert "held-out" in data["verified_on"] and out.exists()
    assert main(["compile", str(path), "-o", str(out), "--passes", "cleanup", "--quality", "bogus"]) == 2


def test_gate_on_an_encoder_from_another_exporter(corpus_model):
    """Optimum's BERT (TorchScript underneath): the embedding cosine on held-out samples gates lowrank."""
    path = corpus_model("bert/optimum")
    model = modelsurgeon.load(path)
    feeds = cal.synthesize(model, num_samples=16, seq_len=12, seed=5).arrays
    calib = CalibrationData(feeds, "sentences")  # given data: the gate is on
    result = _compile(path, "lowrank(ratio=0.5)", calib)
    q = result.report.quality
    assert q["metric"] == "cosine" and q["gate"] == "on" and "4 held-out" in q["data"]
    cos = result.report.final.quality
    assert 0 < cos < 1
    with pytest.raises(DegradedError, match="embedding cosine"):
        _compile(path, "lowrank(ratio=0.5)", calib, min_quality=min(1.0, cos + 1e-3))
