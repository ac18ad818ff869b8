"""spquant: group-sparse 4-bit weights with fp32 outliers, run by our `ai.modelsurgeon::SparseQuantMatMul` op.

Changes: each selected MatMul/Gemm (with a following bias Add; Gemm's transB/alpha/beta/bias folded in) becomes
one SparseQuantMatMul node. Per layer:

1. importance: every group of `block` input channels of every output column is scored by the output energy it
   carries on the calibration activations, w_g^T H_g w_g (H = X^T X of the layer's input; GQSA-style groups,
   activation-aware like Wanda/OBS);
2. the `sparsity` fraction of least important groups is dropped (a per-layer budget, so columns keep different
   numbers of groups: CSR over groups). With `tile` T > 1, T adjacent columns share their choice (scores summed
   over the tile): the kernel then reads each kept block's activations once for T columns and loads their codes
   as one 64-byte vector per 4 columns;
3. `outliers` (a fraction of K per column, SpQR-style) of the most salient single weights in dropped groups,
   by H_kk * w^2, are kept exactly in fp32;
4. masked GPTQ (reusing quant4's parameter search and encoding, `modelsurgeon.quantize`): input channels are
   visited in order, each rounded to its group's 4-bit grid, to zero in a dropped group, or kept exactly as an
   outlier, and the error is compensated on the channels not yet visited through the inverse Hessian, so
   dropping and rounding are corrected together.

Scales are float16, or with `scale_bits=8` one byte per group (sign, 4-bit exponent and 3-bit mantissa against a
per-layer exponent offset; GPTQ rounds each group's scale to that grid before encoding the group, so the
compensation sees the stored scale): at block 32 that is 4.25 bits per weight, MatMulNBits' bytes at block 128
with block-32 groups.

With `max_block`, a layer whose K a wider block divides takes the widest one up to max_block (fewer scale bytes;
`layer_block`). An output head tied to the embedding table (`lm_head=true`; Optimum's copied head and GenAI's
transposed table are tied back first, exactly) keeps every group and no outliers, and the embedding lookups read
the table from its codes (`_sparse_quant_lookup.py`: standard ONNX ops), so the table is stored once, in the
head's bits, unless those codes reconstruct it more than 4x worse than round to nearest would.

Layers where the sparse format does not save at least `min_saving` of MatMulNBits' bytes (e.g. low sparsity)
fall back to `com.microsoft.MatMulNBits` (plain GPTQ), as do layers with float16 activations. The model also
gets the op's ONNX function (runtime/sparse_quant_function.py), so it runs on any ONNX Runtime; with our
library registered ORT runs the native kernel.

Preserves: graph inputs and outputs, every other node (but the lookups of a tied table, as above). Lossy: the
manager measures the output error.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from modelsurgeon import quantize as Q
from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Option, Pass, PassResult, Stage, register_pass
from modelsurgeon.passes import _quant_graph as G
from modelsurgeon.passes import _sparse_quant_lookup as L
from modelsurgeon.runtime import sparse_quant_function as F
from modelsurgeon.runtime.sparse_quant_format import (SparseQuantWeight, decode_scale_codes, encode_scale_codes,
                                                      index_dtype, pack_codes, scale_code_exponent, slot_columns)


def _check_block(b: int) -> str | None:
    return None if 16 <= b <= 256 and b & (b - 1) == 0 else "must be a power of two from 16 to 256"


def layer_block(k: int, block: int, max_block: int) -> int:
    """The block of a layer with K = k: the widest of block, 2*block, ... up to max_block that divides k (0: block).
    Wider blocks store fewer scales (with 8-bit scales at block 64, 1/8 bit per weight; at 128, 1/16), and one that
    divides K pads nothing; the kernel runs any multiple of 32."""
    b = block
    while max_block and 2 * b <= max_block and k % (2 * b) == 0:
        b *= 2
    return b


def _fraction(lo: float, hi: float):
    return lambda v: None if lo <= v < hi else f"must be in [{lo}, {hi})"


@dataclasses.dataclass
class SparseQuantResult:
    """One layer compressed: the stored weight and what it decodes to."""

    weight: SparseQuantWeight
    dense: np.ndarray   # float32 [K, N], what the op computes with
    kept_fraction: float


def group_importance(w: np.ndarray, hessian: np.ndarray, block: int) -> np.ndarray:
    """[n_blocks, N]: output energy w_g^T H_g w_g of every group (H_g: the group's diagonal block of H)."""
    k, n = w.shape
    nb = Q.n_blocks(k, block)
    scores = np.zeros((nb, n), np.float64)
    for b in range(nb):
        lo, hi = b * block, min((b + 1) * block, k)
        wb = w[lo:hi].astype(np.float64)
        scores[b] = np.einsum("kn,kl,ln->n", wb, hessian[lo:hi, lo:hi], wb)
    return scores


def choose_groups(scores: np.ndarray, sparsity: float, tile: int = 1) -> np.ndarray:
    """bool [n_blocks, N]: the (1 - sparsity) fraction of groups with the largest scores (ties broken by order).
    With tile T the T adjacent columns of a tile keep the same blocks, chosen by their summed scores."""
    nb, n = scores.shape
    tiles = -(-n // tile)
    padded = np.zeros((nb, tiles * tile), np.float64)
    padded[:, :n] = scores
    tile_scores = padded.reshape(nb, tiles, tile).sum(axis=2)
    keep = int(round((1.0 - sparsity) * tile_scores.size))
    mask = np.zeros(tile_scores.size, bool)
    if keep > 0:
        mask[np.argsort(-tile_scores.ravel(), kind="stable")[:keep]] = True
    return np.repeat(mask.reshape(nb, tiles), tile, axis=1)[:, :n]


def choose_outliers(w: np.ndarray, hessian_diag: np.ndarray, kept: np.ndarray, block: int, per_column: int) -> np.ndarray:
    """int64 [N, R]: rows of the `per_column` most salient weights (H_kk w^2) in each column's dropped groups;
    -1 marks unused slots (a column with fewer dropped weights)."""
    k, n = w.shape
    dropped = ~np.repeat(kept, block, axis=0)[:k]  # [K, N]
    sal = np.where(dropped, hessian_diag[:, None] * w.astype(np.float64) ** 2, -np.inf)
    r = min(per_column, k)
    rows = np.argsort(-sal, axis=0, kind="stable")[:r].T  # [N, R]
    valid = np.take_along_axis(sal.T, rows, axis=1) > -np.inf
    return np.where(valid, rows, -1)


def scale_exponent_for(w: np.ndarray, block: int) -> int:
    """The layer's `scale_exponent` for 8-bit scale codes, from its largest group's range (error compensation
    may grow a scale; the code range keeps an octave above this estimate)."""
    k, n = w.shape
    nb = Q.n_blocks(k, block)
    padded = np.zeros((nb * block, n), np.float32)
    padded[:k] = w
    return scale_code_exponent(float(np.abs(padded).reshape(nb, block, n).max(axis=1).max()) / 7.0)


def sparse_gptq(w: np.ndarray, hessian: np.ndarray, kept: np.ndarray, outlier_rows: np.ndarray, block: int,
                symmetric: bool, damp: float = 0.01, clip_search: bool = True, lazy_batch: int = 128,
                scale_exponent: int | None = None):
    """GPTQ with a group mask and exact outliers. Returns (codes uint8 [K, N], scales [nb, N] rounded to what the
    format stores (float16, or 8-bit codes with `scale_exponent`), zero points [nb, N], dense result [K, N]
    float32). Channels are visited in order (groups stay contiguous)."""
    w = np.asarray(w, np.float64)
    k, n = w.shape
    nb = Q.n_blocks(k, block)
    lazy_batch = max(lazy_batch, block)  # both powers of two: a group never straddles two batches
    W = w.T.copy()  # [N, K]
    H = np.array(hessian, np.float64, copy=True)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(k)] += damp * float(np.mean(np.diag(H)))
    hinv = Q._inverse_cholesky_upper(H)
    h_orig = np.asarray(hessian, np.float64)
    exact = np.zeros((k, n), bool)  # outlier positions: kept exactly
    cols = np.repeat(np.arange(n), outlier_rows.shape[1])
    rows = outlier_rows.ravel()
    exact[rows[rows >= 0], cols[rows >= 0]] = True

    scales = np.zeros((nb, n), np.float32)
    zeros = np.zeros((nb, n), np.float64)
    codes = np.zeros((n, k), np.uint8)
    Qd = np.zeros((n, k), np.float64)
    for i1 in range(0, k, lazy_batch):
        i2 = min(i1 + lazy_batch, k)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col // block
            if col % block == 0:  # first channel of the group: its scale from the compensated weights
                lo, hi = g * block, min((g + 1) * block, k)
                current = W1[:, lo - i1:hi - i1]
                sc, zp = Q.find_params(current.T, 4, symmetric, clip_search, h_orig[lo:hi, lo:hi])
                if scale_exponent is None:  # the precision the format stores
                    scales[g] = sc.astype(np.float16).astype(np.float32)
                else:
                    scales[g] = decode_scale_codes(encode_scale_codes(sc, scale_exponent), scale_exponent)
                zeros[g] = zp
            wcol = W1[:, i]
            q = Q.encode(wcol, scales[g], zeros[g], 4)
            deq = (q.astype(np.float64) - zeros[g]) * scales[g].astype(np.float64)
            deq = np.where(kept[g], deq, 0.0)
            deq = np.where(exact[col], wcol, deq)
            codes[:, col] = q
            Qd[:, col] = deq
            err = (wcol - deq) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]
    return codes.T.copy(), scales, zeros, Qd.T.astype(np.float32)


def compress_layer(w: np.ndarray, hessian: np.ndarray, *, sparsity: float, block: int, outliers: float,
                   symmetric: bool, damp: float = 0.01, clip_search: bool = True, bias: np.ndarray | None = None,
                   tile: int = 1, scale_bits: int = 16, scale_exponent: int | None = None) -> SparseQuantResult:
    """Select, quantize and pack one weight [K, N] into the SparseQuantMatMul format (scales float16, or 8-bit
    codes with scale_bits=8, against `scale_exponent` or the layer's own)."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    kept = choose_groups(group_importance(w, hessian, block), sparsity, tile)
    r = max(1, int(round(outliers * k))) if outliers > 0 else 0
    rows = choose_outliers(w, np.diag(hessian), kept, block, r) if r else np.zeros((n, 0), np.int64)
    # outliers live in dropped groups: with few of them (low sparsity) the slots no column fills are not stored
    r = int((rows >= 0).sum(axis=1).max(initial=0))
    rows = rows[:, :r]  # choose_outliers puts every column's unused slots (-1) last
    exponent = None
    if scale_bits == 8:
        exponent = scale_exponent_for(w, block) if scale_exponent is None else scale_exponent
    codes, scales, zeros, dense = sparse_gptq(w, hessian, kept, rows, block, symmetric, damp, clip_search,
                                              scale_exponent=exponent)
    nb = kept.shape[0]
    tiles = -(-n // tile)
    n_pad = tiles * tile - n  # padding columns of a partial last tile: code 8, scale 0 (decode to zero)
    kept_tiles = kept[:, ::tile]  # [nb, tiles]: a tile's columns share their blocks
    tile_of, blk_of = np.nonzero(kept_tiles.T)  # tile-major: sorted by tile, then block
    col_of = slot_columns(tile_of, tile)
    blk_slot = np.repeat(blk_of, tile)
    codes_p = np.full((nb * block, n + n_pad), 8, np.uint8)
    codes_p[:k, :n] = codes
    scales_p = np.pad(scales, ((0, 0), (0, n_pad)))
    zeros_p = np.pad(zeros, ((0, 0), (0, n_pad)), constant_values=8)
    group_codes = codes_p.reshape(nb, block, -1)[blk_slot, :, col_of]  # [nnz * T, block]
    weight = SparseQuantWeight(
        K=k, N=n, block=block, packed=pack_codes(group_codes),
        scales=(scales_p[blk_slot, col_of].astype(np.float16) if exponent is None
                else encode_scale_codes(scales_p[blk_slot, col_of], exponent)),
        scale_exponent=0 if exponent is None else exponent,
        group_ptr=np.concatenate([[0], np.cumsum(kept_tiles.sum(axis=0))]).astype(np.int32),
        group_index=blk_of.astype(index_dtype(nb)),
        zero_points=None if symmetric else (zeros_p[blk_slot, col_of] - 8).astype(np.int8),
        bias=None if bias is None else np.asarray(bias, np.float32), tile=tile)
    if r:
        valid = rows >= 0
        safe_rows = np.where(valid, rows, 0)
        values = np.where(valid, np.take_along_axis(dense.T, safe_rows, axis=1), 0.0)
        weight.outlier_rows = safe_rows.astype(np.uint16)
        weight.outlier_values = values.astype(np.float32)
    return SparseQuantResult(weight, dense, float(kept.mean()))


def matmulnbits_bytes(k: int, n: int, block: int, symmetric: bool) -> int:
    nb = Q.n_blocks(k, block)
    return n * nb * (block // 2 + 4) + (0 if symmetric else n * -(-nb // 2))


@register_pass
class SparseQuantPass(Pass):
    name = "spquant"
    summary = "group-sparse 4-bit weights + fp32 outliers in our SparseQuantMatMul op (MatMulNBits where it does not pay)"
    stage = Stage.QUANTIZE
    needs_calibration = True
    options = {
        "sparsity": Option(float, 0.5, "fraction of weight groups dropped per layer", check=_fraction(0.0, 1.0)),
        "block": Option(int, 32, "input channels per group (16..256, a power of two)", check=_check_block),
        "max_block": Option(int, 0, "a wider block where K allows: each layer takes the widest of block, 2*block, ... "
                            "up to max_block that divides its K (fewer scale bytes; 0: every layer at block)",
                            check=lambda b: None if b == 0 else _check_block(b)),
        "outliers": Option(float, 0.005, "weights per column kept exactly in fp32, as a fraction of K",
                           check=_fraction(0.0, 0.25)),
        "symmetric": Option(bool, True, "symmetric groups (no zero points); false stores an int8 zero point per group"),
        "accuracy_level": Option(int, 4, "4: int8 activations in the kernel (like MatMulNBits accuracy_level=4); 0: fp32",
                                 choices=(0, 4)),
        "min_saving": Option(float, 0.15, "use MatMulNBits for layers where the sparse format saves less than this "
                             "fraction of MatMulNBits' bytes", check=_fraction(0.0, 1.0)),
        "damp": Option(float, 0.01, "GPTQ dampening, a fraction of the mean Hessian diagonal", check=_fraction(1e-6, 1.0)),
        "lm_head": Option(bool, False, "also compress the output head (the layer feeding a graph output); a tied "
                          "embedding table is then read from the head's codes"),
        "include": Option(str, "", "regex: only layers whose node or weight name matches (re.search)", check=G.check_regex),
        "exclude": Option(str, "", "regex: leave layers whose node or weight name matches", check=G.check_regex),
        "batch": Option(int, 8, "calibration batch size", check=lambda v: None if v > 0 else "must be > 0"),
        "protected_bits": G.PROTECTED_BITS,
        "scale_bits": Option(int, 16, "bits per group scale: 16 (float16) or 8 (sign, 4-bit exponent, 3-bit mantissa "
                             "per group, one exponent offset per layer: 0.25 bits per weight less at block 32)",
                             choices=(16, 8)),
        "tile": Option(int, 8, "adjacent output columns that keep the same groups (1: every column chooses its own; "
                       "4, 8 and 16 have a fast kernel path)", choices=(1, 4, 8, 16)),
    }

    def validate(self) -> None:
        c = self.config
        if c["max_block"] and c["max_block"] < c["block"]:
            raise UserError(f"spquant: max_block={c['max_block']} is below block={c['block']}; give max_block >= block "
                            "or leave it out")

    def _select(self, model: ir.Model) -> tuple[list[G.Linear], list[G.Linear], list[str]]:
        """(layers to compress, precision-sensitive layers stored at 8 bits, skipped layers with reasons)."""
        c = self.config
        include, exclude = c["include"], c["exclude"]
        if c["lm_head"]:
            G.expose_ties(model)  # a tied head, however exported, shares its codes with the lookup
        protected: list[G.Linear] = []  # with protected_bits=32, find_linears reports them as kept in float
        linears, skipped = G.find_linears(model, fuse_bias=True,
                                          protected=protected if c["protected_bits"] == 8 else None)
        selected: list[G.Linear] = []
        for lin in linears:
            names = (lin.node.name, lin.weight_name)
            if include and not G.matches(include, *names):
                skipped.append(f"{lin.name}: not matched by include={c['include']}")
            elif exclude and G.matches(exclude, *names):
                skipped.append(f"{lin.name}: excluded by exclude={c['exclude']}")
            elif not c["lm_head"] and G.is_output_head(lin.node):
                skipped.append(f"{lin.name}: output head kept in float (lm_head=true compresses it)")
            elif lin.shape[0] < 16:
                skipped.append(f"{lin.name}: K={lin.shape[0]} is below the smallest block (16)")
            else:
                selected.append(lin)
        return selected, protected, skipped

    def run(self, model: ir.Model, ctx) -> PassResult:
        c = self.config
        selected, protected, skipped = self._select(model)
        if selected and F.model_opset(model) < F.MIN_OPSET and G.ensure_opset(model, "", F.MIN_OPSET):
            selected, protected, skipped = self._select(model)  # converted from below opset 18: a new graph
        namer = G.Namer(model)
        for lin in protected:  # precision-sensitive (slice's shortcuts): 8-bit round to nearest, like quant4
            self._emit_nbits(model, namer, lin, Q.quantize_rtn(lin.weight, 8, c["block"], c["symmetric"]))
        if not selected:
            return PassResult(model, bool(protected), notes={"layers_sparse": 0, "protected_8bit": len(protected)},
                              skipped=skipped)

        from modelsurgeon.layerwise import LayerwiseRunner
        from modelsurgeon.passes.quant4 import _input_statistics

        runner = LayerwiseRunner(model, ctx.require_calibration(self.name), c["batch"], ctx.providers)
        sparse_layers, nbits_layers, errors, kept, bytes_sparse, bytes_nbits = [], [], [], [], 0, 0
        tied = {id(lin.node): table for lin in selected if (table := G.tied_table(lin.node)) is not None}
        lookups = 0
        groups = G.group_by_input(selected)
        for group in ctx.progress_bar(groups, desc="spquant", total=len(groups)):
            G.refresh_inputs(group)
            hessian, _ = _input_statistics(runner, group[0].x.name, group[0].shape[0], self.name)
            # layers reading one input share a scale exponent, so that `fuse` can pack them into one product
            block = layer_block(group[0].shape[0], c["block"], c["max_block"])  # a group reads one input: one K
            exponent = (scale_exponent_for(np.concatenate([lin.weight for lin in group], axis=1), block)
                        if c["scale_bits"] == 8 else None)
            for lin in group:
                k, n = lin.shape
                reason = self._sparse_blocker(lin)
                result = None
                table = tied.get(id(lin.node))
                if reason is None:
                    # a tied head keeps every group: the embedding lookup reads the table from its codes
                    whole = table is not None
                    result = compress_layer(lin.weight, hessian, sparsity=0.0 if whole else c["sparsity"],
                                            block=block, outliers=0.0 if whole else c["outliers"],
                                            symmetric=c["symmetric"], damp=c["damp"],
                                            bias=lin.bias, tile=c["tile"], scale_bits=c["scale_bits"],
                                            scale_exponent=exponent)
                    if result.weight.nbytes() > (1.0 - c["min_saving"]) * matmulnbits_bytes(k, n, block, c["symmetric"]):
                        reason = (f"sparse format saves less than {c['min_saving']:.0%} of MatMulNBits' bytes "
                                  f"at sparsity={c['sparsity']}")
                if reason is None:
                    node = self._emit_sparse(model, namer, lin, result.weight)
                    if table is not None:
                        lookups += self._share_with_lookups(model, namer, lin, table, node, result, skipped)
                    sparse_layers.append(lin.name)
                    kept.append(result.kept_fraction)
                    bytes_sparse += result.weight.nbytes()
                    deq = result.dense
                else:
                    skipped.append(f"{lin.name}: MatMulNBits instead of SparseQuantMatMul ({reason})")
                    bq = Q.gptq(lin.weight, hessian, 4, block, c["symmetric"], c["damp"], True, True)
                    self._emit_nbits(model, namer, lin, bq)
                    nbits_layers.append(lin.name)
                    bytes_nbits += matmulnbits_bytes(k, n, block, c["symmetric"])
                    deq = bq.dequantize()
                errors.append(math.sqrt(max(Q.relative_output_error(lin.weight, deq, hessian), 0.0)))
        notes = {
            "layers_sparse": len(sparse_layers), "layers_matmulnbits": len(nbits_layers), "protected_8bit": len(protected),
            "kept_groups_mean": float(np.mean(kept)) if kept else 0.0, "lookups_from_head": lookups,
            "bytes_sparse": bytes_sparse, "bytes_matmulnbits": bytes_nbits,
            "layer_rel_error_mean": float(np.mean(errors)), "layer_rel_error_max": float(max(errors)),
            "calibration_segments": runner.segments_run,
        }
        return PassResult(model, True, notes=notes, skipped=skipped)

    def _sparse_blocker(self, lin: G.Linear) -> str | None:
        """Why a layer cannot use SparseQuantMatMul (None if it can)."""
        if lin.dtype is not np.float32:
            return "float16 activations; SparseQuantMatMul takes float32"
        if self.config["outliers"] > 0 and lin.shape[0] > 65536:
            return f"K={lin.shape[0]} is above 65536, the outlier row limit"
        return None

    def _emit_sparse(self, model: ir.Model, namer: G.Namer, lin: G.Linear, weight: SparseQuantWeight) -> ir.Node:
        F.ensure_function(model)
        prefix = namer(f"{lin.weight_name}_SQ4")
        node = F.make_node(lin.x, weight, model.graph, prefix, accuracy_level=self.config["accuracy_level"],
                           output_name=namer(f"{lin.out.name}_SQ4"))
        self._replace(model, namer, lin, node)
        return node

    def _share_with_lookups(self, model: ir.Model, namer: G.Namer, lin: G.Linear, table: ir.Value, node: ir.Node,
                            result: SparseQuantResult, skipped: list[str]) -> int:
        """Let the embedding lookups of the table tied to the head `lin` (now `node`) read the head's codes, so the
        table is stored once; the number of lookups replaced. Not when the codes reconstruct the table more than
        `quantize.LOOKUP_MAX_ERROR_OVER_RTN` (4) times worse (squared error) than round to nearest at the same block
        would: GPTQ piles the head's error where the head's input has little energy, which the lookup does not
        discount (as quant4's own check)."""
        worse = Q.error_over_rtn(lin.weight, result.dense, 4, result.weight.block, self.config["symmetric"])
        if worse > Q.LOOKUP_MAX_ERROR_OVER_RTN:
            skipped.append(f"{lin.name}: its codes reconstruct the tied table {worse:.1f}x worse (squared error) than "
                           "round to nearest; the lookup keeps the float table")
            return 0
        import onnx_ir.passes.common as common

        common.RemoveUnusedNodesPass()(model)  # the head's Transpose of the table is dead now
        gathers = [n for n, i in list(table.uses()) if n.op_type == "Gather" and i == 0 and G.attr(n, "axis", 0) == 0]
        shared = sum(L.replace_lookup(model, namer, g, node, result.weight) for g in gathers)
        if shared < len(gathers):
            skipped.append(f"{lin.name}: {len(gathers) - shared} lookup(s) of its tied table kept in float "
                           "(indices of unknown rank)")
        common.RemoveUnusedNodesPass()(model)
        return shared

    def _emit_nbits(self, model: ir.Model, namer: G.Namer, lin: G.Linear, bq: Q.BlockQuantized) -> None:
        node = G.matmulnbits_node(model, namer, lin, bq, lin.bias, self.config["accuracy_level"], f"Q{bq.bits}")
        self._replace(model, namer, lin, node)

    @staticmethod
    def _replace(model: ir.Model, namer: G.Namer, lin: G.Linear, node: ir.Node) -> None:
        nodes = [node]
        if lin.extra_add is not None:
            add = ir.Node("", "Add", [node.outputs[0], lin.extra_add], name=namer(f"{lin.name}_c"))
            nodes.append(add)
        old = [lin.node] + ([lin.bias_add] if lin.bias_add else [])
        G.replace(model, old, lin.out, nodes, nodes[-1].outputs[0])
