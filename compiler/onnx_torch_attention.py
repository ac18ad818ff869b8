"""Fused attention ops for the torch interpreter (modelsurgeon.onnx_torch): com.microsoft GroupQueryAttention.

GroupQueryAttention is how ONNX Runtime GenAI's model builder (and our `fuse` pass) writes a decoder's attention: one
node takes the projected query/key/value (packed in one tensor or as three), the KV cache, `seqlens_k` (each row's
total length minus one) and `total_sequence_length`, applies rotary embeddings from a cos/sin cache, and returns the
attention output and the new cache. The semantics follow ONNX Runtime's CPU kernel, which is the reference `heal`
and the compiler's verification compare against:

- rows are right-padded; row b holds `seqlens_k[b] + 1` valid positions in all. On the first prompt
  (`sequence_length == total_sequence_length`) nothing is cached; otherwise the row's cached length is its total
  minus the new tokens, and the cache tensor may be longer (its tail is ignored).
- rotary position of new token s: cached length + s (1 for padded positions of a first prompt, as ONNX Runtime does).
- present key/value: `[batch, kv_heads, max(total_sequence_length, past length), head_size]`, zero past each row's
  valid length, new keys written after the row's cached ones.
- query head h reads key/value head `h // (num_heads / kv_num_heads)`; token s attends to cached positions and new
  ones up to itself (`local_window_size` > 0 keeps the last `local_window_size` of them, itself included, as
  ONNX Runtime 1.32 does); `softcap` > 0 applies
  `softcap * tanh(score / softcap)` before the softmax, `smooth_softmax` adds a zero logit to it.

Outputs of padded rows of a first prompt are not defined by ONNX Runtime (it reads scores it never computed), so they
can differ; real tokens match. The optional position_ids, attention_bias and head_sink inputs are refused by name.
"""

from __future__ import annotations

import math

import torch

from modelsurgeon.errors import UserError
from modelsurgeon.onnx_torch import _attr, _op

_UNSUPPORTED_INPUTS = {9: "position_ids", 10: "attention_bias", 11: "head_sink"}


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of x [..., head_size] by cos/sin [..., rotary_dim / 2] (broadcast); the dimensions past
    rotary_dim pass through. Interleaved: pairs (2i, 2i+1); otherwise halves (i, i + rotary_dim / 2)."""
    half = cos.shape[-1]
    rotated, rest = x[..., :2 * half], x[..., 2 * half:]
    if interleaved:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        x1, x2 = rotated[..., :half], rotated[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, seq, heads * size] -> [batch, heads, seq, size]."""
    b, s, hidden = x.shape
    return x.reshape(b, s, heads, hidden // heads).transpose(1, 2)


@_op("com.microsoft:GroupQueryAttention")
def _group_query_attention(node, xs, g):
    xs = list(xs) + [None] * (12 - len(xs))
    for index, name in _UNSUPPORTED_INPUTS.items():
        if xs[index] is not None:
            raise UserError(f"the torch interpreter runs GroupQueryAttention without its {name} input (node "
                            f"{node.name!r}); models that feed it cannot be run in torch")
    query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache = xs[:9]
    heads, kv_heads = int(_attr(node, "num_heads")), int(_attr(node, "kv_num_heads"))
    batch, seq, hidden = query.shape
    if key is None:  # packed: [q | k | v] along the hidden axis
        size = hidden // (heads + 2 * kv_heads)
        query, key, value = query.split([heads * size, kv_heads * size, kv_heads * size], dim=-1)
    else:
        size = hidden // heads
    q, k, v = _heads(query, heads), _heads(key, kv_heads), _heads(value, kv_heads)

    total = int(total_length.reshape(-1)[0])
    lengths = seqlens_k.reshape(-1).long() + 1  # each row's valid length, cache and new tokens
    first_prompt = seq == total
    cached = torch.zeros_like(lengths) if first_prompt else lengths - seq
    steps = torch.arange(seq, device=lengths.device)
    positions = cached[:, None] + steps[None, :]
    positions = torch.where(positions < lengths[:, None], positions, torch.ones_like(positions))
    if _attr(node, "do_rotary", 0):
        cos, sin = cos_cache[positions][:, None], sin_cache[positions][:, None]  # [batch, 1, seq, rotary_dim / 2]
        interleaved = bool(_attr(node, "rotary_interleaved", 0))
        q, k = rotate(q, cos, sin, interleaved), rotate(k, cos, sin, interleaved)

    past_length = past_key.shape[2] if past_key is not None else 0
    present_length = max(total, past_length)
    present_k, present_v = [], []
    for b in range(batch):
        c = int(cached[b])
        pad = present_length - c - seq
        for out, past, new in ((present_k, past_key, k), (present_v, past_value, v)):
            parts = ([past[b, :, :c]] if c else []) + [new[b]]
            if pad:
                parts.append(new.new_zeros(kv_heads, pad, size))
            out.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    present_k, present_v = torch.stack(present_k), torch.stack(present_v)

    # key j is visible to new token s of row b when j <= cached[b] + s (and within the local window)
    keys = torch.arange(present_length, device=lengths.device)
    last = (cached[:, None] + steps[None, :])[:, :, None]  # [batch, seq, 1]
    visible = keys[None, None, :] <= last
    window = int(_attr(node, "local_window_size", -1))
    if window > 0:
        visible = visible & (keys[None, None, :] > last - window)
    group = heads // kv_heads
    k_all = present_k.repeat_interleave(group, dim=1) if group > 1 else present_k
    v_all = present_v.repeat_interleave(group, dim=1) if group > 1 else present_v
    scale = _attr(node, "scale", 0.0) or 1.0 / math.sqrt(size)
    scores = (q @ k_all.transpose(-1, -2)) * scale
    softcap = float(_attr(node, "softcap", 0.0) or 0.0)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    if _attr(node, "smooth_softmax", 0):
        sink = scores.new_zeros(scores.shape[:-1] + (1,))
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = (probs @ v_all).transpose(1, 2).reshape(batch, seq, heads * size)
    return [out, present_k, present_v][:len(node.outputs)]
