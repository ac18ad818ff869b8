"""benchmarks/decode.py's measuring functions on small corpus decoders: what they time is what generation computes."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

from modelsurgeon.runtime import generate

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("decode_bench", ROOT / "benchmarks" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["llama/optimum-past", "qwen2/genai-int4"])
def test_prefill_decode_and_perplexity_match_generation(bench, corpus_model, name):
    path = generate.model_file(corpus_model(name))
    decoder = generate.Decoder(str(path), threads=1)
    rng = np.random.default_rng(0)
    vocab = 200
    prompt = rng.integers(3, vocab, (1, 12))
    pre, dec, tokens = bench.prefill_decode(decoder, prompt, 5)
    assert pre > 0 and dec > 0
    # the timed loop decodes the tokens greedy generation does (its first token comes from the prefill)
    np.testing.assert_array_equal(generate.greedy(decoder, prompt, 6)[0, 1:], tokens)
    windows = rng.integers(3, vocab, (3, 10))
    nll = np.concatenate([generate.cached_nll(decoder, w[None], prefill=3)[0] for w in windows], axis=1)
    assert bench.perplexity(decoder, windows) == pytest.approx(float(np.exp(nll.mean())), rel=1e-4)


def test_table_marks_refusals(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "decode.md").write_text("intro\n<!-- BEGIN RESULTS -->\nold\n<!-- END RESULTS -->\nrest\n")
    bench.write_table({"contexts": [128], "rows": [
        {"name": "a", "size_MiB": 10, "ppl": 12.5, "prefill_tps_128": 100.0, "decode_tps_128": 20.0},
        {"name": "b,fuse", "refused": "fuse: cannot"}]})
    text = (tmp_path / "docs" / "decode.md").read_text()
    assert "old" not in text and text.startswith("intro") and text.endswith("rest\n")
    assert "| a | 10 | - | 12.50 | 100.0 | 20.0 |" in text and "refused: fuse: cannot" in text


def test_paired_ratio_is_taken_within_rounds(bench, tmp_path, monkeypatch):
    """Per-round ratios: a row twice as fast as the anchor in every round is 2.0x even when the load moves both."""
    assert bench.paired_ratio([20.0, 10.0, 40.0], [10.0, 5.0, 20.0]) == 2.0
    assert bench.paired_ratio([10.0, 12.0, 30.0], [10.0, 10.0, 10.0]) == 1.2
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "decode.md").write_text("<!-- BEGIN RESULTS -->\n<!-- END RESULTS -->\n")
    bench.write_table({"contexts": [128], "rows": [
        {"name": "anchor", "size_MiB": 10, "ppl": 12.5, "prefill_tps_128": 100.0, "decode_tps_128": 20.0,
         "decode_vs_anchor_128": 1.0},
        {"name": "llama.cpp", "size_MiB": 9, "ppl": 12.0, "prefill_tps_128": 90.0, "decode_tps_128": 25.0}]})
    text = (tmp_path / "docs" / "decode.md").read_text()
    assert "decode / GenAI int4 @128 |" in text and "| 20.0 | 1.00x |" in text and "| 25.0 | - |" in text


def test_profile_splits_matmulnbits_by_weight_shape(bench, corpus_model):
    """The decode-step profile gives each MatMulNBits weight shape its own key, with as many calls per step as the
    graph has nodes of that shape, and a total that is the sum of its parts."""
    import collections

    import onnx

    path = generate.model_file(corpus_model("qwen2/genai-int4"))
    nodes = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
    expected = collections.Counter(
        f"MatMulNBits {onnx.helper.get_node_attr_value(n, 'K')}x{onnx.helper.get_node_attr_value(n, 'N')}" for n in nodes)
    assert len(expected) > 1
    prompt = np.random.default_rng(0).integers(3, 200, (1, 12))
    profile = bench.profile_decode(path, prompt, 3, path)
    for key, count in expected.items():
        assert profile[key] > 0
        assert profile[f"{key} calls"] == pytest.approx(count)
    parts = [v for k, v in profile.items() if k != "total" and not k.endswith(" calls")]
    assert profile["total"] == pytest.approx(sum(parts))
    assert "MatMulNBits" not in profile  # no node left unattributed to its shape


def test_rows_after_heal_compile_from_the_healed_model(bench):
    """The passes through the last heal are one stage (shared by rows with the same prefix), the rest a second."""
    heal = "heal(steps=2,lr=0.001,mode=e2e)"
    assert bench.split_after_heal(f"drop-blocks(n=2),{heal},quant4(algo=gptq,block=32)") == \
        (f"drop-blocks(n=2),{heal}", "quant4(algo=gptq,block=32)")
    assert bench.split_after_heal(f"{heal},prune(ffn=0.3),{heal},spquant(sparsity=0),quant4") == \
        (f"{heal},prune(ffn=0.3),{heal}", "spquant(sparsity=0),quant4")
    assert bench.split_after_heal(f"drop-blocks(n=2),{heal}") is None  # nothing after it: one stage
    assert bench.split_after_heal("quant4(algo=gptq,lm_head=true)") is None


def test_rows_healed_otherwise_do_not_share_their_rest(bench, corpus_model, tmp_path):
    """Two pipelines that differ before heal and agree after it: each row is compiled from its own healed model (the
    rest's work folder once lay beside every prefix's, and the second row reused the first's model)."""
    import onnx

    src = corpus_model("llama/dynamo18-kv")
    ids = np.random.default_rng(0).integers(3, 200, (8, 16))
    rest = "quant4(algo=gptq,lm_head=true,embeddings=true)"
    layers = {}
    for prefix in ("drop-blocks(n=1),heal(steps=1,mode=e2e)", "heal(steps=1,mode=e2e)"):
        info = bench.compile_ours(src, "dynamo", f"{prefix},{rest}", True, tmp_path, ids, False)
        assert info["stages"] == [prefix, rest]
        model = onnx.load(str(tmp_path / bench.slug(bench.row_name("dynamo", f"{prefix},{rest}", True)) / "model.onnx"),
                          load_external_data=False)
        layers[prefix] = len([i for i in model.graph.input if "past" in i.name]) // 2
    assert layers == {"drop-blocks(n=1),heal(steps=1,mode=e2e)": 1, "heal(steps=1,mode=e2e)": 2}
