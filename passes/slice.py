"""`slice`: SliceGPT on the ONNX graph: rotate the residual stream by PCA, then delete its weakest directions.

After `fold-norms` every norm on the stream is a weightless RMS norm, which commutes with orthogonal maps:
RMS(x Q) = RMS(x) Q. So each block's stream may be expressed in its own orthonormal basis Q (option `bases`):
- `half-block` (as in the paper): the embedding tables write in basis Q_0; block l reads the attention input
  (q, k, v rows) in Q_2l, writes the attention output (o columns, bias) in Q_2l+1, reads the MLP input (gate, up
  rows) in Q_2l+1 and writes the MLP output (down columns, bias) in Q_2l+2; the LM head reads Q_2L. Where the
  basis changes, the residual connection gets a k x k shortcut matrix, two per block:
  h_mid = h_in (Q_2l^T Q_2l+1) + attn, h_out = h_mid (Q_2l+1^T Q_2l+2) + mlp.
- `block` (the default): block l reads and writes its attention in Q_l and reads its MLP in Q_l too (the PCA of
  both inputs' moments together), the MLP writes in Q_l+1, the head reads Q_L. One shortcut per block:
  h_mid = h_in + attn, h_out = h_mid (Q_l^T Q_l+1) + mlp. On SmolLM2-135M (d 576, k 432) the shortcuts are a
  sixth of a sliced block's parameters, so this is markedly faster, and it measured better perplexity too.
- `model`: one basis Q for the whole stream, the PCA of the dense stream's second moments at every block input
  and MLP input together (each point normalized by its trace, so late blocks' larger activations do not outvote
  early ones). The stream never changes basis, so there are no shortcut matrices: the residual Adds stay plain
  Adds (fuse makes them Skip norms) and every byte saved is a byte of the projections.
Each Q holds the eigenvectors (descending) of the damped second-moment matrix of the stream at that point,
measured on calibration data, sequentially (SliceGPT, Ashkboos et al. 2024): a block is measured on inputs that
already carry the slicing error of the blocks before it. Keeping only the first k columns of every Q deletes the
directions with least energy; k = d * (1 - sparsity) rounded down to a multiple of 8. Option `widths` gives
chosen blocks their own kept width; where two bases differ in width, the shortcut between them is rectangular.

A norm now sees k of the d coordinates (k: the width of the basis it reads). The mean of squares over the kept
width must stay the mean over d:
x / sqrt(sum(x^2)/d + eps) = sqrt(d/k) * x / sqrt(sum(x^2)/k + eps*d/k), so each norm becomes an RMS norm over
k with epsilon eps*d/k and scale sqrt(d/k) (RMSNormalization from opset 23, else the decomposed form).

Preserved: graph inputs and outputs, every node off the residual stream (attention internals, rotary tables,
masks). `sparsity=0` is exact (rotation only). Post-norm (BERT-style) models are refused.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from modelsurgeon.analyses.blocks import (Linear, TransformerBlocks, const_array, copy_type, drop_if_unused,
                                          match_linear, naming, new_initializer, unique_name)
from modelsurgeon.calibration import require_finite
from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Option, Pass, PassResult, Stage, register_pass
from modelsurgeon.passes._quant_graph import mark_keep_float
from modelsurgeon.analyses.blocks import require_float_linears
from modelsurgeon.passes.fold_norms import head_is_tied, opset_of, replace_norm, require_pre_norm

log = logging.getLogger("modelsurgeon")


def kept_width(d: int, sparsity: float, multiple: int = 8) -> int:
    """Columns kept of a d-wide stream: d*(1-sparsity) rounded down to `multiple` (all of them at sparsity 0)."""
    if sparsity <= 0:
        return d
    k = int(d * (1.0 - sparsity) + 1e-9)
    k -= k % multiple
    return max(min(multiple, d), min(d, k))


def pca(h: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvectors (columns, by descending eigenvalue) and eigenvalues of a damped second-moment matrix."""
    import torch

    h = h + damp * float(np.mean(np.diag(h))) * np.eye(h.shape[0])
    with _one_thread():  # multithreaded eigh is up to 10x slower on a busy machine
        vals, vecs = torch.linalg.eigh(torch.from_numpy(h))
    vals, vecs = vals.numpy(), vecs.numpy()
    order = np.argsort(vals)[::-1]
    return vecs[:, order], vals[order]


class _one_thread:
    """Run torch's CPU linear algebra on one thread (restored afterwards)."""

    def __enter__(self):
        import torch

        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.saved)
        return False


# ----------------------------------------------------------------------------------------------------------------
# Calibration: the stream at every point, measured block by block on sub-models of the (folded) model
# ----------------------------------------------------------------------------------------------------------------


def _session(model: ir.Model, graph: ir.Graph):
    from modelsurgeon.runtime.session import make_session

    sub = ir.Model(graph, ir_version=model.ir_version, producer_name="modelsurgeon-slice")
    sub.opset_imports.update(model.opset_imports)
    return make_session(sub, accuracy_level=0)


class StreamRunner:
    """Runs pieces of the model: inputs -> embedding output, and each block's attention and MLP halves."""

    def __init__(self, model: ir.Model, tb: TransformerBlocks):
        self.model, self.tb = model, tb
        self.inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]

    def _run(self, start: ir.Value | None, end: ir.Value, xs: list[np.ndarray] | None, feeds: list[dict],
             weights: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """Run the piece of the model between `start` and `end` on `xs`; `weights` replaces the weights ([in, out])
        of the Linears named there."""
        graph = ir.convenience.extract(self.model.graph, inputs=([start] if start is not None else []) + self.inputs,
                                       outputs=[end])
        for v in [*list(graph.inputs)[:1], *graph.outputs]:  # the legacy exporter leaves intermediate values untyped
            if v.dtype is None:
                v.dtype = self.tb.embedding.table.dtype or ir.DataType.FLOAT
        for node in list(graph) if weights else ():
            if node.name in weights:
                match_linear(node).set_weight(graph, weights[node.name])
        sess = _session(self.model, graph)
        names = {i.name for i in sess.get_inputs()}
        out = []
        for i, feed in enumerate(feeds):
            f = {k: v for k, v in feed.items() if k in names}
            if start is not None:
                f[start.name] = xs[i]
            out.append(sess.run([end.name], f)[0])
        return out

    def embedding(self, feeds):
        return self._run(None, self.tb.embedding.output, None, feeds)

    def attention(self, block, xs, feeds, weights=None):
        return self._run(block.residual_in, block.residual_mid, xs, feeds, weights)

    def mlp(self, block, xs, feeds, weights=None):
        return self._run(block.residual_mid, block.residual_out, xs, feeds, weights)

    def final_norm(self, feeds):
        """The final norm's output in the unsliced model: what the LM head reads."""
        return self._run(None, self.tb.final_norm.output, None, feeds)


def _token_weights(feeds: list[dict], xs: list[np.ndarray]) -> list[np.ndarray | None]:
    """Per-token 0/1 weights from an attention_mask input (padding is left out of the statistics)."""
    out = []
    for feed, x in zip(feeds, xs):
        mask = next((v for k, v in feed.items() if "mask" in k.lower() and v.ndim == 2), None)
        if mask is None or np.all(mask != 0):
            out.append(None)
            continue
        m = (np.asarray(mask) != 0).astype(np.float64)
        out.append(m.reshape(-1) if m.size * x.shape[-1] == x.size else None)
    return out


def _rows(xs: list[np.ndarray], weights: list[np.ndarray | None] | None = None):
    """All tokens of a batch list as one float64 torch matrix [tokens, d] (padding rows zeroed)."""
    import torch

    d = xs[0].shape[-1]
    parts = [np.asarray(x).reshape(-1, d) for x in xs]
    if weights is not None and any(w is not None for w in weights):
        parts = [p * (1.0 if w is None else w[:, None].astype(p.dtype)) for p, w in zip(parts, weights)]
    return torch.from_numpy(np.concatenate(parts)).double()


def second_moment(xs: list[np.ndarray], weights: list[np.ndarray | None]) -> np.ndarray:
    """sum over tokens of x x^T, in float64 (tokens with weight 0, i.e. padding, left out)."""
    with _one_thread():
        x = _rows(xs, weights)
        return require_finite((x.T @ x).numpy(), "residual stream", "slice")


def project(xs: list[np.ndarray], q: np.ndarray, q_all: np.ndarray) -> list[np.ndarray]:
    """x -> x Q Q^T (the part of the stream that survives slicing, in the original basis).

    Computed as x - (x R) R^T with R the deleted columns of the full rotation `q_all` (fewer flops)."""
    import torch

    r = torch.from_numpy(np.ascontiguousarray(q_all[:, q.shape[1]:]))
    if r.shape[1] == 0:
        return xs
    with _one_thread():
        x = _rows(xs)
        y = (x - (x @ r) @ r.T).numpy()
    out, start = [], 0
    for a in xs:
        n = a.size // a.shape[-1]
        out.append(y[start:start + n].reshape(a.shape).astype(a.dtype))
        start += n
    return out


def rms(xs: list[np.ndarray], eps: float) -> list[np.ndarray]:
    """What a weightless RMS norm makes of each array (float64)."""
    out = []
    for x in xs:
        x = np.asarray(x, np.float64)
        out.append(x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))
    return out


def refit_map(sliced: list[np.ndarray], dense: list[np.ndarray], qk: np.ndarray, weights: list, ridge: float) -> np.ndarray:
    """M (d x d) such that the layers reading a norm, given weights M W, best reproduce the dense model.

    Least squares over calibration tokens: with C the sliced model's normalized stream in kept coordinates
    (C = N_s Q_k), minimize ||C V - N_d||^2 + r ||V - Q_k^T||^2 over V (k x d), and M = Q_k V. The ridge term pulls
    V towards Q_k^T, the uncorrected layers (M = Q_k Q_k^T), not towards zero, which would shrink their inputs:
    V = (C^T C + r)^-1 (C^T N_d + r Q_k^T), with r = `ridge` times the mean of diag(C^T C).
    This folds the correlation between kept and deleted directions, and the error of earlier blocks, back in.
    """
    import torch

    with _one_thread():
        q = torch.from_numpy(np.ascontiguousarray(qk))
        c = _rows(sliced, weights) @ q
        nd = _rows(dense, weights)
        g = c.T @ c
        r = ridge * float(torch.mean(torch.diag(g)))
        g += r * torch.eye(g.shape[0], dtype=g.dtype)
        return qk @ torch.linalg.solve(g, c.T @ nd + r * q.T).numpy()


def basis_widths(tb: TransformerBlocks, bases: str, k: int, overrides: dict[int, int]) -> list[int]:
    """The kept width of every basis: k, except where `overrides` (block index -> width; index len(blocks) is the
    final stream, which the head reads) says otherwise. With `bases=half-block` a block's width holds for both of
    its bases (attention input and MLP input)."""
    return [overrides.get(i, k) for i, slot in enumerate(width_slots(tb, bases)) for _ in slot]


def parse_widths(text: str, d: int) -> dict[int, int]:
    """'0-2:576;29:512' -> {0: 576, 1: 576, 2: 576, 29: 512}; raises ValueError with a reason."""
    out: dict[int, int] = {}
    for item in text.replace(" ", "").split(";"):
        if not item:
            continue
        where, sep, width = item.partition(":")
        first, dash, last = where.partition("-")
        if not sep or not first.isdigit() or (dash and not last.isdigit()) or not width.isdigit():
            raise ValueError(f"'{item}' is not BLOCKS:WIDTH (e.g. '0-2:576;29:512')")
        if not 1 <= int(width) <= d:
            raise ValueError(f"width {width} is not between 1 and the model width {d}")
        lo, hi = int(first), int(last) if dash else int(first)
        if hi < lo:
            raise ValueError(f"block range {where} is empty")
        out.update({i: int(width) for i in range(lo, hi + 1)})
    return out


@dataclasses.dataclass
class SlicePlan:
    """What `compute_rotations` measured: rotations Q_0..Q_2L, and (with correction) per-norm input maps."""

    qs: list[np.ndarray]
    energy: list[float]
    attn_maps: list[np.ndarray | None]
    mlp_maps: list[np.ndarray | None]
    head_map: np.ndarray | None = None
    bases: str = "block"
    spectra: list[np.ndarray] = dataclasses.field(default_factory=list)  # each basis's PCA eigenvalues
    final_stream: list[np.ndarray] | None = None  # bases=model with the correction: the sliced and dense streams
    final_dense: list[np.ndarray] | None = None  # after the last block, for the head's refit

    def block_bases(self, index: int) -> tuple[int, int, int]:
        """Indices into `qs` of block `index`'s bases: attention input, MLP input (= attention output), MLP output."""
        if self.bases == "model":
            return 0, 0, 0
        if self.bases == "block":
            return index, index, index + 1
        return 2 * index, 2 * index + 1, 2 * index + 2


def compute_rotations(model: ir.Model, tb: TransformerBlocks, feeds: list[dict], ks: list[int], damp: float,
                      progress=None, correct: bool = False, ridge: float = 0.1, tied_head_weight: float = 0.0,
                      bases: str = "block") -> SlicePlan:
    """The rotations (d x d each), the energy kept at each one and, with `correct`, the refit maps.

    `bases="half-block"`: Q_0 .. Q_2L, one at the embedding and one after each attention and each MLP.
    `bases="block"`: Q_0 .. Q_L, one per block, shared by its attention input and its MLP input (the PCA of both
    points' second moments together; the MLP input's is measured on a first attention run with the block input's
    own PCA), and Q_L for the final stream. `ks` holds each basis's kept width (`basis_widths`).

    The sliced model is followed in the original basis: each half-block runs (as an ONNX sub-model) on its
    input projected onto the kept directions, x Q_k Q_k^T, which is exactly what the sliced model computes.
    With `correct`, the dense model is run alongside and the layers reading each norm are refit (`refit_map`).

    A head tied to the embedding table reads the final stream through Q_0 (see `apply_rotations`), so with
    `tied_head_weight` w > 0, Q_0 is the PCA of E/tr(E) + w H/tr(H): E the second moment of the embedding output
    (and, with one basis per block, of block 0's MLP input), H that of what the head reads in the dense model
    (the final norm's output). With `bases="model"` the one basis serves 2L+1 points, so w is scaled by 2/(2L+1):
    the head then weighs as much against each point as against Q_0's two (SmolLM2 at 25%, float: perplexity 156
    with w=0, 139 at w=0.15 against the summed points, 142 at 0.5, 167 at 2, 230 at 8; the scaled default gives 0.26).
    """
    runner = StreamRunner(model, tb)
    if bases == "model":  # the head weighs as much against each of the one basis's 2L+1 points as against Q_0's two
        tied_head_weight *= 2 / (2 * len(tb.blocks) + 1)
    xs = runner.embedding(feeds)
    dense = xs if correct else None
    weights = _token_weights(feeds, xs)
    plan = SlicePlan([], [], [], [], bases=bases)
    head_moment = None
    if tied_head_weight > 0 and tb.final_norm is not None:
        head_in = runner.final_norm(feeds)
        head_moment = second_moment(head_in, weights)
        del head_in

    def moment(values: list[np.ndarray]) -> np.ndarray:
        return second_moment(values, weights)

    def with_head(h: np.ndarray) -> np.ndarray:
        if head_moment is not None and not plan.qs:  # Q_0 also serves the tied head
            h = h / np.trace(h) + tied_head_weight * head_moment / np.trace(head_moment)
        return h

    def measure(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The next basis: (its kept columns, the full rotation)."""
        q, vals = pca(with_head(h), damp)
        width = ks[len(plan.qs)]
        plan.qs.append(q)
        plan.spectra.append(vals)
        plan.energy.append(float(vals[:width].sum() / vals.sum()))
        return q[:, :width], q

    def refit(sliced, dense_in, qk, eps, lins):
        if not correct:
            return None, None
        m = refit_map(rms(sliced, eps), rms(dense_in, eps), qk, weights, ridge)
        return m, {lin.node.name: m @ lin.weight_matrix().astype(np.float64) for lin in lins}

    def half_block(run, block, xs, dense, q, norm, lins, maps):
        """One half-block on its sliced input (and the dense model alongside): its output and dense output."""
        x = project(xs, *q)
        m, w = refit(x, dense, q[0], norm.epsilon, lins)
        maps.append(m)
        out = run(block, x, feeds, w)
        return out, (run(block, dense, feeds) if correct else None)

    if bases == "model":
        plan = _one_rotation(runner, tb, feeds, xs, dense, plan, measure, moment, half_block, progress)
        if correct and tb.lm_head is not None:
            q = plan.qs[0][:, :ks[0]], plan.qs[0]
            plan.head_map, _ = refit(project(plan.final_stream, *q), plan.final_dense, q[0], tb.final_norm.epsilon, [])
        return plan
    blocks = tb.blocks if progress is None else progress(tb.blocks, desc="slice: PCA per block", total=len(tb.blocks))
    if bases == "block":
        for block in blocks:
            h_in = moment(xs)
            first = pca(with_head(h_in), damp)[0]  # a first guess, to measure the MLP input with
            h_mid = moment(runner.attention(block, project(xs, first[:, :ks[len(plan.qs)]], first), feeds))
            q = measure(h_in + h_mid)
            mid, dense = half_block(runner.attention, block, xs, dense, q, block.attn_norm, block.attn_inputs,
                                    plan.attn_maps)
            xs, dense = half_block(runner.mlp, block, mid, dense, q, block.mlp_norm, block.mlp_inputs, plan.mlp_maps)
        q = measure(moment(xs))
    else:
        q = measure(moment(xs))
        for block in blocks:
            mid, dense = half_block(runner.attention, block, xs, dense, q, block.attn_norm, block.attn_inputs,
                                    plan.attn_maps)
            q = measure(moment(mid))
            xs, dense = half_block(runner.mlp, block, mid, dense, q, block.mlp_norm, block.mlp_inputs, plan.mlp_maps)
            q = measure(moment(xs))
    if correct and tb.lm_head is not None:
        plan.head_map, _ = refit(project(xs, *q), dense, q[0], tb.final_norm.epsilon, [])
    return plan


def _one_rotation(runner, tb, feeds, xs, dense, plan, measure, moment, half_block, progress) -> SlicePlan:
    """`bases=model`: the PCA of the dense stream at every block's input and MLP input and the final stream, the mean
    of each point's moment divided by its trace; then, with the correction on, the sliced model is followed block by
    block for the refit maps."""
    blocks = tb.blocks if progress is None else progress(tb.blocks, desc="slice: PCA of the stream", total=len(tb.blocks))
    points = []
    stream = xs
    for block in blocks:
        mid = runner.attention(block, stream, feeds)
        points += [moment(stream), moment(mid)]
        stream = runner.mlp(block, mid, feeds)
    points.append(moment(stream))
    q = measure(sum(h / np.trace(h) for h in points))
    if dense is not None:
        for block in tb.blocks:
            mid, dense = half_block(runner.attention, block, xs, dense, q, block.attn_norm, block.attn_inputs,
                                    plan.attn_maps)
            xs, dense = half_block(runner.mlp, block, mid, dense, q, block.mlp_norm, block.mlp_inputs, plan.mlp_maps)
        plan.final_stream, plan.final_dense = xs, dense
    else:
        plan.attn_maps += [None] * len(tb.blocks)
        plan.mlp_maps += [None] * len(tb.blocks)
    return plan


def width_slots(tb: TransformerBlocks, bases: str) -> list[list[int]]:
    """The bases that share one entry of the `widths` option, in order: per block, then the final stream (with
    `bases=model`, the one basis)."""
    if bases == "model":
        return [[0]]
    if bases == "block":
        return [[i] for i in range(len(tb.blocks) + 1)]
    return [[2 * i, 2 * i + 1] for i in range(len(tb.blocks))] + [[2 * len(tb.blocks)]]


def slot_cost(tb: TransformerBlocks, plan: SlicePlan, slots: list[list[int]]):
    """The cost of per-slot widths as [MACs per token, parameters]: the projections reading and writing each basis
    (output features of the readers, input features of the writers), the LM head (Q_0's when tied to the
    embedding, else the final basis's), embedding tables, biases and norm scales of the width, and the shortcut
    matrices between bases (k_a x k_b each, the tied head's basis change included)."""
    n = len(plan.qs)
    macs, params = np.zeros(n), np.zeros(n)
    pairs: list[tuple[int, int]] = []
    tied = head_is_tied(tb)
    for b in tb.blocks:
        ia, im, ib = plan.block_bases(b.index)
        for j, lins, features in ((ia, b.attn_inputs, "out_features"), (im, b.mlp_inputs, "out_features"),
                                  (im, [b.o], "in_features"), (ib, [b.down], "in_features")):
            f = sum(getattr(lin, features) for lin in lins)
            macs[j] += f
            params[j] += f
        params[im] += (b.o.bias is not None) + 1  # the bias written in the basis, the MLP norm's scale
        params[ib] += b.down.bias is not None
        params[ia] += 1  # the attention norm's scale
        pairs += [(ia, im)] * (ia != im) + [(im, ib)] * (im != ib)
    if tb.lm_head is not None:
        head = 0 if tied else n - 1
        macs[head] += tb.lm_head.out_features
        params[head] += tb.lm_head.out_features
        if tied:
            pairs.append((n - 1, 0))
    if tb.final_norm is not None:
        params[n - 1] += 1
    if tb.embedding is not None:  # rows of the tables the embedding gathers or adds (a tied table is the head's)
        tables = [table for _, table in tb.embedding.extra_tables + tb.embedding.added_constants]
        for table in tables + ([] if tied else [tb.embedding.table]):
            params[0] += const_array(table).size // tb.d_model
    slot_of = {j: s for s, slot in enumerate(slots) for j in slot}

    def cost(widths: np.ndarray) -> np.ndarray:
        per_basis = np.array([widths[slot_of[j]] for j in range(n)], np.float64)
        linear = per_basis @ np.stack([macs, params], 1)
        shortcuts = sum(per_basis[a] * per_basis[b] for a, b in pairs)
        return linear + shortcuts

    return cost


def loss_per_slot(model: ir.Model, tb: TransformerBlocks, plan: SlicePlan, slots: list[list[int]], k: int,
                  feeds: list[dict], ids_name: str, progress=None) -> tuple[float, list[float]]:
    """The dense model's next-token loss (mean NLL) on `feeds`, and its increase with each slot's bases alone cut
    to width k (every other basis whole: a rotation, which is exact).

    Follows the dense stream block by block; a slot's bases all sit in one block (its input and MLP input) or at
    the final stream, so each slot costs one run from that block to the logits. A head tied to the embedding reads
    through Q_0, so the slot of Q_0 also projects what the head reads."""
    from modelsurgeon.runtime.evaluate import next_token_nll

    runner = StreamRunner(model, tb)
    logits, head_in = tb.lm_head.output, tb.final_norm.output
    tied = head_is_tied(tb)

    def loss(outs: list[np.ndarray]) -> float:
        nll = count = 0
        for out, feed in zip(outs, feeds):
            ids = feed[ids_name]
            a, b = next_token_nll(out.reshape(*ids.shape, -1), ids)
            nll, count = nll + a, count + b
        return nll / count

    def to_end(start: ir.Value, xs: list[np.ndarray], head_q=None) -> float:
        if head_q is None:
            return loss(runner._run(start, logits, xs, feeds))
        return loss(runner._run(head_in, logits, project(runner._run(start, head_in, xs, feeds), *head_q), feeds))

    def cut(j: int) -> tuple[np.ndarray, np.ndarray]:
        return plan.qs[j][:, :k], plan.qs[j]

    dense = loss(runner._run(None, logits, None, feeds))
    out: list[float | None] = [None] * len(slots)
    owner = {j: s for s, slot in enumerate(slots) for j in slot}
    final = len(plan.qs) - 1
    xs = runner.embedding(feeds)
    blocks = tb.blocks if progress is None else progress(tb.blocks, desc="slice: loss per basis", total=len(tb.blocks))
    for b in blocks:
        ia, im, _ = plan.block_bases(b.index)
        mid = runner.attention(b, xs, feeds)
        for s in sorted({owner[ia], owner[im]}):
            if out[s] is not None:
                continue
            x = project(xs, *cut(ia)) if ia in slots[s] else xs
            m = runner.attention(b, x, feeds) if ia in slots[s] else mid
            m = project(m, *cut(im)) if im in slots[s] else m
            out[s] = to_end(b.residual_mid, m, cut(0) if tied and 0 in slots[s] else None) - dense
        xs = runner.mlp(b, mid, feeds)
    out[owner[final]] = to_end(tb.blocks[-1].residual_out, project(xs, *cut(final))) - dense
    return dense, [float(v) for v in out]


# ----------------------------------------------------------------------------------------------------------------
# Graph edits
# ----------------------------------------------------------------------------------------------------------------


def stream_values(tb: TransformerBlocks) -> list[ir.Value]:
    """Every value of the residual stream, reshaped views included."""
    vals = [tb.embedding.output] + [v for b in tb.blocks for v in (b.residual_mid, b.residual_out)]
    reshapes = {id(n) for n in tb.stream_reshapes}
    out, seen = [], set()
    stack = list(vals)
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        out.append(v)
        stack += [n.outputs[0] for n, i in v.uses() if id(n) in reshapes and i == 0]
    return out


def foreign_readers(tb: TransformerBlocks) -> list[str]:
    """Readers of the stream that slicing cannot adapt (anything but adds, norms, stream reshapes, Shape)."""
    allowed = {id(n) for n in tb.stream_reshapes}
    for b in tb.blocks:
        allowed |= {id(b.attn_add), id(b.mlp_add)}
        allowed |= {id(s.node) for s in (b.attn_shortcut, b.mlp_shortcut) if s is not None}
    for norm in tb.norms():
        allowed |= {id(n) for n in norm.nodes}
    found = []
    for v in stream_values(tb):
        if v.is_graph_output():
            found.append(f"'{v.name}' is a graph output")
        found += [f"'{v.name}' is read by {n.op_type} node '{n.name}'" for n, _ in v.uses()
                  if id(n) not in allowed and n.op_type != "Shape"]
    return found


def _node(graph: ir.Graph, op: str, inputs: list, name: str, **attrs) -> ir.Node:
    n = ir.Node("", op, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
                name=unique_name(graph, name))
    n.outputs[0].name = unique_name(graph, name.replace("/", "_"))
    return n


def insert_shortcut(graph: ir.Graph, add: ir.Node, stream: ir.Value, s: np.ndarray, name: str) -> None:
    """Make the residual Add read `stream @ s` instead of `stream`."""
    idx = next(i for i, v in enumerate(add.inputs) if v is stream)
    w = new_initializer(graph, s.astype(np.float32 if stream.dtype != ir.DataType.FLOAT16 else np.float16), f"{name}.Q")
    mm = _node(graph, "MatMul", [stream, w], f"{name}/shortcut")
    mark_keep_float(mm, "residual shortcut of slice: its error goes straight into the residual stream")
    copy_type(mm.outputs[0], stream)
    graph.insert_before(add, mm)
    add.replace_input_with(idx, mm.outputs[0])


def _stream_input(add: ir.Node, branch: Linear) -> ir.Value:
    """The input of a residual Add that is the stream (not the branch's output)."""
    a, b = add.inputs
    return b if a is branch.output or _produced_through(a, branch.output) else a


def _produced_through(v: ir.Value, target: ir.Value) -> bool:
    for _ in range(4):
        if v is target:
            return True
        p = v.producer()
        if p is None or p.op_type not in ("Reshape", "Identity", "Dropout"):
            return False
        v = p.inputs[0]
    return v is target


def _reshape_to_new_tail(graph: ir.Graph, reshape: ir.Node, concat: ir.Node, tail: ir.Value) -> None:
    """`reshape` reads a copy of its shape `concat` whose last input is `tail` (the sliced width)."""
    shape_v = reshape.inputs[1]
    new = ir.Node("", "Concat", [*concat.inputs[:-1], tail], attributes=[ir.convenience.convert_attribute("axis", 0)],
                  name=unique_name(graph, (concat.name or "concat") + "_sliced"))
    new.outputs[0].name = unique_name(graph, (shape_v.name or "shape") + "_sliced")
    new.outputs[0].dtype = ir.DataType.INT64
    graph.insert_before(reshape, new)
    reshape.replace_input_with(1, new.outputs[0])


def resize_stream_reshapes(graph: ir.Graph, tb: TransformerBlocks, d: int, k: int) -> None:
    """Reshapes on the stream whose target shape names d in its last entry now name k."""
    for node in tb.stream_reshapes:
        shape_v = node.inputs[1]
        c = const_array(shape_v)
        if c is not None:
            if c.size and int(c.reshape(-1)[-1]) == d:
                new = c.reshape(-1).copy()
                new[-1] = k
                node.replace_input_with(1, new_initializer(graph, new.astype(c.dtype), (shape_v.name or "shape") + ".sliced"))
                drop_if_unused(graph, shape_v)
            continue
        p = shape_v.producer()
        if p is not None and p.op_type == "Concat" and const_array(p.inputs[-1]) is not None:
            last = const_array(p.inputs[-1]).reshape(-1)
            if last.size and int(last[-1]) == d:
                new_last = last.copy()
                new_last[-1] = k
                _reshape_to_new_tail(graph, node, p, new_initializer(graph, new_last, "shape_tail.sliced"))
            continue
        source = _width_source(node)
        if source is node.inputs[0]:
            continue  # x.view(-1, x.size(-1)) (the legacy exporter's Conv1D): follows x's new width by itself
        if source is not None and p is not None and p.op_type == "Concat":
            # the width read from another stream-wide value (GPT-2's final view reads the embedding's): now k
            out_shape = node.outputs[0].shape
            if out_shape is None or not len(out_shape) or not isinstance(out_shape[-1], int) or out_shape[-1] == d:
                _reshape_to_new_tail(graph, node, p, new_initializer(graph, np.asarray([k], np.int64),
                                                                      "stream_width.sliced"))
                continue
        raise UserError(f"slice: the residual stream is reshaped by '{node.name}' to a shape computed at run time; "
                        "re-export the model with a constant hidden size in that reshape")


def _width_source(reshape: ir.Node) -> ir.Value | None:
    """The value whose last dimension the last entry of the Reshape's target shape is read from at run time
    (Shape -> Slice/Gather of -1 -> Squeeze/Unsqueeze -> Concat's last input), else None."""
    v = reshape.inputs[1]
    p = v.producer()
    if p is None or p.op_type != "Concat" or not p.inputs:
        return None
    v = p.inputs[-1]
    for _ in range(6):
        p = v.producer() if v is not None else None
        if p is None:
            return None
        if p.op_type == "Shape":
            return p.inputs[0] if p.attributes.get("end") is None else None
        if p.op_type == "Concat" and p.inputs and const_array(p.inputs[-1]) is not None:
            return p.inputs[-1]  # a Shape of the stream that pin_shape_readers pinned to width d
        if p.op_type not in ("Slice", "Gather", "Squeeze", "Unsqueeze", "Cast", "Identity"):
            return None
        if p.op_type in ("Slice", "Gather"):  # must pick the last dimension
            idx = const_array(p.inputs[1])
            if idx is None or int(np.asarray(idx).reshape(-1)[0]) != -1:
                return None
        v = p.inputs[0]
    return None


def pin_shape_readers(graph: ir.Graph, values: list[ir.Value], d: int, opset: int) -> int:
    """Shape nodes reading the stream keep reporting width d (the model computes head reshapes from them)."""
    count = 0
    for v in values:
        for node, _ in list(v.uses()):
            if node.op_type != "Shape":
                continue
            start = node.attributes["start"].value if node.attributes.get("start") is not None else 0
            end = node.attributes["end"].value if node.attributes.get("end") is not None else None
            rank = len(v.shape) if v.shape is not None else None
            if end is not None and (end < 0 or (rank is not None and end < rank)):
                continue  # the last dimension is not part of it
            tail = new_initializer(graph, np.asarray([d], np.int64), "stream_width")
            if start == -1 or (rank is not None and start == rank - 1):
                replacement = tail
            else:
                if opset >= 15:
                    lead = [_node(graph, "Shape", [v], f"{node.name}_lead", start=int(start), end=-1)]
                else:  # Shape has no start/end before opset 15
                    ends = [new_initializer(graph, np.asarray([x], np.int64), f"{node.name}_lead.{w}")
                            for w, x in (("start", start), ("end", -1))]
                    lead = [_node(graph, "Shape", [v], f"{node.name}_all")]
                    lead.append(_node(graph, "Slice", [lead[0].outputs[0], *ends], f"{node.name}_lead"))
                cat = _node(graph, "Concat", [lead[-1].outputs[0], tail], f"{node.name}_pinned", axis=0)
                for n in (*lead, cat):
                    n.outputs[0].dtype = ir.DataType.INT64
                graph.insert_after(node, [*lead, cat])
                replacement = cat.outputs[0]
            ir.convenience.replace_all_uses_with(node.outputs[0], replacement)
            count += 1
    return count


def _clear_stream_shapes(graph: ir.Graph, d: int) -> None:
    """Forget the recorded shapes that end in d (slicing changed many of them); shape inference refills them."""
    outputs = {id(v) for v in graph.outputs}
    for node in graph:
        for v in node.outputs:
            if id(v) in outputs or v.shape is None or not len(v.shape):
                continue
            if v.shape[-1] == d:
                v.shape = None


def apply_rotations(model: ir.Model, tb: TransformerBlocks, plan: SlicePlan, ks: list[int]) -> dict:
    graph, d = model.graph, tb.d_model
    opset = opset_of(model)
    qk = [q[:, :width] for q, width in zip(plan.qs, ks)]
    values = stream_values(tb)
    sliced = any(width != d for width in ks)
    pinned = pin_shape_readers(graph, values, d, opset) if sliced else 0

    def slice_norm(norm, q: np.ndarray, name: str) -> ir.Value:
        """The norm over the kept width w of basis q: epsilon eps*d/w, scale sqrt(d/w)."""
        w = q.shape[1]
        return replace_norm(graph, norm, norm.epsilon * d / w, np.full(w, math.sqrt(d / w)), opset, name)

    emb = tb.embedding
    tied = head_is_tied(tb)
    head_reader = None
    if tied:  # the node that reads the shared table for the head: its Transpose, or the Gemm itself
        head_reader = (tb.lm_head.transpose_node, 0) if tb.lm_head.transpose_node is not None else (tb.lm_head.node, 1)
    for gather, table in [(emb.gather, emb.table)] + list(emb.extra_tables):
        t = const_array(table)
        value = new_initializer(graph, (t.astype(np.float64) @ qk[0]).astype(t.dtype), table.name or "table")
        gather.replace_input_with(0, value)
        if tied and table is emb.table:
            head_reader[0].replace_input_with(head_reader[1], value)
            if tb.lm_head.transpose_node is not None:
                tb.lm_head.transpose_node.outputs[0].shape = None  # now [k, vocab]
        drop_if_unused(graph, table)
    for add, const in emb.added_constants:
        c = const_array(const)
        idx = next(i for i, v in enumerate(add.inputs) if v is const)
        add.replace_input_with(idx, new_initializer(graph, (c.astype(np.float64) @ qk[0]).astype(c.dtype), const.name or "const"))
        drop_if_unused(graph, const)

    def read_in(lins: list[Linear], q: np.ndarray, m: np.ndarray | None = None) -> None:
        for lin in lins:
            w = lin.weight_matrix().astype(np.float64)
            lin.set_weight(graph, q.T @ (w if m is None else m @ w))

    def write_out(lin: Linear, q: np.ndarray) -> None:
        lin.set_weight(graph, lin.weight_matrix().astype(np.float64) @ q)
        b = lin.bias_vector()
        if b is not None:
            lin.set_bias(graph, b.astype(np.float64) @ q)

    shortcuts = 0
    for b in tb.blocks:
        ia, im, ib = plan.block_bases(b.index)
        qa, qm, qb = qk[ia], qk[im], qk[ib]
        label = b.scope or f"block{b.index}"
        attn_stream, mlp_stream = _stream_input(b.attn_add, b.o), _stream_input(b.mlp_add, b.down)
        read_in(b.attn_inputs, qa, plan.attn_maps[b.index])
        write_out(b.o, qm)
        read_in(b.mlp_inputs, qm, plan.mlp_maps[b.index])
        write_out(b.down, qb)
        for add, stream, old, q_from, q_to, change, what in (
                (b.attn_add, attn_stream, b.attn_shortcut, qa, qm, ia != im, "attn"),
                (b.mlp_add, mlp_stream, b.mlp_shortcut, qm, qb, im != ib, "mlp")):
            if old is not None:  # a model sliced before: compose with its change of basis
                old.set_weight(graph, q_from.T @ old.weight_matrix().astype(np.float64) @ q_to)
            elif change:  # (one basis per block: none at the attention's Add)
                insert_shortcut(graph, add, stream, q_from.T @ q_to, f"{label}.{what}_shortcut")
                shortcuts += 1
        for norm, q, what in ((b.attn_norm, qa, "attn_norm"), (b.mlp_norm, qm, "mlp_norm")):
            slice_norm(norm, q, f"{label}.{what}.sliced")
    final = tb.final_norm
    if final is not None and tied:
        # keep the head tied to the (sliced) embedding table T' = T Q0: logits = y M T'^T with M = Q^T diag(g) Q0,
        # i.e. the head reads the final stream projected onto the embedding's kept directions (exact when T's rows
        # lie in them). A least-squares fit of M over the vocabulary looks better on paper but weighs every input
        # direction alike, and measured far worse (SmolLM2-135M at 25%: perplexity 1409 against 272).
        t = const_array(tb.embedding.table)
        g = final.scale_vector(d)
        m = qk[-1].T @ (plan.head_map if plan.head_map is not None else np.eye(d)) @ (g[:, None] * qk[0])  # k x k
        y = slice_norm(final, qk[-1], "final_norm.sliced")
        w = new_initializer(graph, m.astype(t.dtype if t.dtype != np.float64 else np.float32), "lm_head.basis")
        mm = _node(graph, "MatMul", [y, w], "lm_head/basis")
        mark_keep_float(mm, "basis change of slice before a tied LM head")
        copy_type(mm.outputs[0], y)
        graph.insert_after(y.producer(), mm)
        tb.lm_head.node.replace_input_with(0, mm.outputs[0])
    elif final is not None and tb.lm_head is not None:
        read_in([tb.lm_head], qk[-1], plan.head_map)
        slice_norm(final, qk[-1], "final_norm.sliced")
    elif final is not None:  # the norm's output leaves the model: rotate back to d coordinates before it
        back = new_initializer(graph, qk[-1].T.astype(np.float16 if final.input.dtype == ir.DataType.FLOAT16
                                                      else np.float32), "final_norm.unrotate")
        mm = _node(graph, "MatMul", [final.input, back], "final_norm/unrotate")
        copy_type(mm.outputs[0], final.input)
        graph.insert_before(final.nodes[0], mm)
        for n in final.nodes:
            for i, v in enumerate(n.inputs):
                if v is final.input:
                    n.replace_input_with(i, mm.outputs[0])
    if sliced:
        resize_stream_reshapes(graph, tb, d, ks[0])
        _clear_stream_shapes(graph, d)
    import onnx_ir.passes.common as common

    common.ShapeInferencePass()(model)
    return {"shortcuts": shortcuts, "shape_readers_pinned": pinned}


# ----------------------------------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------------------------------


def _check_widths(v: str) -> str | None:
    try:
        parse_widths(v, 1 << 30)
    except ValueError as e:
        return str(e)
    return None


def _check_sparsity(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be at least 0 and below 1 (e.g. 0.25 deletes a quarter of the width)"


@register_pass
class SlicePass(Pass):
    name = "slice"
    summary = "SliceGPT: rotate the residual stream by per-block PCA and delete its weakest dimensions"
    options = {
        "sparsity": Option(float, 0.25, "fraction of the residual stream width to delete (0: rotation only, exact)",
                           check=_check_sparsity),
        "multiple": Option(int, 8, "round the kept width down to a multiple of this",
                           check=lambda v: None if v >= 1 else "must be a positive integer"),
        "damp": Option(float, 0.01, "PCA damping, as a fraction of the mean eigenvalue",
                       check=lambda v: None if v >= 0 else "must be >= 0"),
        "batch": Option(int, 8, "calibration batch size", check=lambda v: None if v >= 1 else "must be >= 1"),
        "tied_head_weight": Option(float, 8.0, "a head tied to the embedding reads the stream through the embedding's "
                                   "basis: weight of what the head reads in that basis's PCA (0: the embedding alone)",
                                   check=lambda v: None if v >= 0 else "must be >= 0"),
        "bases": Option(str, "block", "where the stream's basis changes: 'half-block' (after every attention and "
                        "MLP: two k x k shortcut MatMuls per block) or 'block' (one basis per block, shared by the "
                        "attention and MLP inputs: one shortcut per block, fewer parameters and MACs) or 'model' "
                        "(one basis for the whole stream: no shortcut matrices, the fastest; docs/slice.md)",
                        choices=("half-block", "block", "model")),
        "widths": Option(str, "", "per-block kept widths that differ from sparsity's, as BLOCKS:WIDTH items joined by "
                         "';', e.g. '0-2:576;29:512' (block index = number of blocks: the final stream)",
                         check=_check_widths),
        "allocate": Option(str, "uniform", "how widths are chosen: 'uniform' (every basis keeps sparsity's width, or "
                           "what widths says) or 'loss' (language models: measure on held-out calibration windows how "
                           "much each block's basis alone costs in next-token loss, and spread the uniform slice's "
                           "MACs and parameters so that insensitive blocks lose more width; docs/slice.md)", choices=("uniform", "loss")),
        "correct": Option(bool, False, "refit the layers that read each norm by least squares against the dense model "
                                       "(runs the dense model alongside; no effect at sparsity 0). Off by default: on "
                                       "SmolLM2 it helps with 64-128 windows of one text but hurts with the CLI's 32 "
                                       "and with windows from many texts (docs/slice.md)"),
        "ridge": Option(float, 0.1, "regularization of that refit, as a fraction of the mean diagonal of its normal "
                        "matrix; it pulls the refit towards the uncorrected layers (large: like correct=false)",
                        check=lambda v: None if v >= 0 else "must be >= 0"),
    }
    requires = ("fold-norms",)
    analyses = ("blocks",)
    stage = Stage.STRUCTURE
    needs_calibration = True

    @property
    def exact(self) -> bool:
        """Rotation only (sparsity 0, no widths): verification then holds the outputs to float tolerance."""
        return self.config["sparsity"] == 0 and not self.config["widths"].strip()

    def run(self, model: ir.Model, ctx) -> PassResult:
        tb: TransformerBlocks = ctx.analysis("blocks")
        require_pre_norm(tb, self.name)
        require_float_linears(tb, self.name)
        if tb.problems:
            raise UserError(f"slice: the block finder stopped early ({tb.problems[0]}); slicing part of a model is "
                            "not supported")
        stream_norms = [n for b in tb.blocks for n in (b.attn_norm, b.mlp_norm)]
        if tb.lm_head is not None and not head_is_tied(tb):  # a tied head keeps its norm's scale
            stream_norms.append(tb.final_norm)
        unfolded = [n for n in stream_norms if n is None or n.kind != "rms" or not n.weightless]
        if unfolded and all(n is not None for n in unfolded):
            # e.g. a model sliced before (its norms carry the width correction): fold again, then look again
            from modelsurgeon.analyses.blocks import find_blocks
            from modelsurgeon.passes.fold_norms import FoldNormsPass

            FoldNormsPass().run(model, ctx)
            tb = find_blocks(model)
            stream_norms = [n for b in tb.blocks for n in (b.attn_norm, b.mlp_norm)]
            if tb.lm_head is not None and not head_is_tied(tb):
                stream_norms.append(tb.final_norm)
            unfolded = [n for n in stream_norms if n is None or n.kind != "rms" or not n.weightless]
        if unfolded:
            raise UserError("slice: some norms still carry a scale or are LayerNorms (fold-norms could not fold them); "
                            "slice needs every norm on the stream folded")
        readers = foreign_readers(tb)
        if readers:
            raise UserError(f"slice: the residual stream is used outside the blocks ({readers[0]}); "
                            "export the model without extra hidden-state outputs")
        calib = ctx.require_calibration(self.name)
        from modelsurgeon.capture import batch_size_for

        d = tb.d_model
        k = kept_width(d, self.config["sparsity"], self.config["multiple"])
        try:
            overrides = parse_widths(self.config["widths"], d)
        except ValueError as e:
            raise UserError(f"slice: option widths={self.config['widths']!r}: {e}") from None
        if overrides and max(overrides) > len(tb.blocks):
            raise UserError(f"slice: option widths names block {max(overrides)}, but the model has {len(tb.blocks)} "
                            f"blocks (0-{len(tb.blocks) - 1}, and {len(tb.blocks)} for the final stream)")
        widths = basis_widths(tb, self.config["bases"], k, overrides)
        allocate = self.config["allocate"] == "loss" and k < d
        if allocate and overrides:
            raise UserError("slice: options widths and allocate=loss both choose the widths; give one of them")
        if (allocate or len(set(widths)) > 1) and tb.stream_reshapes:  # resize_stream_reshapes writes one width
            raise UserError("slice: the residual stream is reshaped inside the model, so every block must keep the same "
                            f"width; {'use allocate=uniform' if allocate else 'leave out the widths option'}")
        batch = batch_size_for(model, self.config["batch"])
        feeds = list(calib.batches(batch))
        if self.config["bases"] == "model" and (allocate or overrides):
            raise UserError("slice: bases=model keeps one basis, so one width for the whole stream; leave out "
                            f"{'allocate=loss' if allocate else 'the widths option'} or use bases=block")
        allocation = self._allocate(model, tb, calib, batch, k, ctx) if allocate else {}
        if allocation:
            widths = basis_widths(tb, self.config["bases"], k, parse_widths(allocation["widths"], d))
        correct = self.config["correct"] and min(widths) < d
        if correct and len({lin.node.name for b in tb.blocks for lin in b.attn_inputs + b.mlp_inputs}) != \
                sum(len(b.attn_inputs) + len(b.mlp_inputs) for b in tb.blocks):
            log.warning("slice: projections without unique node names; slicing without the least-squares correction")
            correct = False
        tied_weight = self._tied_weight(tb, widths)
        plan = compute_rotations(model, tb, feeds, widths, self.config["damp"], ctx.progress_bar, correct=correct,
                                 tied_head_weight=tied_weight, bases=self.config["bases"], ridge=self.config["ridge"])
        from modelsurgeon.stats import count_parameters

        before = count_parameters(model)
        with naming(model.graph):
            edits = apply_rotations(model, tb, plan, widths)
        after = count_parameters(model)
        if k < d and after >= before:
            log.warning("slice: sparsity=%g keeps %d of %d dimensions, but the %d shortcut matrices (%d x %d each) "
                        "outweigh what was deleted: %d -> %d parameters; use a larger sparsity or leave slice out",
                        self.config["sparsity"], k, d, edits["shortcuts"], k, k, before, after)
        per_block = allocation or ({"widths": self.config["widths"]} if overrides else {})
        if per_block:
            per_block["kept_mean"] = round(float(np.mean(widths)), 1)
        notes = {"d_model": d, "kept": k, **per_block, "blocks": len(tb.blocks), "corrected": correct, "tied_head_weight": tied_weight,
                 "parameters_before": before, "parameters_after": after,
                 "calibration_tokens": int(sum(next(iter(f.values())).size for f in feeds)),
                 "min_energy_kept": round(min(plan.energy), 4), "mean_energy_kept": round(float(np.mean(plan.energy)), 4),
                 **edits}
        return PassResult(model, True, notes=notes)

    def _tied_weight(self, tb: TransformerBlocks, widths: list[int]) -> float:
        return self.config["tied_head_weight"] if head_is_tied(tb) and widths[0] < tb.d_model else 0.0

    def _allocate(self, model: ir.Model, tb: TransformerBlocks, calib, batch: int, k: int, ctx) -> dict:
        """allocate=loss: per-block widths (`compiler/width_allocation.py`, returned with what was measured, for the
        report; `widths` in the option's syntax) from a uniform slice fitted on all but
        every 8th calibration window and measured on those held out. (Windows from many texts come text by text,
        so every 8th window samples all of them; holding out whole batches would hold out a few whole texts.)"""
        from modelsurgeon.calibration import CalibrationData
        from modelsurgeon.runtime.evaluate import ids_input
        from modelsurgeon.width_allocation import allocate_widths, dropped_energy, widths_text

        if tb.lm_head is None or tb.final_norm is None:
            raise UserError("slice: allocate=loss measures next-token loss, so it needs a language model with an LM "
                            "head; use allocate=uniform")
        try:
            ids_name = ids_input(model)
        except UserError:
            raise UserError("slice: allocate=loss needs a token-id input to score next tokens; use allocate=uniform") \
                from None
        n = calib.num_samples
        if n < 8:
            raise UserError(f"slice: allocate=loss holds out every 8th calibration window to measure the loss on, so it "
                            f"needs at least 8 windows (got {n}); give more calibration data")
        held_out = np.arange(n) % 8 == 7

        def windows(mask: np.ndarray) -> list[dict]:
            return list(CalibrationData({name: a[:n][mask] for name, a in calib.arrays.items()}).batches(batch))

        held, fit = windows(held_out), windows(~held_out)
        d, bases = tb.d_model, self.config["bases"]
        uniform = basis_widths(tb, bases, k, {})
        plan = compute_rotations(model, tb, fit, uniform, self.config["damp"], ctx.progress_bar,
                                 tied_head_weight=self._tied_weight(tb, uniform), bases=bases)
        slots = width_slots(tb, bases)
        dense, increase = loss_per_slot(model, tb, plan, slots, k, held, ids_name, ctx.progress_bar)
        drops = [np.mean([dropped_energy(plan.spectra[j]) for j in slot], axis=0) for slot in slots]
        per_slot = allocate_widths(increase, drops, slot_cost(tb, plan, slots), k, d, self.config["multiple"])
        log.info("slice: allocated widths %s (held-out loss %.4f; increase per block at width %d: %s)",
                 widths_text(per_slot), dense, k, ", ".join(f"{v:+.4f}" for v in increase))
        return {"widths": widths_text(per_slot), "allocate": "loss", "heldout_windows": int(sum(len(f[ids_name]) for f in held)),
                "heldout_loss": round(dense, 4), "loss_increase": [round(v, 4) for v in increase]}
