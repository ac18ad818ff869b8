"""Small reference models in torch, and their cached ONNX exports, for tests and benchmarks.

    module, example_inputs = reference.build("llama", layers=2)
    path = reference.export("llama", opset=23)       # cached; dynamic batch (and sequence) dims

Kinds (defaults are small; every size is a keyword of `build`/`export`, see `DEFAULTS`):

- `llama`: embedding, blocks of pre-RMSNorm, grouped-query attention with rotary embeddings and causal
  `F.scaled_dot_product_attention`, SwiGLU MLP (gate, up, down); final RMSNorm; LM head (untied unless
  `tie=True`). `input_ids` [batch, seq] int64 -> `logits` [batch, seq, vocab].
- `opt`: learned positions, blocks of pre-LayerNorm (with bias), multi-head attention with biases, ReLU (or
  `activation="gelu"`) MLP (fc1, fc2); final LayerNorm; LM head tied to the token embedding.
  `input_ids` -> `logits`. Sequences up to `max_positions`.
- `bert`: word + position + token-type embeddings and LayerNorm; post-LayerNorm encoder blocks (attention with
  padding mask, add & LayerNorm, GELU FFN, add & LayerNorm). `input_ids`, `attention_mask` [batch, seq] int64
  -> `last_hidden_state` [batch, seq, hidden].
- `resnet`: conv-BN-ReLU stem, stages of basic residual blocks (conv+BN shortcut where the shape changes),
  global average pool, Linear head. `pixels` [batch, 3, 32, 32] -> `logits` [batch, classes].
- `mlp`: Linear+GELU layers and a Linear output. `x` [batch, in] -> `y` [batch, out].

Weights are seeded (same `seed`, same model) and not trivially small: Linear weights ~ N(0, 0.06) with a few
outlier input channels (x8), norm gains 1 +- 0.1, non-zero biases and BatchNorm statistics, so compression
error is measurable and outlier-aware methods have something to find.

Initializer names follow the module paths, Hugging Face style: `embed_tokens.weight`, `layers.0.input_layernorm.weight`,
`encoder.0.output_layernorm.bias` (bert), `stages.1.0.conv1.weight` (resnet). Linear layers on 3-D activations
become MatMul with a `[in, out]` initializer named `<param>.T` (`layers.0.self_attn.q_proj.weight.T`,
`layers.0.mlp.down_proj.weight.T`, `lm_head.weight.T`; see models/lowering.py) followed by Add for the bias;
Linear on 2-D activations (mlp, resnet head) becomes Gemm(transB=1) on the `[out, in]` parameter itself.
Tied LM heads (opt, llama with `tie=True`) stay shared: one initializer (`embed_tokens.weight` for opt,
`lm_head.weight` for tied llama) feeds the embedding Gather and a runtime Transpose -> the LM head MatMul. The nodes carry the exporter's metadata_props
(`pkg.torch.onnx.name_scopes`, e.g. `['', 'layers.0', 'layers.0.self_attn', 'layers.0.self_attn.q_proj', 'linear']`).

What the exporter (torch 2.13, dynamo=True, optimize=True) emits with the default sizes (2 blocks):

- opset 18
  - llama: Gather (embedding); RMSNorm decomposed: Pow, ReduceMean, Add(eps), Sqrt, Reciprocal, Mul, Mul(gain);
    MatMul projections; rotary as Range/Mul/Concat -> Cos, Sin once, then per q and k Slice, Neg, Concat,
    Mul, Mul, Add; attention decomposed: causal mask from Trilu/Equal/Where, KV heads repeated by
    Unsqueeze/Expand/Reshape, Transpose, MatMul, Mul (scale), Add (mask), Softmax, MatMul; SiLU as
    Sigmoid*Mul; 19 MatMul in all (per block 7 Linear + 2 attention, then the LM head).
  - opt: LayerNormalization (opset 17+), MatMul + Add (biases), same decomposed causal attention (no Expand
    of heads), Relu (or Erf-based Gelu: Div, Erf, Add, Mul, Mul), 17 MatMul.
  - bert: LayerNormalization, decomposed attention with the padding mask as Sub/Mul -> Expand
    [batch, 1, seq, seq] -> Add, Gelu as Div/Erf/Add/Mul/Mul, 16 MatMul.
  - resnet: BatchNorm folded into Conv by the exporter (9 Conv with bias, no BatchNormalization; export with
    `keep_batchnorm=True` for 9 Conv + 9 BatchNormalization), Relu, Add (residuals), ReduceMean over H,W
    (not GlobalAveragePool), Reshape, Gemm head.
  - mlp: Gemm, Gelu as Div/Erf/Add/Mul/Mul.
- opset 23 differs in: `RMSNormalization` (llama: 2 per block + final), one `Attention` node per block
  (llama: is_causal=1, q with 4 heads and k/v with 2 heads as 4-D inputs, GQA handled inside; opt:
  is_causal=1; bert: attn_mask [batch, 1, seq, seq] additive), and `Gelu` as one op (bert, mlp; opset 20+).
  The rotary stays decomposed (no `RotaryEmbedding`), Q/K/V stay three separate MatMuls, LayerNormalization
  as at 18. MatMul count drops by 2 per block (the attention MatMuls are inside Attention).
`op_histogram(kind, opset)` returns the exact counts; tests/test_models.py pins these facts.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
from typing import Any

# Part of every cache key, with a hash of the sources that shape an export: any edit re-exports on next use.
VERSION = "1"
SOURCES = ("reference.py", "lowering.py")

KINDS = ("llama", "opt", "bert", "resnet", "mlp")

DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, rope_theta=10000.0,
                  eps=1e-5, tie=False, seed=0),
    "opt": dict(vocab=256, hidden=64, layers=2, heads=4, ffn=256, max_positions=128, activation="relu",
                eps=1e-5, seed=0),
    "bert": dict(vocab=256, hidden=64, layers=2, heads=4, intermediate=128, max_positions=128, type_vocab=2,
                 eps=1e-12, seed=0),
    "resnet": dict(channels=(16, 32, 64), blocks=1, classes=10, image=32, seed=0),
    "mlp": dict(inputs=32, hidden=(64, 64), outputs=16, seed=0),
}

WEIGHT_STD = 0.06
OUTLIER_FRACTION = 0.03
OUTLIER_SCALE = 8.0
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8


def _config(kind: str, cfg: dict[str, Any]) -> dict[str, Any]:
    from modelsurgeon.errors import UserError

    if kind not in DEFAULTS:
        raise UserError(f"unknown reference model '{kind}'; choose one of {', '.join(KINDS)}")
    unknown = set(cfg) - set(DEFAULTS[kind])
    if unknown:
        raise UserError(f"reference model '{kind}' has no option {', '.join(sorted(unknown))}; "
                        f"its options are {', '.join(DEFAULTS[kind])}")
    merged = {**DEFAULTS[kind], **cfg}
    for key in ("channels", "hidden"):
        if isinstance(merged.get(key), list):
            merged[key] = tuple(merged[key])
    if kind in ("llama", "opt", "bert"):
        if merged["hidden"] % merged["heads"]:
            raise UserError(f"{kind}: hidden={merged['hidden']} must be a multiple of heads={merged['heads']}")
    if kind == "llama" and merged["heads"] % merged["kv_heads"]:
        raise UserError(f"llama: heads={merged['heads']} must be a multiple of kv_heads={merged['kv_heads']}")
    if kind == "llama" and (merged["hidden"] // merged["heads"]) % 2:
        raise UserError("llama: the head size (hidden / heads) must be even for rotary embeddings")
    if kind == "opt" and merged["activation"] not in ("relu", "gelu"):
        raise UserError("opt: activation must be 'relu' or 'gelu'")
    return merged


# --------------------------------------------------------------------------------------------------- modules

def _modules():
    """The torch module classes, defined lazily so importing this file does not import torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class LlamaAttention(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.heads, self.kv_heads = c["heads"], c["kv_heads"]
            self.head_dim = c["hidden"] // c["heads"]
            h = c["hidden"]
            self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=False)
            self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
            self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)

        def forward(self, x, cos, sin):
            b, s, _ = x.shape
            q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))

    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    class LlamaMLP(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.gate_proj = nn.Linear(c["hidden"], c["intermediate"], bias=False)
            self.up_proj = nn.Linear(c["hidden"], c["intermediate"], bias=False)
            self.down_proj = nn.Linear(c["intermediate"], c["hidden"], bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class LlamaBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.input_layernorm = nn.RMSNorm(c["hidden"], eps=c["eps"])
            self.self_attn = LlamaAttention(c)
            self.post_attention_layernorm = nn.RMSNorm(c["hidden"], eps=c["eps"])
            self.mlp = LlamaMLP(c)

        def forward(self, x, cos, sin):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Llama(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.config = c
            self.embed_tokens = nn.Embedding(c["vocab"], c["hidden"])
            self.layers = nn.ModuleList(LlamaBlock(c) for _ in range(c["layers"]))
            self.norm = nn.RMSNorm(c["hidden"], eps=c["eps"])
            self.lm_head = nn.Linear(c["hidden"], c["vocab"], bias=False)
            head_dim = c["hidden"] // c["heads"]
            inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            self.register_buffer("inv_freq", inv_freq, persistent=False)

        def tie_weights(self):
            if self.config["tie"]:
                self.lm_head.weight = self.embed_tokens.weight

        def forward(self, input_ids):
            x = self.embed_tokens(input_ids)
            pos = torch.arange(input_ids.shape[1], dtype=torch.float32, device=input_ids.device)
            freqs = pos[:, None] * self.inv_freq[None, :]
            angles = torch.cat((freqs, freqs), dim=-1)
            cos, sin = angles.cos(), angles.sin()
            for layer in self.layers:
                x = layer(x, cos, sin)
            return self.lm_head(self.norm(x))

    class MultiHeadAttention(nn.Module):
        """Attention with biased projections; `mask` is additive ([batch, 1, 1, seq]) or None for causal."""

        def __init__(self, c, names=("q_proj", "k_proj", "v_proj", "out_proj")):
            super().__init__()
            self.heads, self.head_dim = c["heads"], c["hidden"] // c["heads"]
            self.names = names
            for name in names:
                setattr(self, name, nn.Linear(c["hidden"], c["hidden"]))

        def forward(self, x, mask=None):
            b, s, h = x.shape
            q, k, v = (getattr(self, n)(x).view(b, s, self.heads, self.head_dim).transpose(1, 2) for n in self.names[:3])
            if mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return getattr(self, self.names[3])(out.transpose(1, 2).reshape(b, s, h))

    class OPTBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.self_attn_layer_norm = nn.LayerNorm(c["hidden"], eps=c["eps"])
            self.self_attn = MultiHeadAttention(c)
            self.final_layer_norm = nn.LayerNorm(c["hidden"], eps=c["eps"])
            self.fc1 = nn.Linear(c["hidden"], c["ffn"])
            self.fc2 = nn.Linear(c["ffn"], c["hidden"])
            self.act = nn.ReLU() if c["activation"] == "relu" else nn.GELU()

        def forward(self, x):
            x = x + self.self_attn(self.self_attn_layer_norm(x))
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))

    class OPT(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.config = c
            self.embed_tokens = nn.Embedding(c["vocab"], c["hidden"])
            self.embed_positions = nn.Embedding(c["max_positions"], c["hidden"])
            self.layers = nn.ModuleList(OPTBlock(c) for _ in range(c["layers"]))
            self.final_layer_norm = nn.LayerNorm(c["hidden"], eps=c["eps"])

        def tie_weights(self):
            pass

        def forward(self, input_ids):
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.embed_tokens(input_ids) + self.embed_positions(pos)[None]
            for layer in self.layers:
                x = layer(x)
            return F.linear(self.final_layer_norm(x), self.embed_tokens.weight)  # tied LM head

    class BertBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.attention = MultiHeadAttention(c, names=("query", "key", "value", "output"))
            self.attention_layernorm = nn.LayerNorm(c["hidden"], eps=c["eps"])
            self.intermediate = nn.Linear(c["hidden"], c["intermediate"])
            self.output = nn.Linear(c["intermediate"], c["hidden"])
            self.output_layernorm = nn.LayerNorm(c["hidden"], eps=c["eps"])

        def forward(self, x, mask):
            x = self.attention_layernorm(x + self.attention(x, mask))
            return self.output_layernorm(x + self.output(F.gelu(self.intermediate(x))))

    class BertEmbeddings(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.word_embeddings = nn.Embedding(c["vocab"], c["hidden"])
            self.position_embeddings = nn.Embedding(c["max_positions"], c["hidden"])
            self.token_type_embeddings = nn.Embedding(c["type_vocab"], c["hidden"])
            self.layernorm = nn.LayerNorm(c["hidden"], eps=c["eps"])

        def forward(self, input_ids):
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
            return self.layernorm(x)

    class Bert(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.config = c
            self.embeddings = BertEmbeddings(c)
            self.encoder = nn.ModuleList(BertBlock(c) for _ in range(c["layers"]))

        def tie_weights(self):
            pass

        def forward(self, input_ids, attention_mask):
            x = self.embeddings(input_ids)
            keep = attention_mask[:, None, None, :].to(x.dtype)
            mask = (1.0 - keep) * torch.finfo(x.dtype).min
            # [batch, 1, seq, seq]: ONNX Runtime's Attention (opset 23) rejects a mask broadcast over queries.
            mask = mask.expand(-1, -1, input_ids.shape[1], -1)
            for layer in self.encoder:
                x = layer(x, mask)
            return x

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.config = c
            ch = c["channels"]
            self.stem = nn.Sequential(nn.Conv2d(3, ch[0], 3, 1, 1, bias=False), nn.BatchNorm2d(ch[0]), nn.ReLU())
            stages, cin = [], ch[0]
            for i, cout in enumerate(ch):
                blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(c["blocks"])]
                stages.append(nn.Sequential(*blocks))
                cin = cout
            self.stages = nn.Sequential(*stages)
            self.fc = nn.Linear(ch[-1], c["classes"])

        def tie_weights(self):
            pass

        def forward(self, pixels):
            x = self.stages(self.stem(pixels))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    class MLP(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.config = c
            sizes = (c["inputs"], *c["hidden"])
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
            self.out = nn.Linear(sizes[-1], c["outputs"])

        def tie_weights(self):
            pass

        def forward(self, x):
            for layer in self.layers:
                x = F.gelu(layer(x))
            return self.out(x)

    return {"llama": Llama, "opt": OPT, "bert": Bert, "resnet": ResNet, "mlp": MLP}


def _init_weights(module, seed: int) -> None:
    """Deterministic, non-trivial weights: see the module docstring."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    def outliers(weight, axis):
        n = weight.shape[axis]
        k = max(1, round(OUTLIER_FRACTION * n))
        idx = torch.randperm(n, generator=g)[:k]
        index = [slice(None)] * weight.dim()
        index[axis] = idx
        weight[tuple(index)] *= OUTLIER_SCALE

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(normal(m.weight.shape, WEIGHT_STD))
                outliers(m.weight, 1)  # a few input channels carry large weights
                if m.bias is not None:
                    m.bias.copy_(normal(m.bias.shape, 0.02))
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(normal(m.weight.shape, 0.1))
                outliers(m.weight, 1)  # a few hidden dimensions carry large activations
            elif isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(normal(m.weight.shape, math.sqrt(2.0 / fan_in)))
                outliers(m.weight, 0)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm2d)):
                if m.weight is not None:
                    m.weight.copy_(1.0 + normal(m.weight.shape, 0.1))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(normal(m.bias.shape, 0.05))
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(normal(m.running_mean.shape, 0.1))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def _example_inputs(kind: str, c: dict[str, Any], batch: int = EXAMPLE_BATCH, seq: int = EXAMPLE_SEQ, seed: int = 0) -> tuple:
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind in ("llama", "opt"):
        return (torch.randint(0, c["vocab"], (batch, seq), generator=g),)
    if kind == "bert":
        ids = torch.randint(0, c["vocab"], (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[-1, seq - max(1, seq // 4):] = 0  # the last sample is padded
        return ids, mask
    if kind == "resnet":
        return (torch.randn(batch, 3, c["image"], c["image"], generator=g),)
    return (torch.randn(batch, c["inputs"], generator=g),)


INPUT_NAMES = {"llama": ["input_ids"], "opt": ["input_ids"], "bert": ["input_ids", "attention_mask"],
               "resnet": ["pixels"], "mlp": ["x"]}
OUTPUT_NAMES = {"llama": ["logits"], "opt": ["logits"], "bert": ["last_hidden_state"], "resnet": ["logits"], "mlp": ["y"]}


def build(kind: str, **cfg):
    """(torch module in eval mode, example inputs tuple) for a reference model; `cfg` overrides `DEFAULTS[kind]`."""
    import torch

    c = _config(kind, cfg)
    torch.manual_seed(c["seed"])  # construction draws default inits; ours replace them
    module = _modules()[kind](c)
    _init_weights(module, c["seed"])
    module.tie_weights()
    return module.eval(), _example_inputs(kind, c)


def example_inputs(kind: str, batch: int = EXAMPLE_BATCH, seq: int = EXAMPLE_SEQ, seed: int = 0, **cfg) -> dict[str, Any]:
    """Random numpy feeds for the exported model (any batch; any seq for the sequence models)."""
    c = _config(kind, cfg)
    tensors = _example_inputs(kind, c, batch, seq, seed)
    return {name: t.numpy() for name, t in zip(INPUT_NAMES[kind], tensors)}


def _dynamic_shapes(kind: str):
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    seq = Dim("seq", min=1, max=4096)
    if kind in ("llama", "opt"):
        return {"input_ids": {0: batch, 1: seq}}
    if kind == "bert":
        return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    if kind == "resnet":
        return {"pixels": {0: batch}}
    return {"x": {0: batch}}


def cache_dir() -> pathlib.Path:
    """Where reference exports are cached: `$MODELSURGEON_CACHE/reference` (see models/cache.py)."""
    from modelsurgeon.models.cache import cache_dir as root

    return root("reference")


def cache_key(kind: str, opset: int, c: dict[str, Any]) -> str:
    import torch

    here = pathlib.Path(__file__).parent
    source = hashlib.sha256(b"".join((here / f).read_bytes() for f in SOURCES)).hexdigest()
    blob = json.dumps({"kind": kind, "opset": opset, "cfg": c, "version": VERSION, "source": source,
                       "torch": torch.__version__},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def to_ir(kind: str, opset: int = 18, *, keep_batchnorm: bool = False, **cfg):
    """The reference model lowered to an `onnx_ir.Model` (not cached); see `export`."""
    from modelsurgeon.models.lowering import lower

    module, inputs = build(kind, **cfg)
    return lower(module, inputs, opset=opset, input_names=INPUT_NAMES[kind], output_names=OUTPUT_NAMES[kind],
                 dynamic_shapes=_dynamic_shapes(kind), keep_batchnorm=keep_batchnorm)


def export(kind: str, opset: int = 18, *, keep_batchnorm: bool = False, **cfg) -> pathlib.Path:
    """Path of the cached ONNX export of a reference model (exported on first use, saved atomically).

    `keep_batchnorm=True` keeps BatchNormalization nodes (resnet) that the exporter otherwise folds into Conv.
    """
    from modelsurgeon.errors import UserError
    from modelsurgeon.model_io import save
    from modelsurgeon.models.cache import produce_once

    if opset < 18:
        raise UserError(f"opset {opset} is too old for the reference models; use 18 or later (e.g. 18 or 23)")
    c = _config(kind, cfg)
    variant = "-bn" if keep_batchnorm else ""
    path = cache_dir() / f"{kind}{variant}-opset{opset}-{cache_key(kind, opset, c)}.onnx"

    def make(target: pathlib.Path) -> None:
        model = to_ir(kind, opset, keep_batchnorm=keep_batchnorm, **cfg)
        model.producer_name = f"modelsurgeon.models.reference v{VERSION}"
        save(model, target)

    return produce_once(path, make)


def op_histogram(kind: str, opset: int = 18, *, keep_batchnorm: bool = False, **cfg) -> dict[str, int]:
    """Op types (with domain prefix if not the default) and how often they appear in the export."""
    import collections

    import onnx_ir as ir

    model = ir.load(export(kind, opset, keep_batchnorm=keep_batchnorm, **cfg))
    counts = collections.Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
        for n in ir.traversal.RecursiveGraphIterator(model.graph))
    return dict(sorted(counts.items()))
