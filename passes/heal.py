"""heal: recovery distillation on the graph. After structural passes (share, lowrank, drop-blocks, slice, prune), tune
the weights they created or touched by gradient descent in torch so that the model matches the ORIGINAL model (the
one the compile started from) on the calibration data. The graph keeps its structure; only initializer values change.

The graph, or one transformer block of it, becomes a differentiable torch function through `modelsurgeon.onnx_torch`
(an op-by-op interpreter; the chosen initializers are `torch.nn.Parameter`s). Two objectives:

- `mode=blocks` (default): block by block, in order, each block's output is matched to the original's value of the
  same name (normalized MSE), on inputs from the compressed model as healed so far, so errors do not compound.
  Blocks that share a weight (`share`) are tuned together, as one unit. Block inputs travel from unit to unit in
  torch; the original's outputs and the side values a block reads (masks, rotary tables) are captured with ONNX
  Runtime a few blocks at a time (`CAPTURE_BUDGET`), so memory holds the stream, those captures and one unit's
  activations per batch. Models whose blocks share no output with the original (`slice` rotates and narrows the
  stream; CNNs have no blocks) are healed end to end instead, and the notes say so.
- `mode=e2e`: the whole graph, KL divergence of the logits (outputs named `*logit*`) or normalized MSE of the other
  float outputs against the original's, which ONNX Runtime computes batch by batch (kept between steps: past a
  memory budget, the original's logits as their 256 likeliest entries per token, `_TargetCache`).

Which weights train (`train`): `touched` (default) are the float initializers the earlier passes created, changed,
or made a rewired node read (share's borrowed weights), plus every weight of a block whose input the passes rewired
(the block after a dropped one); `norms` the normalization scales and biases; `all` every float initializer. Every
other initializer keeps its bytes. With `rank=R` the matrices among them train as LoRA deltas of rank R, folded in
when stored (`TunedWeights`). A unit (or the whole model in e2e) whose objective on all calibration batches
does not improve keeps its weights, so heal never makes its own objective worse; at `steps=0` it changes nothing.
With `holdout`, part of the calibration samples is held back and the objective on them decides instead: the best
weights seen along the way are kept (docs/heal.md: on MiniLM an end-to-end phase at lr 1e-3 never beat its start
on held-back sentences, and kept nothing).

What it cannot do: ops outside `onnx_torch.OPS` (opset-23 Attention and RotaryEmbedding, com.microsoft
MultiHeadAttention and RotaryEmbedding, quantized ops), so it runs before quantization; a 4-bit model is refused.

Padding (an `attention_mask` input with zeros): the objectives count real tokens only, and positions that are
padding in every row of a batch are cut from it first (the outputs of real tokens do not depend on them), so a
batch of short sentences padded to the longest in the calibration set costs what its own longest costs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np
import onnx_ir as ir

from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Option, Pass, PassResult, Stage, register_pass

log = logging.getLogger("modelsurgeon")

CAPTURE_BUDGET = 512 * 2**20  # bytes of captured targets and side values held at once in block mode
# bytes of the original's outputs kept between steps in e2e mode (float16): SmolLM2's logits for 64 windows of 128
# tokens are 805 MB; a batch past the budget is recomputed with ONNX Runtime at every step that reads it
TARGET_CACHE_BUDGET = 1024 * 2**20
_NORM_OPS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "BatchNormalization",
             "SkipSimplifiedLayerNormalization", "SkipLayerNormalization"}


def _positive(v):
    return None if v > 0 else "must be positive"


def _non_negative(v):
    return None if v >= 0 else "must be 0 or more"


# ----------------------------------------------------------------------------------------------------------------
# Which initializers train
# ----------------------------------------------------------------------------------------------------------------


# inputs that are tables an op looks up, not weights: GroupQueryAttention's and RotaryEmbedding's cos/sin caches
_TABLE_INPUTS = {("com.microsoft", "GroupQueryAttention"): (7, 8), ("com.microsoft", "RotaryEmbedding"): (2, 3)}


def _is_weight(value: ir.Value) -> bool:
    """A float weight: more than one element, all finite (not a scalar such as an epsilon, nor a -inf mask fill),
    and not only read as a rotary table (`_TABLE_INPUTS`: GenAI's cos/sin caches, which every block reads)."""
    t = value.const_value
    if t is None or t.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE):
        return False
    uses = value.uses()
    if uses and all(i in _TABLE_INPUTS.get((n.domain, n.op_type), ()) for n, i in uses):
        return False
    return t.size > 1 and bool(np.isfinite(t.numpy()).all())


def _same_tensor(a: ir.Value, b: ir.Value) -> bool:
    ta, tb = a.const_value, b.const_value
    if ta is tb:
        return True
    if ta is None or tb is None or ta.dtype != tb.dtype or tuple(ta.shape) != tuple(tb.shape):
        return False
    return bool(np.array_equal(ta.numpy(), tb.numpy()))


def _node_inputs(model: ir.Model) -> dict[str, tuple[str, list[str]]]:
    return {n.name: (n.op_type, [v.name if v is not None else "" for v in n.inputs]) for n in model.graph.all_nodes()
            if n.name}


def rewired_nodes(model: ir.Model, original: ir.Model) -> set[str]:
    """Names of the nodes of `model` that are new, or read other values than the original's node of that name."""
    before = _node_inputs(original)
    out = set()
    for n in model.graph.all_nodes():
        if not n.name:
            continue
        if before.get(n.name) != (n.op_type, [v.name if v is not None else "" for v in n.inputs]):
            out.add(n.name)
    return out


def touched_initializers(model: ir.Model, original: ir.Model, tb=None) -> set[str]:
    """The float initializers earlier passes created or changed (by name and content), those a new or rewired node
    reads, and all of those a block reads whose input the passes rewired (drop-blocks' next block)."""
    before = original.graph.initializers
    rewired = rewired_nodes(model, original)
    out = set()
    for name, value in model.graph.initializers.items():
        if not _is_weight(value):
            continue
        if name not in before or not _same_tensor(value, before[name]):
            out.add(name)
        elif any(n.name in rewired for n, _ in value.uses()):
            out.add(name)
    if tb is not None:
        producers = {v.name: n.name for n in original.graph.all_nodes() for v in n.outputs}
        for b in tb.blocks:
            entry = [n for n, _ in b.residual_in.uses() if n in set(b.nodes)]
            source = b.residual_in.producer()
            moved = source is not None and producers.get(b.residual_in.name) != source.name  # drop-blocks' bypass
            if moved or any(n.name in rewired for n in entry) or _stands_for(b, tb, original) is not None:
                out |= _block_initializers(b.nodes)
    return out


def _stands_for(block, tb, original: ir.Model) -> str | None:
    """The original's value that a reader outside every block (the final norm, the head) read where it now reads this
    block's output, when that is another value (the output of a block dropped after this one); else None."""
    inside = {id(n) for b in tb.blocks for n in b.nodes}
    orig_nodes = {n.name: n for n in original.graph.all_nodes() if n.name}
    for node, slot in block.residual_out.uses():
        if id(node) in inside or not node.name or node.op_type == "Shape":
            continue
        o = orig_nodes.get(node.name)
        if o is not None and o.op_type == node.op_type and slot < len(o.inputs) and o.inputs[slot] is not None \
                and o.inputs[slot].name != block.residual_out.name:
            return o.inputs[slot].name
    return None


def _block_initializers(nodes) -> set[str]:
    return {v.name for n in nodes for v in n.inputs if v is not None and v.is_initializer() and _is_weight(v)}


def norm_initializers(model: ir.Model) -> set[str]:
    out = set()
    for n in model.graph.all_nodes():
        if n.op_type in _NORM_OPS:
            out |= {v.name for v in n.inputs[1:] if v is not None and v.is_initializer() and _is_weight(v)}
    try:  # decomposed norms (ReduceMean ... Mul by scale): the block finder knows them
        from modelsurgeon.analyses.blocks import find_norms

        for norm in find_norms(model.graph):
            for v in (norm.scale, norm.bias):
                if v is not None and v.is_initializer() and _is_weight(v):
                    out.add(v.name)
    except Exception:  # noqa: BLE001 - a graph the finder cannot read has fused norms or none
        pass
    return out


def trainable(model: ir.Model, ctx, which: str, tb=None) -> set[str]:
    if which == "all":
        return {k for k, v in model.graph.initializers.items() if _is_weight(v)}
    if which == "norms":
        return norm_initializers(model)
    return touched_initializers(model, canonical_original(ctx), tb)


def canonical_original(ctx) -> ir.Model:
    """The original as the passes first saw it: `canonicalize` rewrites a graph (exactly) before any pass that
    reads blocks, so what the passes changed is told against its output, not the file's graph; otherwise GenAI's
    split skip norms would count as rewired and every block's weights as touched. Built once per compile (kept in
    `ctx.extra`, for the next heal of a `heal(mode=blocks),heal(mode=e2e)` pipeline)."""
    from modelsurgeon.canonical import canonicalize

    original, reference = ctx.extra.get("heal.canonical_original", (None, None))
    if original is not ctx.original:
        reference = ctx.original.clone()
        canonicalize(reference)
        ctx.extra["heal.canonical_original"] = (ctx.original, reference)
    return reference


# ----------------------------------------------------------------------------------------------------------------
# Training helpers
# ----------------------------------------------------------------------------------------------------------------


class TunedWeights:
    """The initializers heal tunes, as torch tensors. With `rank` 0 each one is a `torch.nn.Parameter` itself; with
    rank R > 0 each 2-D one (a projection) is its stored value, frozen, plus a low-rank delta `A @ B` ([rows, R] @
    [R, cols], LoRA) whose factors train, B starting at zero so the delta starts at nothing; 1-D ones (norm scales,
    biases) and matrices too small for R train as they are. `values()` gives the tensors the graph reads (call it
    again after each optimizer step), `parameters` what the optimizer moves, and the delta is folded into the
    initializer when stored: the graph never sees the factors."""

    def __init__(self, model: ir.Model, names, rank: int = 0, seed: int = 0):
        import torch

        from modelsurgeon.onnx_torch import to_torch

        gen = torch.Generator().manual_seed(seed)
        self.names = sorted(names)
        self.frozen: dict[str, Any] = {}
        self.factors: dict[str, tuple[Any, Any]] = {}
        self.parameters: dict[str, Any] = {}
        for n in self.names:
            w = to_torch(model.graph.initializers[n].const_value.numpy()).float().clone()
            if rank > 0 and w.dim() == 2 and min(w.shape) > 2 * rank:
                a = torch.nn.Parameter(torch.randn(w.shape[0], rank, generator=gen) / np.sqrt(w.shape[0]))
                b = torch.nn.Parameter(torch.zeros(rank, w.shape[1]))
                self.frozen[n], self.factors[n] = w, (a, b)
                self.parameters[n + "::lora_a"], self.parameters[n + "::lora_b"] = a, b
            else:
                self.parameters[n] = torch.nn.Parameter(w)

    def values(self) -> dict[str, Any]:
        """By name, what the graph reads: a parameter, or a `LowRankSum` (frozen value plus the factors' product,
        which the interpreter keeps factored where an op allows it)."""
        from modelsurgeon.onnx_torch import LowRankSum

        return {n: LowRankSum(self.frozen[n], *self.factors[n]) if n in self.factors else self.parameters[n]
                for n in self.names}

    def trained_count(self) -> int:
        return int(sum(p.numel() for p in self.parameters.values()))

    def store(self, model: ir.Model) -> None:
        """Write the trained values into the initializers (their own dtype; the original tensors are left alone)."""
        import torch

        from modelsurgeon.onnx_torch import formed

        with torch.no_grad():
            values = {n: formed(v) for n, v in self.values().items()}
        for name in self.names:
            value = model.graph.initializers[name]
            dtype = value.const_value.dtype.numpy()
            value.const_value = ir.tensor(values[name].detach().numpy().astype(dtype), name=name)


def _token_weights(out, mask):
    """`mask` [batch, seq] as weights broadcastable to `out` [batch, seq, ...], or None when `out` is not per token."""
    if mask is None or out.dim() < 3 or tuple(out.shape[:2]) != tuple(mask.shape):
        return None
    return mask.reshape(*mask.shape, *([1] * (out.dim() - 2)))


def _nmse(out, target, mask=None):
    """Mean squared error over the mean square of the target; with a padding mask, over real tokens only."""
    import torch

    target = target.to(out.dtype)
    w = _token_weights(out, mask)
    if w is None:
        return torch.mean((out - target) ** 2) / torch.clamp(torch.mean(target * target), min=1e-12)
    return torch.sum(w * (out - target) ** 2) / torch.clamp(torch.sum(w * target * target), min=1e-12)


def _logits_like(name: str, arr: np.ndarray) -> bool:
    return "logit" in name.lower() and np.issubdtype(arr.dtype, np.floating) and arr.ndim >= 2 and arr.shape[-1] > 1


def _kl(out, target, mask=None):
    """KL(original || model) per real token, averaged. `target` is the original's logits, or their `TopLogits`: then
    the divergence between the two distributions coarsened to the original's K likeliest entries and one bucket for
    the rest (a lower bound of the full KL; its gradient pulls those K entries to the original's probabilities and
    scales the rest together to the original's remaining mass)."""
    import torch

    logp = torch.log_softmax(out.float(), -1)
    if isinstance(target, TopLogits):
        lp_top = torch.gather(logp, -1, target.index)
        lp_rest = _log_mass_outside(logp, target.index)
        per_token = (torch.sum(torch.exp(target.logq) * (target.logq - lp_top), -1)
                     + torch.exp(target.log_rest) * (target.log_rest - lp_rest))
    else:
        logq = torch.log_softmax(target.float(), -1)
        per_token = torch.sum(torch.exp(logq) * (logq - logp), -1)
    if mask is None or tuple(per_token.shape) != tuple(mask.shape):
        return per_token.mean()
    return torch.sum(per_token * mask) / torch.clamp(torch.sum(mask), min=1.0)


_LOG_REST_MIN = -30.0  # log of the rest's mass when the K entries hold all of it (e^-30: nothing, but finite)


def _log_mass_outside(logp, index):
    """Log of the probability mass of the entries not in `index` (last axis) of log-probabilities `logp`, computed
    from those entries themselves (no 1 - sum cancellation), and at least `_LOG_REST_MIN`."""
    import torch

    return torch.clamp(torch.logsumexp(logp.scatter(-1, index, -math.inf), -1), min=_LOG_REST_MIN)


@dataclasses.dataclass
class TopLogits:
    """A distribution over a vocabulary as its K likeliest entries (`index`, `logq`: log-probabilities) and the log
    of the mass of all the others (`log_rest`): how the e2e objective keeps the original's logits past its budget."""
    index: Any  # [..., K]: int32 as the cache keeps it, int64 from for_loss() (what torch.gather takes)
    logq: Any  # float32 [..., K]
    log_rest: Any  # float32 [...]

    @staticmethod
    def of(logits: np.ndarray, k: int) -> "TopLogits":
        import torch

        logq = torch.log_softmax(torch.from_numpy(np.ascontiguousarray(logits, np.float32)), -1)
        top, index = torch.topk(logq, min(k, logq.shape[-1]), dim=-1)
        return TopLogits(index.to(torch.int32), top, _log_mass_outside(logq, index))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.index, self.logq, self.log_rest))

    @staticmethod
    def nbytes_of(logits: np.ndarray, k: int) -> int:
        """`TopLogits.of(logits, k).nbytes` without computing it: per token, K int32 indices and float32
        log-probabilities, and one float32 for the rest's mass."""
        tokens = logits.size // max(logits.shape[-1], 1)
        return tokens * (min(k, logits.shape[-1]) * 8 + 4)

    def for_loss(self) -> "TopLogits":
        import torch

        return TopLogits(self.index.to(torch.int64), self.logq, self.log_rest)


def _padding_mask(feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    """The [batch, seq] attention mask of a calibration batch when it pads some positions, else None."""
    for name, a in feeds.items():
        if "mask" in name.lower() and a.ndim == 2 and (a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer)):
            return None if np.all(a != 0) else (a != 0)
    return None


def _trim_padding(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut the positions that are padding in every row of the batch (right padding, as tokenizers pad) from every
    [batch, seq] input: real tokens attend only to real tokens, so their outputs do not change, and a batch of
    short sentences padded to the calibration set's longest costs what its own longest costs."""
    mask = _padding_mask(feeds)
    if mask is None:
        return feeds
    used = np.flatnonzero(mask.any(axis=0))
    length = int(used[-1]) + 1 if used.size else 1
    if length == mask.shape[1] or mask[:, length:].any():
        return feeds
    if any(a.shape != mask.shape and mask.shape[1] in a.shape[1:] for a in feeds.values()) or \
            sum(a.shape == mask.shape for a in feeds.values()) < 2:
        return feeds  # another input may have a sequence axis too (a 4-D mask), or the mask also covers a past
    return {k: (a[:, :length] if a.shape == mask.shape else a) for k, a in feeds.items()}


def held_out_mask(n: int, holdout: float) -> np.ndarray:
    """Which of n calibration samples `holdout` holds back: every k-th (k = round(1/holdout), at least 2), so
    windows taken text by text are held out from every text."""
    if holdout <= 0 or n < 2:
        return np.zeros(n, bool)
    k = max(2, int(round(1 / holdout)))
    return np.arange(n) % k == k - 1


def split_batches(calib, batch: int, holdout: float) -> tuple[list[dict], list[dict]]:
    """Training batches and held-out batches (`held_out_mask`); padding trimmed per batch (`_trim_padding`)."""
    from modelsurgeon.calibration import CalibrationData

    n = calib.num_samples
    held = held_out_mask(n, holdout)
    if not held.any():
        return [_trim_padding(f) for f in calib.batches(batch)], []

    def part(mask):
        return [_trim_padding(f) for f in
                CalibrationData({name: a[:n][mask] for name, a in calib.arrays.items()}, calib.source).batches(batch)]
    return part(~held), part(held)


@dataclasses.dataclass
class _Fit:
    before: float
    after: float
    steps: int
    kept: bool  # the trained values were kept (they improved the objective)


def _cosine(*progress: float) -> float:
    """The learning-rate factor of a cosine decay (large steps first, fine ones at the end) at the furthest of the
    given progress fractions: the share of steps done and the share of the time budget spent. A time budget that
    stops training before its steps then ends it at the end of the decay too, not at a large rate."""
    return 0.5 * (1 + math.cos(math.pi * min(max(progress), 1.0)))


def _fit(params: dict[str, Any], loss_of, train: list[int], held: list[int], steps: int, lr: float, deadline: float,
         progress=None) -> _Fit:
    """Adam on `loss_of(batch index)`, cycling over the `train` batches. Without held-out batches, the result is kept
    only if the mean objective over the training batches went down. With them, the objective on the held-out
    batches is measured ten times along the way and the best weights seen are kept (none if none beat the start):
    the objective is then the held-out one, and training stops doing harm once it starts fitting noise."""
    import torch

    def total(batches: list[int]) -> float:
        with torch.no_grad():
            return float(np.mean([float(loss_of(b)) for b in batches]))

    def keep_if_better(best: float, best_state):
        """(objective, weights) of the best point so far, the current weights included (held-out objective)."""
        value = total(held)
        if np.isfinite(value) and value < best:
            return value, {k: p.detach().clone() for k, p in params.items()}
        return best, best_state

    start = {k: p.detach().clone() for k, p in params.items()}
    before = total(held or train)
    if steps == 0 or not params:
        return _Fit(before, before, 0, False)
    opt = torch.optim.Adam(params.values(), lr=lr)
    check = max(1, steps // 10)
    best, best_state = before, None
    done = 0
    t0 = time.monotonic()
    for step in (progress(range(steps)) if progress is not None else range(steps)):
        now = time.monotonic()
        if step and now > deadline:
            break
        spent = (now - t0) / max(deadline - t0, 1e-9) if deadline < math.inf else 0.0
        for group in opt.param_groups:
            group["lr"] = lr * _cosine(step / steps, spent)
        opt.zero_grad(set_to_none=True)
        loss = loss_of(train[step % len(train)])
        if not torch.isfinite(loss):
            break
        loss.backward()
        opt.step()
        done += 1
        if held and (done % check == 0 or done == steps):
            best, best_state = keep_if_better(best, best_state)
    if held:
        if done % check and done != steps:  # stopped by the deadline between two checks
            best, best_state = keep_if_better(best, best_state)
        after, kept = best, best_state is not None
        restore = best_state if kept else start
    else:
        after = total(train)
        kept = bool(np.isfinite(after) and after < before)
        restore = None if kept else start
    if restore is not None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(restore[k])
    return _Fit(before, after if kept else before, done, kept)


class _TargetCache:
    """The original model's outputs per calibration batch, for the e2e objective. ONNX Runtime computes a batch's
    the first time it is asked for; float outputs are then kept in float16 while the kept bytes stay within
    `budget`. Float16 keeps logits to about 3 significant digits, far below what the KL between the two models
    measures, and halves their bytes, so SmolLM2's 64 windows of 128 tokens fit (805 MB). Past the budget, the
    outputs named in `top` (logits) are kept as their `TopLogits` (`top_k` entries per token: 2 KB at K=256 against
    98 KB for SmolLM2's 49152 logits in float16), and a batch that fits neither way is recomputed each time it is
    asked for (2.9 s of ONNX Runtime for SmolLM2's 2 x 512 tokens on docs/heal.md's Xeon, against 7-9 s for the
    e2e step itself). A batch keeps its full logits only where the budget still holds the batches not yet seen as
    their `TopLogits` (each estimated at this batch's size), so full logits never crowd out the top entries of the
    batches read at every step: the batches asked for first (heal's held-out ones) keep their full logits, and
    SmolLM2's 128 windows of 512 tokens all stay kept (9 batches in full, the 8 held-out ones among them, and 55 as
    their top entries: 1022 MB) where keeping full logits first come left 23 of its 56 training batches to
    recompute whenever a step read them."""

    def __init__(self, original, batches: list[dict[str, np.ndarray]], budget: int, top: tuple[str, ...] = (),
                 top_k: int = 256):
        self.original, self.batches, self.left = original, batches, budget
        self.top, self.top_k = set(top), top_k
        self.kept: dict[int, dict] = {}
        self.seen: set[int] = set()  # batches computed at least once

    def get(self, b: int) -> dict:
        import torch

        from modelsurgeon.onnx_torch import to_torch

        if b not in self.kept:
            out = self.original.run(self.batches[b])
            self.seen.add(b)
            small = {k: np.ascontiguousarray(v.astype(np.float16)) if v.dtype == np.float32 else v
                     for k, v in out.items()}
            size = sum(v.nbytes for v in small.values())
            if self.top & set(out):
                top_size = sum(TopLogits.nbytes_of(v, self.top_k) if k in self.top else v.nbytes
                               for k, v in small.items())
                unseen = len(self.batches) - len(self.seen)
                if size + unseen * top_size > self.left:
                    small = {k: TopLogits.of(out[k], self.top_k) if k in self.top else v for k, v in small.items()}
                    size = top_size
            if size > self.left:
                return {k: to_torch(v) for k, v in out.items()}
            self.left -= size
            self.kept[b] = {k: v if isinstance(v, TopLogits) else torch.from_numpy(v) for k, v in small.items()}
        return {k: v.for_loss() if isinstance(v, TopLogits) else v.float() if v.dtype == torch.float16 else v
                for k, v in self.kept[b].items()}


def _masks(batches: list[dict[str, np.ndarray]]) -> list:
    """Per batch, its padding mask as a float torch tensor [batch, seq] (None where nothing is padding)."""
    import torch

    return [None if (m := _padding_mask(f)) is None else torch.from_numpy(m.astype(np.float32)) for f in batches]


def _capture_batches(model: ir.Model, names: list[str], batches: list[dict[str, np.ndarray]], providers):
    """Per batch, the arrays of `names` that ONNX Runtime computes in `model`."""
    from modelsurgeon.capture import ActivationCapture

    cap = ActivationCapture(model, names, providers=providers)
    return [cap.run(feeds) for feeds in batches]


# ----------------------------------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------------------------------


@register_pass
class HealPass(Pass):
    name = "heal"
    summary = "tune the weights earlier passes created or touched so the model matches the original (distillation)"
    requires = ("canonicalize",)
    analyses = ("blocks",)
    preserves = ("blocks", "channel_groups")  # only initializer values change
    stage = Stage.STRUCTURE
    needs_calibration = True
    recovers = True
    options = {
        "steps": Option(int, 100, "optimizer steps per block (mode=blocks) or in all (mode=e2e); 0 changes nothing",
                        check=_non_negative),
        "lr": Option(float, 1e-4, "Adam learning rate", check=_positive),
        "train": Option(str, "touched", "which weights train: touched (created or changed by earlier passes), norms, "
                        "all", choices=("touched", "norms", "all")),
        "mode": Option(str, "blocks", "blocks: each block's output against the original's; e2e: the model's outputs "
                       "(KL on logits, MSE otherwise)", choices=("blocks", "e2e")),
        "seconds": Option(float, 0.0, "time budget for the whole pass in seconds (0: none); the learning rate's "
                          "cosine decay ends with it where it ends before the steps", check=_non_negative),
        "batch": Option(int, 8, "calibration samples per step", check=_positive),
        "holdout": Option(float, 0.0, "fraction of the calibration samples (every k-th) held back from training: "
                          "the weights kept are the best measured on them along the way, and the objective reported "
                          "is theirs (0: train on all, keep the end result if it lowered the objective)",
                          check=lambda v: None if 0 <= v < 1 else "must be at least 0 and below 1"),
        "rank": Option(int, 0, "train low-rank deltas of this rank (LoRA) for the matrices among the weights "
                       "chosen by train, folded into them when stored (0: train the weights themselves)",
                       check=_non_negative),
        "threads": Option(int, 1, "torch threads (1 by default: on a machine shared with other work, OpenMP threads "
                          "stall waiting for each other, 100x slower on small matrices)", check=_positive),
    }

    def run(self, model: ir.Model, ctx) -> PassResult:
        import torch

        from modelsurgeon.capture import batch_size_for

        from modelsurgeon.analyses.blocks import require_float_weights

        require_float_weights(model, "heal")
        calib = ctx.require_calibration(self.name)
        if ctx.original is None:
            raise UserError("heal: the original model is not available to match; run heal through "
                            "modelsurgeon.compile")
        t0 = time.monotonic()
        budget = self.config["seconds"] or float("inf")
        tb = ctx.analysis("blocks")
        names = trainable(model, ctx, self.config["train"], tb if tb.blocks else None)
        notes: dict[str, Any] = {"train": self.config["train"]}
        if not names:
            log.warning("heal: no weight to train (train=%s found none: the earlier passes created or changed no "
                        "weight); train=all tunes every weight", self.config["train"])
            return PassResult(model, False, notes={**notes, "trained_parameters": 0})
        batch = batch_size_for(ctx.model, self.config["batch"])
        train, held = split_batches(calib, batch, self.config["holdout"])
        batches = train + held
        split = list(range(len(train))), list(range(len(train), len(batches)))
        notes["heldout_batches"] = len(held)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.config["threads"])
        try:
            mode, why = self.config["mode"], ""
            if mode == "blocks":
                plan, why = self._block_plan(model, ctx, tb, names)
                if plan is None:
                    mode = "e2e"
            notes["mode"] = mode + (f" ({why})" if why else "")
            if mode == "blocks":
                result = self._heal_blocks(model, ctx, plan, batches, split, t0 + budget)
            else:
                result = self._heal_e2e(model, ctx, names, batches, split, t0 + budget)
        finally:
            torch.set_num_threads(threads)
        notes.update(result)
        notes["seconds"] = round(time.monotonic() - t0, 1)
        return PassResult(model, bool(notes.get("changed_initializers")), notes=notes,
                          skipped=notes.pop("skipped", []))

    # -- block mode ---------------------------------------------------------------------------------------------

    def _block_plan(self, model: ir.Model, ctx, tb, names: set[str]):
        """Units of consecutive blocks (blocks that share a trained weight are one unit), each with the original's
        values its blocks' outputs are matched to; None (and why) when block mode does not apply."""
        if not tb.blocks:
            return None, "no transformer blocks found"
        orig_values = {v.name: v for n in ctx.original.graph.all_nodes() for v in n.outputs}
        targets = {}
        for i, b in enumerate(tb.blocks):
            name = _stands_for(b, tb, ctx.original) or b.residual_out.name
            o = orig_values.get(name)
            if o is not None and (o.shape is None or b.residual_out.shape is None or
                                  len(o.shape) == len(b.residual_out.shape)):
                targets[i] = (b.residual_out.name, name)  # (this model's value, the original's)
        if not targets:
            return None, "no block output shares its name with the original's"
        owners: dict[str, list[int]] = {}
        block_params = []
        for i, b in enumerate(tb.blocks):
            p = _block_initializers(b.nodes) & names
            block_params.append(p)
            for n in p:
                owners.setdefault(n, []).append(i)
        units: list[list[int]] = []
        i = 0
        while i < len(tb.blocks):
            end = i
            j = i
            while j <= end:
                for n in block_params[j]:
                    end = max(end, max(owners[n]))
                j += 1
            units.append(list(range(i, end + 1)))
            i = end + 1
        outside = names - set().union(*block_params)
        plan = {"tb": tb, "units": units, "targets": targets, "params": block_params, "outside": outside}
        return plan, ""

    def _heal_blocks(self, model: ir.Model, ctx, plan, batches, split, deadline: float) -> dict:
        import torch

        from modelsurgeon.onnx_torch import TorchGraph, to_torch

        tb, units, targets = plan["tb"], plan["units"], plan["targets"]
        blocks = tb.blocks
        order = {id(n): k for k, n in enumerate(model.graph)}
        graphs, wanted_side = [], []
        for unit in units:
            nodes = sorted({id(n): n for i in unit for n in blocks[i].nodes}.values(), key=lambda n: order[id(n)])
            outs = [targets[i][0] for i in unit if i in targets]
            last = blocks[unit[-1]].residual_out.name
            outs = list(dict.fromkeys(outs + [last]))
            params = TunedWeights(model, set().union(*(plan["params"][i] for i in unit)), self.config["rank"])
            g = TorchGraph(nodes, outs, params.values())
            stream_in = blocks[unit[0]].residual_in.name
            side = [n for n in g.external if n != stream_in]
            graphs.append((unit, g, params, stream_in, side, last))
            wanted_side.append(side)

        # the stream entering the first unit, from the compressed model
        first_in = graphs[0][3]
        captured = _capture_batches(model, [first_in], batches, ctx.providers)
        stream = {first_in: [to_torch(c[first_in]) for c in captured]}
        stream_bytes = sum(t.numel() * 4 for t in stream[first_in])
        per_chunk = max(1, int(CAPTURE_BUDGET // max(stream_bytes * 2, 1)))

        masks = _masks(batches)
        fits, skipped, changed, trained = [], [], set(), 0
        progress = iter(ctx.progress_bar(range(len(graphs)), desc="heal: blocks", total=len(graphs)))
        for c0 in range(0, len(graphs), per_chunk):
            chunk = graphs[c0:c0 + per_chunk]
            side_names = list(dict.fromkeys(n for entry in chunk for n in entry[4]))
            tgt_names = list(dict.fromkeys(targets[i][1] for unit, *_ in chunk for i in unit if i in targets))
            side_vals = (_capture_batches(model, side_names, batches, ctx.providers) if side_names
                         else [{}] * len(batches))
            tgt_vals = _capture_batches(ctx.original, tgt_names, batches, ctx.providers)
            side_t = [{k: to_torch(v) for k, v in s.items()} for s in side_vals]
            tgt_t = [{k: to_torch(v) for k, v in t.items()} for t in tgt_vals]
            del side_vals, tgt_vals
            for k, (unit, g, params, stream_in, side, last) in enumerate(chunk):
                next(progress, None)
                if stream_in not in stream:  # the unit's input is not the previous unit's output: as ORT computes it
                    stream[stream_in] = [to_torch(c[stream_in]) for c in
                                         _capture_batches(model, [stream_in], batches, ctx.providers)]
                xs = stream[stream_in]
                matched = [targets[i] for i in unit if i in targets]  # (output, the original's value)

                def feeds(b):
                    f = {n: side_t[b][n] for n in side}
                    f[stream_in] = xs[b]
                    return f

                def loss_of(b):
                    g.params = params.values()
                    out = g(feeds(b))
                    return sum(_nmse(out[mine], tgt_t[b][theirs], masks[b]) for mine, theirs in matched) / len(matched)

                label = f"blocks {unit[0]}-{unit[-1]}" if len(unit) > 1 else f"block {unit[0]}"
                if params.names and matched:
                    remaining = max(len(graphs) - (c0 + k), 1)
                    unit_deadline = time.monotonic() + max(deadline - time.monotonic(), 0) / remaining
                    fit = _fit(params.parameters, loss_of, *split, self.config["steps"], self.config["lr"],
                               unit_deadline)
                    fits.append(fit)
                    if fit.kept:
                        params.store(model)
                        changed |= set(params.names)
                        trained += params.trained_count()
                    elif fit.steps:
                        skipped.append(f"{label}: tuning did not lower its error ({fit.before:.3g}); weights kept")
                elif params.names:
                    skipped.append(f"{label}: its output has no counterpart in the original; weights kept")
                with torch.no_grad():
                    g.params = params.values()
                    stream = {last: [g(feeds(b))[last] for b in range(len(batches))]}
            del side_t, tgt_t
        for _ in progress:
            pass
        if plan["outside"]:
            skipped.append(f"{len(plan['outside'])} weight(s) outside the blocks (embedding, head, final norm) are not "
                           f"tuned in block mode, e.g. {sorted(plan['outside'])[0]}; mode=e2e tunes them")
        return self._summary(fits, changed, trained, model, skipped, units=len(units))

    # -- end-to-end mode ----------------------------------------------------------------------------------------

    def _heal_e2e(self, model: ir.Model, ctx, names: set[str], batches, split, deadline: float) -> dict:
        import torch

        from modelsurgeon.onnx_torch import feeds_to_torch, graph_function

        outputs = [o.name for o in model.graph.outputs]
        ref = _capture_batches(ctx.original, outputs, batches[:1], ctx.providers)[0]
        logits = [n for n in outputs if n in ref and _logits_like(n, ref[n])]
        matched = logits or [n for n in outputs if n in ref and np.issubdtype(ref[n].dtype, np.floating)]
        if not matched:
            raise UserError("heal: the model has no float output to match against the original's")
        from modelsurgeon.capture import ActivationCapture

        original = ActivationCapture(ctx.original, matched, providers=ctx.providers)
        targets = _TargetCache(original, batches, TARGET_CACHE_BUDGET, top=tuple(logits))
        params = TunedWeights(model, names, self.config["rank"])
        g = graph_function(model, params.values(), outputs=matched)
        torch_feeds = [feeds_to_torch(f) for f in batches]

        masks = _masks(batches)

        def loss_of(b):
            g.params = params.values()
            out, tgt = g(torch_feeds[b]), targets.get(b)
            return sum((_kl if n in logits else _nmse)(out[n], tgt[n], masks[b]) for n in matched) / len(matched)

        steps = self.config["steps"]
        fit = _fit(params.parameters, loss_of, *split, steps, self.config["lr"], deadline,
                   progress=lambda it: ctx.progress_bar(it, desc="heal: end to end", total=steps))
        changed, trained = set(), 0
        if fit.kept:
            params.store(model)
            changed, trained = set(params.names), params.trained_count()
        skipped = [] if fit.kept or not fit.steps else [f"model: tuning did not lower its error ({fit.before:.3g}); "
                                                         "weights kept"]
        out = self._summary([fit], changed, trained, model, skipped, units=1)
        out["objective"] = "KL(original || model) of " + ", ".join(logits) if logits else "normalized MSE"
        return out

    @staticmethod
    def _summary(fits: list[_Fit], changed: set[str], trained: int, model: ir.Model, skipped: list[str],
                 units: int) -> dict:
        before = float(np.mean([f.before for f in fits])) if fits else 0.0  # mean over the units tuned
        after = float(np.mean([f.after for f in fits])) if fits else 0.0
        return {
            "units": units,
            "steps": int(sum(f.steps for f in fits)),
            "objective_before": round(before, 6),
            "objective_after": round(after, 6),
            "changed_initializers": len(changed),
            "changed_parameters": int(sum(model.graph.initializers[n].const_value.size for n in changed)),
            "trained_parameters": trained,  # what the optimizer moved: the LoRA factors' size with rank > 0
            "skipped": skipped,
        }
