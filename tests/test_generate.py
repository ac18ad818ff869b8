"""runtime/generate.py's cache kept as a generation runtime keeps it (`Decoder.new_cache`, `Decoder.step_kv`): one
past/present buffer per cache tensor where every cache input feeds GroupQueryAttention alone, the numpy path
elsewhere. Checked on graphs this project did not shape (GenAI's builder, Optimum) and on `fuse`'s output of a torch
dynamo export: the same logits as `Decoder.step`, step by step."""

from __future__ import annotations

import numpy as np
import pytest

from modelsurgeon.errors import UserError
from modelsurgeon.runtime.generate import Decoder, cached_nll, greedy, model_file


def numpy_steps(decoder: Decoder, prompt: np.ndarray, tokens: np.ndarray) -> list[np.ndarray]:
    logits, cache = decoder.step(prompt, decoder.empty_cache(len(prompt)))
    out = [logits]
    for t in tokens.T:
        logits, cache = decoder.step(t[:, None], cache)
        out.append(logits)
    return out


def kv_steps(decoder: Decoder, prompt: np.ndarray, tokens: np.ndarray, max_length: int) -> list[np.ndarray]:
    kv = decoder.new_cache(len(prompt), max_length)
    out = [decoder.step_kv(prompt, kv)]
    out += [decoder.step_kv(t[:, None], kv) for t in tokens.T]
    assert kv.length == prompt.shape[1] + tokens.shape[1]
    return out


@pytest.fixture(scope="module")
def fused_dynamo(tmp_path_factory):
    """llama/dynamo18-kv through `cleanup` and `fuse`: GroupQueryAttention reading the cache, as `compile` writes it."""
    import modelsurgeon
    from modelsurgeon.models import corpus

    try:
        src = corpus.entry("llama/dynamo18-kv").path()
    except corpus.Unavailable as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("fused") / "model.onnx"
    modelsurgeon.compile(str(src), passes="cleanup", verify=False, progress=False).save(out)
    return out


@pytest.mark.parametrize("name, shares", [("llama/genai-fp32", True), ("qwen2/genai-int4", True),
                                          ("gemma/genai-fp32", True), ("llama/optimum-past", False),
                                          ("llama/dynamo18-kv", False), ("fused", True)])
def test_step_kv_gives_the_logits_of_step(corpus_model, fused_dynamo, name, shares):
    path = fused_dynamo if name == "fused" else model_file(corpus_model(name))
    decoder = Decoder(str(path), threads=1)
    assert decoder.shares_buffer is shares
    rng = np.random.default_rng(1)
    prompt, tokens = rng.integers(3, 200, (2, 9)), rng.integers(3, 200, (2, 6))
    want = numpy_steps(decoder, prompt, tokens)
    got = kv_steps(decoder, prompt, tokens, max_length=40)  # a buffer longer than what is used: GenAI's max_length
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_a_second_generation_starts_from_an_empty_cache(corpus_model):
    """A new cache is a new buffer: generating again after a longer run gives the same tokens (nothing left over)."""
    decoder = Decoder(str(model_file(corpus_model("llama/genai-fp32"))), threads=1)
    prompt = np.random.default_rng(2).integers(3, 200, (1, 7))
    first = greedy(decoder, prompt, 6)
    greedy(decoder, np.random.default_rng(3).integers(3, 200, (1, 20)), 10)
    np.testing.assert_array_equal(greedy(decoder, prompt, 6), first)
    nll, pred = cached_nll(decoder, np.concatenate([prompt, first], axis=1), prefill=4)
    assert nll.shape == pred.shape == (1, 12) and np.isfinite(nll).all()


def test_a_step_past_the_buffer_is_refused(corpus_model):
    decoder = Decoder(str(model_file(corpus_model("llama/genai-fp32"))), threads=1)
    kv = decoder.new_cache(1, 8)
    decoder.step_kv(np.arange(3, 10)[None], kv)
    decoder.step_kv(np.array([[4]]), kv)
    with pytest.raises(UserError, match="holds 8 positions and this step needs 9"):
        decoder.step_kv(np.array([[5]]), kv)


def test_a_cache_whose_length_reaches_an_output_is_not_shared(fused_dynamo, tmp_path):
    """A reader of the cache's shape that is not a rotary table would see the buffer's length: no sharing."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(fused_dynamo))
    graph = model.graph
    assert Decoder(str(fused_dynamo)).shares_buffer
    head = next(n for n in graph.node if "logits" in n.output)
    head.output[list(head.output).index("logits")] = "logits_raw"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(2, np.int64), "two"))
    graph.node.extend([
        helper.make_node("Shape", ["past_key_values.0.key"], ["past_shape"]),
        helper.make_node("Gather", ["past_shape", "two"], ["past_len"]),
        helper.make_node("Cast", ["past_len"], ["past_len_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["logits_raw", "past_len_f"], ["logits"])])
    onnx.save(model, tmp_path / "m.onnx")
    decoder = Decoder(str(tmp_path / "m.onnx"), threads=1)
    assert not decoder.shares_buffer
    prompt, tokens = np.array([[5, 9, 3, 7]]), np.array([[4, 8]])
    for g, w in zip(kv_steps(decoder, prompt, tokens, 16), numpy_steps(decoder, prompt, tokens)):
        np.testing.assert_array_equal(g, w)  # the numpy path: the past length it adds is the real one
