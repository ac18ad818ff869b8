"""The interpreter's com.microsoft GroupQueryAttention (modelsurgeon.onnx_torch_attention) against ONNX Runtime's CPU
kernel: one-node models over prompts, padded prompts, decode steps with a longer cache, separate q/k/v, local windows,
softcap and smooth softmax; and the GenAI builder's whole graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

from modelsurgeon import onnx_torch
from modelsurgeon.errors import UserError
from modelsurgeon.runtime.session import make_session

HEADS, KV_HEADS, SIZE, MAX_POSITIONS = 4, 2, 16, 32


def _gqa_model(packed: bool, rotary: bool, **attrs) -> onnx.ModelProto:
    names = ["query", "key", "value"] if not packed else ["query", "", ""]
    names += ["past_key", "past_value", "seqlens_k", "total_sequence_length"]
    names += ["cos_cache", "sin_cache"] if rotary else []
    node = helper.make_node("GroupQueryAttention", names, ["output", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS,
                            do_rotary=int(rotary), **attrs)
    f = TensorProto.FLOAT
    q_width = (HEADS + 2 * KV_HEADS) * SIZE if packed else HEADS * SIZE
    inputs = [helper.make_tensor_value_info("query", f, ["b", "s", q_width])]
    if not packed:
        inputs += [helper.make_tensor_value_info(n, f, ["b", "s", KV_HEADS * SIZE]) for n in ("key", "value")]
    inputs += [helper.make_tensor_value_info(n, f, ["b", KV_HEADS, "p", SIZE]) for n in ("past_key", "past_value")]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
               helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    inits = []
    if rotary:
        angles = np.arange(MAX_POSITIONS)[:, None] / 10000 ** (np.arange(SIZE // 2) / (SIZE // 2))
        inits = [helper.make_tensor("cos_cache", f, angles.shape, np.cos(angles).astype(np.float32).ravel()),
                 helper.make_tensor("sin_cache", f, angles.shape, np.sin(angles).astype(np.float32).ravel())]
    outputs = [helper.make_tensor_value_info("output", f, None),
               helper.make_tensor_value_info("present_key", f, None),
               helper.make_tensor_value_info("present_value", f, None)]
    graph = helper.make_graph([node], "gqa", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def _feeds(packed: bool, seq: int, lengths: list[int], past: int, total: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    q_width = (HEADS + 2 * KV_HEADS) * SIZE if packed else HEADS * SIZE
    feeds = {"query": rng.standard_normal((batch, seq, q_width), dtype=np.float32)}
    if not packed:
        feeds["key"] = rng.standard_normal((batch, seq, KV_HEADS * SIZE), dtype=np.float32)
        feeds["value"] = rng.standard_normal((batch, seq, KV_HEADS * SIZE), dtype=np.float32)
    feeds["past_key"] = rng.standard_normal((batch, KV_HEADS, past, SIZE), dtype=np.float32)
    feeds["past_value"] = rng.standard_normal((batch, KV_HEADS, past, SIZE), dtype=np.float32)
    feeds["seqlens_k"] = np.array(lengths, dtype=np.int32) - 1
    feeds["total_sequence_length"] = np.array(total, dtype=np.int32)
    return feeds


CASES = {
    # name: (packed, rotary, attributes, seq, row lengths, past length, total_sequence_length)
    "prompt": (True, True, {}, 5, [5, 5], 0, 5),
    "padded-prompt": (True, True, {}, 5, [5, 3], 0, 5),
    "decode-longer-cache": (True, True, {}, 1, [7, 5], 6, 7),
    "subsequent-prompt": (True, True, {}, 3, [7], 4, 7),
    "separate-qkv-window-softcap": (False, False, {"local_window_size": 2, "softcap": 5.0}, 6, [6, 6], 0, 6),
    "interleaved-smooth-softmax": (False, True, {"rotary_interleaved": 1, "smooth_softmax": 1}, 4, [4], 0, 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_group_query_attention_matches_onnx_runtime(case):
    packed, rotary, attrs, seq, lengths, past, total = CASES[case]
    proto = _gqa_model(packed, rotary, **attrs)
    feeds = _feeds(packed, seq, lengths, past, total)
    ref = make_session(ir.from_proto(proto)).run(None, feeds)
    with torch.no_grad():
        got = onnx_torch.graph_function(ir.from_proto(proto))(onnx_torch.feeds_to_torch(feeds))
    output, present_key, present_value = (got[n].numpy() for n in ("output", "present_key", "present_value"))
    assert present_key.shape == ref[1].shape and present_value.shape == ref[2].shape
    first_prompt = seq == total
    for b, length in enumerate(lengths):
        valid = min(length, seq) if first_prompt else seq  # padded rows of a first prompt are undefined in ORT
        np.testing.assert_allclose(output[b, :valid], ref[0][b, :valid], atol=2e-5, rtol=1e-4)
        # the cache is defined up to the row's length (ONNX Runtime leaves zeros or the new tokens past it)
        np.testing.assert_allclose(present_key[b, :, :length], ref[1][b, :, :length], atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(present_value[b, :, :length], ref[2][b, :, :length], atol=2e-5, rtol=1e-4)


def test_group_query_attention_passes_gradients_to_query_and_cache():
    proto = _gqa_model(True, True)
    feeds = onnx_torch.feeds_to_torch(_feeds(True, 1, [4, 3], 3, 4))
    for name in ("query", "past_key", "past_value"):
        feeds[name].requires_grad_(True)
    out = onnx_torch.graph_function(ir.from_proto(proto))(feeds)
    (out["output"].square().sum() + out["present_key"].sum()).backward()
    past_grad = feeds["past_value"].grad
    assert float(feeds["query"].grad.abs().sum()) > 0 and float(feeds["past_key"].grad.abs().sum()) > 0
    # row 1 has 2 cached positions: the third is past its length and reaches nothing
    assert float(past_grad[1, :, :2].abs().sum()) > 0 and float(past_grad[1, :, 2:].abs().sum()) == 0


def test_group_query_attention_refuses_inputs_it_does_not_implement():
    proto = _gqa_model(True, True)
    node = proto.graph.node[0]
    node.input.extend(["seqlens_k"])  # a 10th input: position_ids
    with pytest.raises(UserError, match="position_ids"):
        onnx_torch.graph_function(ir.from_proto(proto))(onnx_torch.feeds_to_torch(_feeds(True, 2, [2], 0, 2)))
