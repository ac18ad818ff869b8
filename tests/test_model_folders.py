"""GenAI and Optimum decoder folders in and out (compiler/model_folder.py), drop-blocks on KV-cache decoders, and the
generation check (`eval --task generate`, runtime/generate.py).

Folders come from the exporter corpus: `llama/genai-fp32` is a GenAI builder folder (genai_config.json, model.onnx
+ .data, a tiny tokenizer); an Optimum folder is `llama/optimum-past`'s model.onnx with the same seeded Llama's
config.json (as Optimum writes it) and that tokenizer. GenAI folders are run by onnxruntime_genai itself.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import numpy as np
import onnx
import pytest

from modelsurgeon.runtime.generate import Decoder, cached_nll, greedy

PROMPT = "hello world, this is"
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "use_cache": True,
                "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def genai_folder():
    from modelsurgeon.models import corpus

    try:
        return corpus.entry("llama/genai-fp32").path().parent
    except corpus.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def optimum_folder(tmp_path_factory, genai_folder):
    from modelsurgeon.models import corpus

    try:
        model = corpus.entry("llama/optimum-past").path()
    except corpus.Unavailable as exc:
        pytest.skip(str(exc))
    folder = tmp_path_factory.mktemp("optimum") / "llama"
    folder.mkdir()
    shutil.copy(model, folder / "model.onnx")
    config = dict(LLAMA_CONFIG, layer_types=["full_attention", "full_attention"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(genai_folder / name, folder / name)
    return folder


def digest(folder: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def genai_tokens(folder: pathlib.Path, n: int = 8) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    ids = og.Tokenizer(model).encode(PROMPT)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(ids):]


def io_names(model_path: pathlib.Path) -> tuple[list[str], list[str]]:
    m = onnx.load(str(model_path), load_external_data=False)
    return [i.name for i in m.graph.input], [o.name for o in m.graph.output]


def test_genai_cleanup_generates_the_same_tokens(cli, genai_folder, tmp_path):
    before = digest(genai_folder)
    code, _, err = cli("-q", "compile", genai_folder, "--passes", "cleanup", "-o", tmp_path / "out")
    assert code == 0, err
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in genai_folder.iterdir())
    assert json.loads((out / "genai_config.json").read_text()) == json.loads((genai_folder / "genai_config.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (genai_folder / "tokenizer.json").read_bytes()
    reference = genai_tokens(genai_folder)
    assert len(reference) == 8 and genai_tokens(out) == reference
    assert digest(genai_folder) == before  # not a byte of the input changed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".modelsurgeon")]  # no temporary left


@pytest.mark.parametrize("passes,config", [
    ("drop-blocks(n=1)", {"num_hidden_layers": 1}),
    ("drop-blocks(n=1),quant4", {"num_hidden_layers": 1}),
    ("quant4", {}),
    ("slice(sparsity=0.25)", {"hidden_size": 48}),
    ("prune(ffn=0.5)", {}),  # the MLP width: genai_config.json has no field for it
    ("share(groups=2)", {}),
    ("lowrank(ratio=0.3)", {}),
    # each structural pass followed by quant4, as a folder ships
    ("slice(sparsity=0.25),quant4", {"hidden_size": 48}),
    ("prune(ffn=0.5),quant4", {}),
    ("share(groups=2),quant4", {}),
    ("lowrank(ratio=0.3),quant4", {}),
])
def test_compiled_genai_folders_load_and_generate(cli, genai_folder, tmp_path, passes, config):
    code, _, err = cli("-q", "compile", genai_folder, "--passes", passes, "-o", tmp_path / "out")
    assert code == 0, err
    out = tmp_path / "out"
    want = json.loads((genai_folder / "genai_config.json").read_text())
    want["model"]["decoder"].update(config)
    assert json.loads((out / "genai_config.json").read_text()) == want
    layers = want["model"]["decoder"]["num_hidden_layers"]
    inputs, outputs = io_names(out / "model.onnx")
    assert sorted(n for n in inputs if n.startswith("past")) == sorted(
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value"))  # renumbered from 0
    assert sorted(n for n in outputs if n.startswith("present")) == sorted(
        f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value"))
    tokens = genai_tokens(out)
    assert len(tokens) == 8
    # our decode loop, sized from the written config, agrees with GenAI's own
    decoder = Decoder(out / "model.onnx")
    og = pytest.importorskip("onnxruntime_genai")
    ids = np.array([og.Tokenizer(og.Model(str(out))).encode(PROMPT)], np.int64)
    assert greedy(decoder, ids, 8)[0].tolist() == tokens


def test_drop_blocks_removes_the_cache_of_removed_blocks(cli, corpus_model, tmp_path):
    """Before: the removed block's attention stayed in the graph, computing present.N for a block no longer there."""
    src = corpus_model("llama/dynamo18-kv")
    code, _, err = cli("-q", "compile", src, "--passes", "drop-blocks(n=1)", "-o", tmp_path / "m.onnx")
    assert code == 0, err
    inputs, outputs = io_names(tmp_path / "m.onnx")
    past, present = [n for n in inputs if "past" in n], [n for n in outputs if "present" in n]
    assert len(past) == len(present) == 2  # one layer's key and value, under their own names (a plain file)
    layer = past[0].split(".")[1]
    assert sorted(past) == [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
    assert sorted(present) == [f"present.{layer}.key", f"present.{layer}.value"]
    m = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    dec = Decoder(tmp_path / "m.onnx")
    ids = np.array([[5, 9, 3, 7, 11, 2, 8, 4]], np.int64)
    full, _ = dec.step(ids, dec.empty_cache(1))
    nll, pred = cached_nll(dec, ids, 3)
    np.testing.assert_array_equal(pred[0], full[0, :-1].argmax(-1))  # its cache still works step by step
    assert len(m.graph.output) == 3


def test_optimum_folder_in_and_out(cli, optimum_folder, tmp_path):
    before = digest(optimum_folder)
    code, _, err = cli("-q", "compile", optimum_folder, "--passes", "cleanup", "-o", tmp_path / "clean")
    assert code == 0, err
    code, _, err = cli("-q", "compile", optimum_folder, "--passes", "drop-blocks(n=1)", "-o", tmp_path / "drop")
    assert code == 0, err
    assert digest(optimum_folder) == before
    files = {"config.json", "generation_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in (tmp_path / "clean").iterdir()} >= files
    config = json.loads((tmp_path / "drop" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["layer_types"] == ["full_attention"]
    assert "drop-blocks(n=1)" in config["modelsurgeon"]["passes"]
    inputs, _ = io_names(tmp_path / "drop" / "model.onnx")
    assert sorted(n for n in inputs if n.startswith("past")) == ["past_key_values.0.key", "past_key_values.0.value"]
    ids = np.array([[5, 9, 3, 7, 11, 2, 8, 4]], np.int64)
    original = greedy(Decoder(optimum_folder / "model.onnx"), ids, 6)
    assert greedy(Decoder(tmp_path / "clean" / "model.onnx"), ids, 6).tolist() == original.tolist()
    assert greedy(Decoder(tmp_path / "drop" / "model.onnx"), ids, 6).shape == (1, 6)


def test_optimum_slice_keeps_the_cache_size_optimum_reads(cli, optimum_folder, tmp_path):
    """ORTModelForCausalLM sizes its empty cache as hidden_size // num_attention_heads: after slice the residual
    width (48) goes under modelsurgeon.hidden_width and hidden_size stays 4 heads x 16."""
    code, _, err = cli("-q", "compile", optimum_folder, "--passes", "slice(sparsity=0.25)", "-o", tmp_path / "out")
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["modelsurgeon"]["hidden_width"] == 48
    dec = Decoder(tmp_path / "out" / "model.onnx")
    assert dec.cache_dims == [(2, 16)] * 4
    assert greedy(dec, np.array([[5, 9, 3]], np.int64), 4).shape == (1, 4)


def test_refusals_write_nothing(cli, genai_folder, tmp_path):
    # a config without the field a pass changed
    broken = tmp_path / "broken"
    shutil.copytree(genai_folder, broken)
    config = json.loads((broken / "genai_config.json").read_text())
    del config["model"]["decoder"]["num_hidden_layers"]
    (broken / "genai_config.json").write_text(json.dumps(config))
    code, _, err = cli("-q", "compile", broken, "--passes", "drop-blocks(n=1)", "-o", tmp_path / "out")
    assert code == 2 and "num_hidden_layers" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    # the output inside the input folder, a non-model folder, an output folder of something else
    code, _, err = cli("-q", "compile", genai_folder, "--passes", "cleanup", "-o", genai_folder / "out")
    assert code == 2 and "input folder" in err
    (tmp_path / "plain").mkdir()
    code, _, err = cli("-q", "compile", tmp_path / "plain", "--passes", "cleanup", "-o", tmp_path / "out")
    assert code == 2 and "not a model folder" in err
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    code, _, err = cli("-q", "compile", genai_folder, "--passes", "cleanup", "-o", tmp_path / "docs")
    assert code == 2 and "holds other files" in err and (tmp_path / "docs" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "docs", "plain"]


def test_eval_generate(cli, genai_folder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog, " * 60)
    assert cli("-q", "compile", genai_folder, "--passes", "cleanup", "-o", tmp_path / "clean")[0] == 0
    assert cli("-q", "compile", genai_folder, "--passes", "drop-blocks(n=1)", "-o", tmp_path / "drop")[0] == 0
    common = ["--reference", genai_folder, "--task", "generate", "--data", text, "--tokenizer", genai_folder,
              "--num-samples", "4", "--seq-len", "24", "--gen-tokens", "6", "--json"]
    code, out, err = cli("eval", tmp_path / "clean", *common)
    assert code == 0, err
    same = json.loads(out)["metrics"]
    assert same["token_agreement"] == 1.0 and same["tokens_before_divergence"] == 6
    assert same["perplexity_ratio"] == pytest.approx(1.0, abs=1e-6)
    code, out, err = cli("eval", tmp_path / "drop", *common)
    assert code == 0, err
    dropped = json.loads(out)["metrics"]
    assert dropped["token_agreement"] < 1.0 and dropped["perplexity_ratio"] != pytest.approx(1.0, abs=1e-3)
    # the cached decode path computes the same perplexity as one pass over each whole window (the lm task)
    code, out, err = cli("eval", genai_folder / "model.onnx", "--task", "lm", "--data", text, "--tokenizer",
                         genai_folder, "--num-samples", "4", "--seq-len", "24", "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"]["perplexity"] == pytest.approx(same["perplexity_reference"], rel=1e-4)
