"""Calibration data sources, synthesized inputs, activation capture."""

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from modelsurgeon import calibration as cal
from modelsurgeon.capture import ActivationCapture, capture
from modelsurgeon.errors import UserError
from modelsurgeon.runtime import run_model


def lm_like_model(vocab=50, dim=8) -> ir.Model:
    """Gather(emb, input_ids) * mask -> MatMul; inputs input_ids [b, s], attention_mask [b, s]."""
    rng = np.random.default_rng(0)
    emb = onnx.numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "emb")
    w = onnx.numpy_helper.from_array(rng.standard_normal((dim, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "ax"], ["m3"]),
             helper.make_node("Mul", ["e", "m3"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["logits"])]
    ax = onnx.numpy_helper.from_array(np.array([-1], np.int64), "ax")
    g = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                                        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 3])], [emb, w, ax])
    return ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


def test_synthesize_binds_symbolic_dims_and_respects_vocab():
    data = cal.synthesize(lm_like_model(vocab=50), num_samples=3, seq_len=7)
    assert data.arrays["input_ids"].shape == (3, 7) and data.arrays["input_ids"].dtype == np.int64
    assert data.arrays["input_ids"].max() < 50
    assert (data.arrays["attention_mask"] == 1).all()


def test_npz_and_folder(tmp_path, caplog):
    model = lm_like_model()
    ids = np.arange(40).reshape(4, 10) % 50
    np.savez(tmp_path / "a.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    data = cal.load_calibration(model, tmp_path / "a.npz")
    assert data.num_samples == 4
    (tmp_path / "d").mkdir()
    for i in range(3):
        np.savez(tmp_path / "d" / f"{i}.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    with caplog.at_level("WARNING", logger="modelsurgeon"):
        assert cal.load_calibration(model, tmp_path / "d", num_samples=100).num_samples == 12
        assert not [r for r in caplog.records if "first" in r.getMessage()]
        assert cal.load_calibration(model, tmp_path / "d", num_samples=5).num_samples == 5
    assert any("using the first 5 of its 12 samples" in r.getMessage() for r in caplog.records)  # never silently
    batches = list(cal.load_calibration(model, tmp_path / "d").batches(5))
    assert [len(b["input_ids"]) for b in batches] == [5, 5, 2]


def test_npz_problems_are_user_errors(tmp_path):
    model = lm_like_model()
    np.savez(tmp_path / "wrong.npz", tokens=np.zeros((2, 4), np.int64))
    with pytest.raises(UserError, match="lacks model input 'input_ids'"):
        cal.load_calibration(model, tmp_path / "wrong.npz")
    np.savez(tmp_path / "rank.npz", input_ids=np.zeros(4, np.int64), attention_mask=np.zeros(4, np.int64))
    with pytest.raises(UserError, match="rank 1"):
        cal.load_calibration(model, tmp_path / "rank.npz")
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(UserError, match="not a readable .npz"):
        cal.load_calibration(model, tmp_path / "junk.npz")
    with pytest.raises(UserError, match="needs --tokenizer"):
        (tmp_path / "t.txt").write_text("hello")
        cal.load_calibration(model, tmp_path / "t.txt")


def _word_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "to", "be", "or", "not", "that", "is", "the", "question"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_text_calibration_windows(tmp_path):
    tok = _word_tokenizer(tmp_path)
    text = tmp_path / "play.txt"
    text.write_text("to be or not to be\nthat is the question\n" * 10)
    data = cal.load_calibration(lm_like_model(), text, tokenizer=tmp_path, num_samples=4, seq_len=5)
    assert data.arrays["input_ids"].shape == (4, 5)
    assert data.arrays["input_ids"][0].tolist() == [1, 2, 3, 4, 1]
    assert (data.arrays["attention_mask"] == 1).all()
    with pytest.raises(UserError, match="fewer than one window"):
        cal.load_calibration(lm_like_model(), text, tokenizer=tok, seq_len=1000)


def test_text_folder_calibration_spreads_windows_over_the_texts(tmp_path):
    """A folder of .txt files: the first windows of each text (sorted by name), not many windows of the first."""
    tok = _word_tokenizer(tmp_path)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("to be or not to be\n" * 10)
    (texts / "b.txt").write_text("that is the question\n" * 10)
    (texts / "c.txt").write_text("to be\n")  # shorter than one window: skipped
    data = cal.load_calibration(lm_like_model(), texts, tokenizer=tok, num_samples=4, seq_len=4)
    assert data.arrays["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 1, 2], [5, 6, 7, 8], [5, 6, 7, 8]]
    assert "3 texts" in data.source
    with pytest.raises(UserError, match="needs --tokenizer"):
        cal.load_calibration(lm_like_model(), texts)
    with pytest.raises(UserError, match="none of the 3 calibration texts"):
        cal.load_calibration(lm_like_model(), texts, tokenizer=tok, seq_len=1000)


def test_missing_calibration_warns_and_synthesizes(caplog):
    with caplog.at_level(logging.WARNING, logger="modelsurgeon"):
        data = cal.load_calibration(lm_like_model(), None, num_samples=4)
    assert data.source == "synthesized" and data.num_samples == 4
    assert "synthesizing" in caplog.text


def test_capture_in_batches_matches_a_full_run():
    model = lm_like_model()
    data = cal.synthesize(model, num_samples=7, seq_len=5)
    got = capture(model, ["h", "e", "logits"], data, batch_size=3)
    full = run_model(model, data.arrays)
    assert got["h"].shape == (7, 5, 8)
    np.testing.assert_allclose(got["logits"], full["logits"], rtol=1e-6)
    emb = model.graph.initializers["emb"].const_value.numpy()
    np.testing.assert_array_equal(got["e"], emb[data.arrays["input_ids"]])
    sizes = [len(b["h"]) for b in ActivationCapture(model, ["h"]).iterate(data, batch_size=3)]
    assert sizes == [3, 3, 1]
    with pytest.raises(UserError, match="no value of that name"):
        ActivationCapture(model, ["nope"])
