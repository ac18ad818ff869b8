"""The failures issue 15 quoted from other exporters' graphs, each kept as a regression test on the corpus model
of the same exporter (tiny random-weight models with the exporter's real graph structure; models/corpus.py):

- Optimum's decoder with a KV cache: quant8 and lowrank ended in `internal error: SerdeError`, quant4(algo=gptq)
  and spquant in "Model input (...) does not have type information", slice, drop-blocks and share found no
  transformer blocks; Optimum's BERT (feature-extraction): the same internal errors;
- ONNX Runtime GenAI's builder: every pass failed, cleanup included ("No Op registered for
  SimplifiedLayerNormalization"), and the block finder found no token embedding;
- graphs built with `onnx.helper` without value_info: quant8 and quant4(format=qdq) at opsets 17-23 are
  tests/test_foreign_graphs.py::test_helper_graph_compiles_with_calibrated_and_qdq_quantization;
- slice on SmolLM2 exported with Hugging Face's (input_ids, attention_mask) signature, and on Optimum's export:
  tests/test_slice.py::test_smollm2_slices_the_same_from_other_exporters (real model).
"""

from __future__ import annotations

import onnx_ir as ir
import pytest

from modelsurgeon import model_io
from modelsurgeon.analyses.blocks import find_blocks
from modelsurgeon.canonical import canonicalize
from modelsurgeon.models import corpus
from modelsurgeon.value_types import complete_types

DECODER_PASSES = ("quant8", "lowrank", "quant4(algo=gptq)", "spquant", "slice", "drop-blocks(n=1)", "share")
ENCODER_PASSES = ("quant8", "lowrank", "quant4(algo=gptq)", "spquant")


def _verified(path, spec: str) -> corpus.Outcome:
    outcome = corpus.run_cell(path, spec)
    assert outcome.status == "verified", f"{spec}: {outcome.expectation()}"
    assert outcome.modified, f"{spec} verified without changing the model"
    return outcome


@pytest.mark.slow
@pytest.mark.parametrize("spec", DECODER_PASSES)
def test_optimum_decoder_with_kv_cache(corpus_model, spec):
    _verified(corpus_model("llama/optimum-past"), spec)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ENCODER_PASSES)
def test_optimum_feature_extraction_encoder(corpus_model, spec):
    _verified(corpus_model("bert/optimum"), spec)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ("cleanup", "quant8", "lowrank", "drop-blocks(n=1)", "slice"))
def test_genai_builder_decoder(corpus_model, spec):
    outcome = corpus.run_cell(corpus_model("llama/genai-fp32"), spec)
    assert outcome.status == "verified", f"{spec}: {outcome.expectation()}"


def test_genai_builder_decoder_has_a_token_embedding_and_blocks(corpus_model):
    model = model_io.load(corpus_model("llama-tied/genai-fp32"))  # the tied table is gathered through a Transpose
    complete_types(model)
    canonicalize(model)
    tb = find_blocks(model)
    assert tb.embedding is not None and tb.lm_head is not None and len(tb.blocks) == 2, tb.problems
    assert not [n for n in model.graph if n.domain == "com.microsoft" and n.op_type.startswith("Skip")]
    assert isinstance(tb.embedding.output, ir.Value)
