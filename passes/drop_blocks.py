"""drop-blocks: remove whole transformer blocks, chosen on calibration data.

`drop-blocks(n=4)` or `drop-blocks(ratio=0.2)`, with `metric`:
- `bi` (ShortGPT's Block Influence): BI_l = 1 − mean over tokens of cos(h_l, h_{l+1}), the residual stream
  before and after block l (the last block's output is taken before the final norm). The n blocks with
  the lowest influence go.
- `angular` (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"): the contiguous run of n
  blocks l..l+n−1 whose input h_l and output h_{l+n} are closest in angle, arccos(cos)/π averaged over tokens.
Tokens are weighted by `attention_mask` when the model has one (padding does not vote).

The stream is rewired around each removed block (its output's readers read its input instead), then the
removed blocks' nodes and initializers are deleted (anything still used elsewhere, such as shared rotary
tables or masks, stays). A KV-cache decoder's removed blocks lose their cache outputs (`present.N.key/value`,
found as the cache-named outputs computed inside them) and the cache inputs only they read
(`past_key_values.N.*`), so their attention is not computed any more; verification expects those outputs no
more (`verify.REMOVED_OUTPUTS`). The other inputs and outputs keep their names (a model folder's writer renumbers
the cache to match its config: `model_folder`); the report lists the blocks removed with their scores. Works on pre-norm (Llama, OPT) and post-norm (BERT) stacks found by the "blocks" analysis.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from modelsurgeon.calibration import require_finite
from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Option, Pass, PassResult, register_pass
from modelsurgeon.verify import REMOVED_OUTPUTS


def found_blocks(ctx, pass_name: str):
    """The "blocks" analysis, or a UserError saying why this pass cannot work on the model."""
    tb = ctx.analysis("blocks")
    if not tb.blocks:
        why = "; ".join(tb.problems) or "no residual blocks"
        raise UserError(f"{pass_name}: no transformer blocks found in this model ({why}); "
                        "it works on decoder and encoder transformers")
    return tb


def token_weights(feeds: dict[str, np.ndarray], lead_shape: tuple[int, ...]) -> np.ndarray:
    """Per-token weights [prod(lead_shape)]: the attention mask when one fits, else ones."""
    for name, arr in feeds.items():
        if "mask" in name.lower() and tuple(arr.shape) == tuple(lead_shape):
            return np.asarray(arr, np.float64).reshape(-1)
    return np.ones(int(np.prod(lead_shape)), np.float64)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)


def stream_similarities(model: ir.Model, ctx, stream: list[ir.Value], pairs: list[tuple[int, int]],
                        desc: str, bases: list[np.ndarray | None] | None = None) -> dict[tuple[int, int], float]:
    """Token-weighted mean cos(stream[i], stream[j]) over the calibration data, for each (i, j) in `pairs`.
    `bases[l]` (a sliced model's shortcut product of block l, or None) carries stream[l] into stream[l + 1]'s basis:
    stream[i] is compared after bases[i..j-1]."""
    from modelsurgeon.capture import ActivationCapture, batch_size_for

    calib = ctx.calibration
    names = list(dict.fromkeys(v.name for v in stream))
    cap = ActivationCapture(model, names)
    sums = {p: 0.0 for p in pairs}
    weight = 0.0
    bs = batch_size_for(model, 4)
    for feeds in ctx.progress_bar(calib.batches(bs), desc=desc, total=calib.num_batches(bs)):
        out = cap.run(feeds)
        first = out[stream[0].name]
        w = token_weights(feeds, first.shape[:-1])
        weight += w.sum()
        for i, j in pairs:
            a = out[stream[i].name]
            for m in (bases or [None] * len(stream))[i:j]:
                a = a if m is None else a @ m
            sums[(i, j)] += float(w @ _cosines(a, out[stream[j].name]))
    for (i, j), total in sums.items():
        require_finite(np.array([total]), stream[j].name, "drop-blocks")
    return {p: s / max(weight, 1e-300) for p, s in sums.items()}


def shortcut_product(block) -> np.ndarray | None:
    """S_attn S_mlp of a sliced block's residual shortcuts (computed in float64, returned in the weights' dtype), None
    when it has none."""
    weights = [s.weight_matrix() for s in (block.attn_shortcut, block.mlp_shortcut) if s is not None]
    if not weights:
        return None
    matrix = weights[0].astype(np.float64)
    for w in weights[1:]:
        matrix = matrix @ w.astype(np.float64)
    return matrix.astype(weights[0].dtype)


def bypass_block(graph: ir.Graph, block) -> None:
    """Make every reader of the block's output read its input instead (graph outputs via an Identity).

    A block of a sliced model carries its stream's changes of basis on the residual path (`attn_shortcut`,
    `mlp_shortcut`: h_out = (h_in S_attn + attn) S_mlp + mlp): its readers then read h_in S_attn S_mlp, one MatMul by
    the product of the two, marked like slice's shortcuts (quantizers keep it at 8 bits or in float), so the next
    block still gets the stream in the basis it was sliced for."""
    old, new = block.residual_out, block.residual_in
    matrix = shortcut_product(block)
    if matrix is not None:
        from modelsurgeon.passes._quant_graph import mark_keep_float

        base = f"{block.attn_add.name or 'block'}.bypass_shortcut"
        weight = ir.Value(name=f"{base}.weight", shape=ir.Shape(matrix.shape), type=ir.TensorType(new.dtype),
                          const_value=ir.tensor(matrix, name=f"{base}.weight"))
        graph.register_initializer(weight)
        mm = ir.Node("", "MatMul", [new, weight], name=base)
        mm.outputs[0].dtype, mm.outputs[0].shape = old.dtype, old.shape
        mark_keep_float(mm, "residual shortcut of slice kept by drop-blocks: its error goes straight into the stream")
        graph.insert_before(block.mlp_add, mm)  # after the stream's producer, before every reader of the output
        new = mm.outputs[0]
    if old.is_graph_output():
        ident = ir.Node("", "Identity", [new], name=f"{old.name}.bypass")
        graph.insert_after(block.residual_out.producer(), ident)
        out = ident.outputs[0]
        out.dtype, out.shape = old.dtype, old.shape
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        name = old.name
        old.name = f"{name}.removed"
        out.name = name
    else:
        ir.convenience.replace_all_uses_with(old, new)


def _only_shape_read(graph: ir.Graph, value: ir.Value) -> bool:
    """True when `value` (a graph input that lost readers) has none left, or only Shape readers, which then read a
    graph input of the same declared shape and type instead (Optimum reads the past length off layer 0's cache);
    False when something else still reads it."""
    readers = [node for node, _ in value.uses()]
    if not readers:
        return True
    if any(n.op_type != "Shape" or n.domain not in ("", "ai.onnx") for n in readers) or not CACHE_NAME.search(value.name):
        return False
    twin = next((v for v in graph.inputs if v is not value and CACHE_NAME.search(v.name or "") and v.dtype == value.dtype
                 and v.shape is not None and value.shape is not None and list(v.shape) == list(value.shape)
                 and any(n.op_type != "Shape" for n, _ in v.uses())), None)
    if twin is None:
        return False
    for node in readers:
        node.replace_input_with(0, twin)
    return True


CACHE_NAME = re.compile(r"present|past|cache|key|value", re.IGNORECASE)


def removed_cache_outputs(graph: ir.Graph, blocks, drop: list[int]) -> list[ir.Value]:
    """The graph outputs computed inside the dropped blocks (a KV-cache decoder's `present.N.key/value`): outputs
    named like a cache whose latest residual-stream ancestor is a dropped block's input. Each block's attention
    reads its own input stream and nothing later, so its cache depends on no later stream value."""
    level: dict[int, int] = {id(b.residual_in): b.index for b in blocks}
    level[id(blocks[-1].residual_out)] = len(blocks)
    stream = set(level)
    dropped = {blocks[i].index for i in drop}

    def of(value: ir.Value | None) -> int:
        return -1 if value is None else level.get(id(value), -1)

    for node in graph:  # topological order
        here = max((of(v) for v in node.inputs), default=-1)
        for out in node.outputs:
            if id(out) not in stream:
                level[id(out)] = here
    return [v for v in graph.outputs if id(v) not in stream and of(v) in dropped and CACHE_NAME.search(v.name or "")]


@register_pass
class DropBlocksPass(Pass):
    name = "drop-blocks"
    requires = ("canonicalize",)  # the block finder reads the canonical form
    summary = "remove whole transformer blocks ranked by block influence or angular distance on calibration data"
    analyses = ("blocks",)
    needs_calibration = True
    options = {
        "n": Option((int, type(None)), None, "number of blocks to remove",
                    check=lambda v: None if v is None or v > 0 else "must be positive"),
        "ratio": Option((float, type(None)), None, "share of the blocks to remove (rounded, at least one)",
                        check=lambda v: None if v is None or 0 < v < 1 else "must lie in (0, 1)"),
        "metric": Option(str, "bi", "bi: lowest block influence (1 - cos(in, out)); angular: the contiguous run "
                         "whose input and output are closest in angle", choices=("bi", "angular")),
    }

    def validate(self) -> None:
        if (self.config["n"] is None) == (self.config["ratio"] is None):
            raise UserError("drop-blocks: give exactly one of n=BLOCKS or ratio=SHARE, e.g. drop-blocks(n=4)")

    def run(self, model: ir.Model, ctx) -> PassResult:
        from modelsurgeon.passes.cleanup import remove_unused

        tb = found_blocks(ctx, self.name)
        blocks = tb.blocks
        count = len(blocks)
        n = self.config["n"] if self.config["n"] is not None else max(1, int(round(self.config["ratio"] * count)))
        if n >= count:
            raise UserError(f"drop-blocks: the model has {count} blocks; remove fewer than that (n={n})")
        ctx.require_calibration(self.name)
        stream = [b.residual_in for b in blocks] + [blocks[-1].residual_out]
        bases = [shortcut_product(b) for b in blocks]  # a sliced model's stream changes basis block by block
        bases = bases if any(m is not None for m in bases) else None
        metric = self.config["metric"]
        if metric == "bi":
            cos = stream_similarities(model, ctx, stream, [(i, i + 1) for i in range(count)], "drop-blocks: block influence",
                                      bases)
            scores = {i: 1.0 - cos[(i, i + 1)] for i in range(count)}
            drop = sorted(sorted(scores, key=lambda i: (scores[i], i))[:n])
            score_note = {_label(blocks[i]): round(scores[i], 6) for i in range(count)}
        else:
            pairs = [(i, i + n) for i in range(count - n + 1)]
            cos = stream_similarities(model, ctx, stream, pairs, "drop-blocks: angular distance", bases)
            dist = {i: float(np.arccos(np.clip(cos[(i, i + n)], -1, 1)) / np.pi) for i in range(count - n + 1)}
            start = min(dist, key=lambda i: (dist[i], i))
            drop = list(range(start, start + n))
            score_note = {f"{_label(blocks[i])}..{_label(blocks[i + n - 1])}": round(d, 6) for i, d in dist.items()}

        params_before = _initializer_elements(model)
        cache_outputs = removed_cache_outputs(model.graph, blocks, drop)
        uses_before = {id(v): len(v.uses()) for v in model.graph.inputs}
        for i in sorted(drop, reverse=True):
            bypass_block(model.graph, blocks[i])
        for value in cache_outputs:
            model.graph.outputs.remove(value)
        remove_unused(model)
        cache_inputs = [v for v in model.graph.inputs if uses_before.get(id(v)) and len(v.uses()) < uses_before[id(v)]
                        and not v.is_graph_output() and _only_shape_read(model.graph, v)]
        for value in cache_inputs:
            model.graph.inputs.remove(value)
        if cache_outputs:
            model.meta[REMOVED_OUTPUTS] = [*model.meta.get(REMOVED_OUTPUTS, ()), *(v.name for v in cache_outputs)]
        removed = params_before - _initializer_elements(model)
        notes = {
            "metric": metric,
            "removed": [_label(blocks[i]) for i in drop],
            "removed_indices": drop,
            "blocks_left": count - n,
            "parameters_removed": int(removed),
            **({"cache_removed": [v.name for v in cache_inputs + cache_outputs]} if cache_outputs else {}),
            "bi" if metric == "bi" else "angular_distance": score_note,
        }
        return PassResult(model, True, notes=notes)


def _label(block) -> str:
    scope = getattr(block, "scope", "") or ""
    return f"block {block.index}" + (f" ({scope})" if scope else "")


def _initializer_elements(model: ir.Model) -> int:
    return int(sum(np.prod(v.const_value.shape, dtype=np.int64) for v in model.graph.initializers.values()
                   if v.const_value is not None))
