"""Block-wise weight quantization numerics (numpy only): RTN, GPTQ, AWQ scale search, and packings.

Conventions used throughout:

- A weight `w` is the MatMul right-hand side, shape [K, N] (K = reduction axis). It is quantized in blocks
  of `block_size` consecutive rows along K, separately for every column: block b of column n covers rows
  `b*block_size .. (b+1)*block_size-1` (the last block of an odd K is shorter; packings pad it with zeros).
- Codes are unsigned, `0 .. 2**bits - 1`, and decode as `(code - zero_point) * scale` (`BlockQuantized`).
  Symmetric quantization is the special case `zero_point == 2**(bits-1)` everywhere, which is also what
  `com.microsoft.MatMulNBits` assumes when no zero points are given, so the symmetric format stores none.
- Packings (each has an exact inverse, tested):
  * `pack_matmulnbits`: B uint8 [N, n_blocks, block_size*bits/8] (codes along K, low bits first), scales
    [N * n_blocks], zero points uint8 [N * ceil(n_blocks*bits/8)] packed per column, low bits first.
  * `onnx_blocked`: the layout of opset-21 `DequantizeLinear(axis=0, block_size)`: int4/uint4 (or int8/uint8)
    values [K, N], scales [n_blocks, N], zero points [n_blocks, N] of the value type (none when symmetric).
  * `pack_nibbles` / `unpack_nibbles`: ONNX's flat 4-bit packing (element 2i in the low nibble of byte i).

Algorithms:
- `quantize_rtn`: round to nearest, min-max ranges per block, optionally a clipping search per block that
  minimizes the block's output error under its block of the Hessian X^T X.
- `gptq`: GPTQ (Frantar et al. 2022) with dampening and act-order; block parameters are fixed when the first
  column of a block is reached, from the already error-compensated weights, so blocks stay contiguous in
  the original K order (no g_idx) even with act-order.
- `awq_search`: AWQ (Lin et al. 2023) per-input-channel scale search; the objective is the exact output error
  `tr(E^T H E)` over the calibration activations (H = X^T X), summed over the layers sharing the input.
- `output_error`: that objective, used to compare algorithms and to rank layer sensitivity (keep8).
"""

from __future__ import annotations

import dataclasses

import numpy as np

CHUNK_ELEMENTS = 1 << 22  # weights are quantized in column chunks of about this many entries (16 MiB in fp32)
CLIP_GRID = tuple(np.round(np.linspace(1.0, 0.55, 10), 3))  # ratios of the min-max range tried by clip search


# --------------------------------------------------------------------------------------------------------------
# the quantized representation


@dataclasses.dataclass
class BlockQuantized:
    """Weight [K, N] as unsigned codes with one scale and zero point per (block along K, column)."""

    codes: np.ndarray        # uint8 [K, N], values in 0 .. 2**bits-1
    scales: np.ndarray       # float32 [n_blocks, N]
    zero_points: np.ndarray  # uint8 [n_blocks, N]
    bits: int
    block_size: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[0]

    def dequantize(self, dtype=np.float32, cols: slice = slice(None)) -> np.ndarray:
        """The weight the quantized model computes with, [K, N] (or those of its columns in `cols`)."""
        k = self.codes.shape[0]
        zp = np.repeat(self.zero_points[:, cols].astype(np.float32), self.block_size, axis=0)[:k]
        sc = np.repeat(self.scales[:, cols].astype(np.float32), self.block_size, axis=0)[:k]
        return ((self.codes[:, cols].astype(np.float32) - zp) * sc).astype(dtype, copy=False)

    def columns(self, start: int, stop: int) -> "BlockQuantized":
        """The quantized columns start..stop-1 (layers quantized together, e.g. q/k/v, are split this way)."""
        return BlockQuantized(self.codes[:, start:stop].copy(), self.scales[:, start:stop].copy(),
                              self.zero_points[:, start:stop].copy(), self.bits, self.block_size, self.symmetric)

    def scale_columns(self, factor: np.ndarray) -> None:
        """Multiply output column n by factor[n] (exact: only the scales change)."""
        self.scales = (self.scales * np.asarray(factor, np.float32)[None, :]).astype(self.scales.dtype)


def n_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def _blocked(w: np.ndarray, block_size: int) -> np.ndarray:
    """[K, N] -> [n_blocks, block_size, N], zero-padded along K."""
    k, n = w.shape
    nb = n_blocks(k, block_size)
    if nb * block_size != k:
        w = np.concatenate([w, np.zeros((nb * block_size - k, n), w.dtype)], axis=0)
    return w.reshape(nb, block_size, n)


# --------------------------------------------------------------------------------------------------------------
# scales, zero points, codes


def range_params(wmin: np.ndarray, wmax: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points (float, same shape) covering [wmin, wmax] (widened to include 0).

    Symmetric: the value of largest magnitude maps to code 0 (i.e. to -2**(bits-1)), the other side gets
    2**(bits-1)-1 steps; the scale's sign follows that value, so all 2**bits levels are used.
    """
    maxq = 2 ** bits - 1
    half = 2 ** (bits - 1)
    wmin = np.minimum(wmin, 0.0)
    wmax = np.maximum(wmax, 0.0)
    if symmetric:
        signed_max = np.where(-wmin > wmax, wmin, wmax)
        scale = signed_max / -half
        zero = np.full(scale.shape, float(half))
    else:
        scale = (wmax - wmin) / maxq
        safe = np.where(scale == 0, 1.0, scale)
        zero = np.clip(np.round(-wmin / safe), 0, maxq)
    return scale.astype(np.float32), zero


def encode(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Codes of `w` for broadcastable per-element scale and zero point (0 where the scale is 0)."""
    safe = np.where(scale == 0, 1.0, scale)
    q = np.round(w / safe) + zero
    q = np.where(scale == 0, zero, q)
    return np.clip(q, 0, 2 ** bits - 1).astype(np.uint8)


def find_params(w: np.ndarray, bits: int, symmetric: bool, clip_search: bool = False,
                weights: np.ndarray | None = None, grid: tuple = CLIP_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per column for a group of rows `w` [rows, N] (one block of a weight).

    With `clip_search`, each column's range is shrunk by the ratio in `grid` that minimizes the block's
    output error e^T Hb e (e = dequant(w) - w per column), where `weights` is the block's Hessian
    Hb [rows, rows] (X_b^T X_b of the block's input channels), or its diagonal [rows], or None (plain MSE).
    Works on stacked blocks too: `w` [..., rows, N] with `weights` [..., rows(, rows)] gives params [..., N].
    """
    wmin, wmax = w.min(axis=-2), w.max(axis=-2)
    if not clip_search:
        return range_params(wmin, wmax, bits, symmetric)
    w = np.asarray(w, np.float32)
    rows = w.shape[-2]
    wts = np.ones(w.shape[:-2] + (rows,), np.float32) if weights is None else np.asarray(weights, np.float32)
    full = wts.ndim == w.ndim  # [..., rows, rows]
    maxq = float(2 ** bits - 1)
    best_err = best_scale = best_zero = None
    for ratio in grid:
        scale, zero = range_params(wmin * ratio, wmax * ratio, bits, symmetric)
        zero = zero.astype(np.float32)
        safe = np.where(scale == 0, np.float32(1), scale)[..., None, :]
        e = np.rint(w / safe)
        e += zero[..., None, :]
        np.clip(e, 0, maxq, out=e)
        e -= zero[..., None, :]
        e *= scale[..., None, :]
        e -= w  # e = dequant(w) - w
        if full:
            err = (np.matmul(wts, e) * e).sum(axis=-2)
        else:
            err = (e * e * wts[..., :, None]).sum(axis=-2)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_zero = np.where(better, zero, best_zero)
    return best_scale.astype(np.float32), best_zero


def block_hessians(hessian: np.ndarray, block_size: int) -> np.ndarray:
    """The diagonal blocks [n_blocks, block_size, block_size] of H [K, K] (or diag blocks from H's diagonal [K]),
    zero-padded past K: what a block's clip search weighs its error with."""
    h = np.asarray(hessian, np.float32)
    k = h.shape[0]
    nb = n_blocks(k, block_size)
    pad = nb * block_size - k
    if h.ndim == 1:
        return np.concatenate([h, np.zeros(pad, np.float32)]).reshape(nb, block_size)
    out = np.zeros((nb, block_size, block_size), np.float32)
    for b in range(nb):
        lo, hi = b * block_size, min((b + 1) * block_size, k)
        out[b, :hi - lo, :hi - lo] = h[lo:hi, lo:hi]
    return out


def quantize_rtn(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False,
                 clip_search: bool = False, hessian: np.ndarray | None = None) -> BlockQuantized:
    """Round-to-nearest block quantization of w [K, N].

    `hessian` (X^T X [K, K], or its diagonal [K]) weighs the clip search; None searches on plain weight MSE.
    """
    k, n = w.shape
    weights = None
    if clip_search:
        weights = block_hessians(np.ones(k, np.float32) if hessian is None else hessian, block_size)
    codes = np.empty((k, n), np.uint8)
    scales = np.empty((n_blocks(k, block_size), n), np.float32)
    zeros = np.empty((n_blocks(k, block_size), n), np.uint8)
    for cols in column_chunks(k, n):  # columns are independent: temporaries stay at one chunk's size
        wb = _blocked(np.asarray(w[:, cols], np.float32), block_size)
        scale, zero = find_params(wb, bits, symmetric, clip_search, weights)
        codes[:, cols] = encode(wb, scale[:, None, :], zero[:, None, :], bits).reshape(-1, wb.shape[2])[:k]
        scales[:, cols], zeros[:, cols] = scale, zero
    return BlockQuantized(codes, scales, zeros, bits, block_size, symmetric)


def column_chunks(k: int, n: int, elements: int = CHUNK_ELEMENTS) -> list[slice]:
    """Column ranges of a [k, n] matrix holding about `elements` entries each (one range when it is small)."""
    width = max(1, elements // max(k, 1))
    return [slice(a, min(a + width, n)) for a in range(0, n, width)]


def quantize_with(w: np.ndarray, like: BlockQuantized) -> np.ndarray:
    """Codes of w [K, N] under the scales and zero points of `like` (for tests and re-encoding)."""
    k = w.shape[0]
    sc = np.repeat(like.scales, like.block_size, axis=0)[:k]
    zp = np.repeat(like.zero_points.astype(np.float32), like.block_size, axis=0)[:k]
    return encode(w, sc, zp, like.bits)


# --------------------------------------------------------------------------------------------------------------
# error measures


def output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray | None) -> float:
    """Squared output error ||X (w_hat - w)||_F^2 = tr(E^T H E) with H = X^T X ([K, K]); weight MSE sum if H is None."""
    e = np.asarray(w_hat, np.float32) - np.asarray(w, np.float32)
    if hessian is None:
        return float((e.astype(np.float64) ** 2).sum())
    return float(((np.asarray(hessian, np.float32) @ e) * e).sum(dtype=np.float64))


def relative_output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray | None) -> float:
    """output_error / ||X w||^2: the layer's relative squared output error."""
    ref = output_error(np.zeros_like(w), w, hessian)
    return output_error(w, w_hat, hessian) / ref if ref > 0 else 0.0


def quantized_relative_error(w: np.ndarray, bq: BlockQuantized, hessian: np.ndarray | None,
                             row_scales: np.ndarray | None = None) -> float:
    """relative_output_error(w, bq dequantized / row_scales[:, None], hessian), a chunk of columns at a time.

    Both error terms are sums over output columns, so a layer of any size needs one chunk's temporaries."""
    err = ref = 0.0
    zero = np.zeros((w.shape[0], 1), np.float32)
    for cols in column_chunks(*w.shape):
        w_c = np.asarray(w[:, cols], np.float32)
        deq = bq.dequantize(cols=cols)
        if row_scales is not None:
            deq /= row_scales[:, None]
        err += output_error(w_c, deq, hessian)
        ref += output_error(zero, w_c, hessian)
    return err / ref if ref > 0 else 0.0


LOOKUP_MAX_ERROR_OVER_RTN = 4.0
"""How much worse (squared error on the weight) than round to nearest a tied head's codes may reconstruct the table
and still serve its embedding lookup: GPTQ puts the head's error where the head's input has little energy, which a
lookup does not discount (quant4's `_fit_for_lookup` has the measurements)."""


def error_over_rtn(w: np.ndarray, codes: BlockQuantized | np.ndarray, bits: int, block_size: int,
                   symmetric: bool) -> float:
    """Squared error of `codes` (or a dequantized weight) on `w` over that of round to nearest at the same bits and
    block: how much worse than RTN they reconstruct the weight itself, whatever the layer's input."""
    own = (quantized_relative_error(w, codes, None) if isinstance(codes, BlockQuantized)
           else relative_output_error(w, codes, None))
    rtn = quantized_relative_error(w, quantize_rtn(w, bits, block_size, symmetric), None)
    if rtn > 0:
        return own / rtn
    return 1.0 if own == 0 else float("inf")


# --------------------------------------------------------------------------------------------------------------
# GPTQ


@dataclasses.dataclass
class GPTQHessian:
    """What GPTQ needs from H = X^T X, computed once for all the layers reading the same input."""

    hessian: np.ndarray  # H as given (original channel order), for the clip search
    perm: np.ndarray     # channel visiting order (act-order: decreasing diag H)
    dead: np.ndarray     # channels with diag H == 0 (never active)
    hinv: np.ndarray     # upper Cholesky factor of (permuted, dampened H)^-1


def prepare_gptq(hessian: np.ndarray, damp: float = 0.01, act_order: bool = True) -> GPTQHessian:
    """Dampen, order and invert H once (`damp` adds damp*mean(diag H) to the diagonal)."""
    h = np.array(hessian, np.float64, copy=True)
    k = h.shape[0]
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    return GPTQHessian(np.asarray(hessian), perm, dead, inverse_cholesky_upper(h))


def gptq(w: np.ndarray, hessian: np.ndarray | GPTQHessian, bits: int = 4, block_size: int = 32, symmetric: bool = False,
         damp: float = 0.01, act_order: bool = True, clip_search: bool = True, lazy_batch: int = 128) -> BlockQuantized:
    """GPTQ of w [K, N] given H = X^T X [K, K] (or its `prepare_gptq` form, which fixes damp and act_order).

    Columns (input channels) are quantized one at a time; each one's rounding error is spread over the
    columns not yet quantized through the inverse Hessian (Cholesky form). `damp` adds damp*mean(diag H)
    to the diagonal; `act_order` visits channels by decreasing activation energy. Channels never active
    (diag H == 0) have their weight zeroed before quantization, as in the reference implementation.
    A block's scale and zero point are chosen when its first channel is reached, from the weights as
    compensated so far (with the clip search weighted by the block's part of H).
    """
    prep = hessian if isinstance(hessian, GPTQHessian) else prepare_gptq(hessian, damp, act_order)
    perm, hinv, h_orig = prep.perm, prep.hinv, prep.hessian
    hinv = hinv.astype(np.float32)
    w = np.asarray(w, np.float32)
    k, n = w.shape
    W = w.T.copy()  # [N, K]: rows are output channels, as in the paper (float32, as in the reference)
    W[:, prep.dead] = 0.0
    W = W[:, perm]
    inv_perm = np.empty(k, np.int64)
    inv_perm[perm] = np.arange(k)

    nb = n_blocks(k, block_size)
    scales = np.zeros((nb, n), np.float32)
    zeros = np.zeros((nb, n), np.float32)
    have = np.zeros(nb, bool)
    codes = np.zeros((n, k), np.uint8)

    for i1 in range(0, k, lazy_batch):
        i2 = min(i1 + lazy_batch, k)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = perm[col] // block_size
            if not have[g]:
                lo, hi = g * block_size, min((g + 1) * block_size, k)
                members = inv_perm[lo:hi]  # the block's channels, at their positions in visiting order
                current = np.stack([W1[:, p - i1] if i1 <= p < i2 else W[:, p] for p in members], axis=0)  # [rows, N]
                scales[g], zeros[g] = find_params(current, bits, symmetric, clip_search, h_orig[lo:hi, lo:hi])
                have[g] = True
            wcol = W1[:, i]
            q = encode(wcol, scales[g], zeros[g], bits)
            deq = (q.astype(np.float32) - zeros[g]) * scales[g]
            codes[:, col] = q
            err = (wcol - deq) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]

    codes = codes[:, inv_perm].T.copy()  # back to original order, [K, N]
    return BlockQuantized(codes, scales, zeros.astype(np.uint8), bits, block_size, symmetric)


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """U upper triangular with U^T U = H^-1 (the upper Cholesky factor of H^-1), from one Cholesky.

    With J the reversal permutation and J H J = L L^T, R = J L J is upper triangular and H = R R^T, so
    U = R^-1. Extra dampening is added if H is not numerically positive definite.
    """
    from scipy import linalg

    k = h.shape[0]
    eye = np.eye(k)
    extra = 0.0
    for _ in range(8):
        try:
            low = linalg.cholesky((h + extra * eye)[::-1, ::-1], lower=True)
            r = np.ascontiguousarray(low[::-1, ::-1])
            inv, info = linalg.lapack.dtrtri(r, lower=0)
            if info != 0:
                raise linalg.LinAlgError(f"dtrtri failed ({info})")
            return np.triu(inv)
        except linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(h))) or 1e-6)
    raise np.linalg.LinAlgError("GPTQ: the Hessian is not positive definite even after extra dampening")


_inverse_cholesky_upper = inverse_cholesky_upper  # earlier name, still imported by passes/spquant.py


# --------------------------------------------------------------------------------------------------------------
# AWQ


@dataclasses.dataclass
class AWQResult:
    scales: np.ndarray              # [K] s: weights are multiplied by s along K, inputs divided by s
    alpha: float                    # the chosen exponent (0 = no scaling)
    quantized: list[BlockQuantized]  # quantize(diag(s) @ w_i) for each layer
    error: float                    # sum_i tr(E_i^T H E_i) at the chosen scales
    error_unscaled: float           # the same for alpha = 0 (plain RTN with the same clip search)


def awq_search(weights: list[np.ndarray], hessian: np.ndarray, act_scale: np.ndarray, bits: int = 4,
               block_size: int = 32, symmetric: bool = False, grid: int = 20, clip_search: bool = True) -> AWQResult:
    """Search s = act_scale**alpha (alpha in [0, 1)) minimizing the summed output error of the layers.

    `weights`: the [K, N_i] weights of the layers reading the same input X; `hessian`: X^T X [K, K];
    `act_scale`: mean |x| per input channel [K]. The effective weight of layer i is
    diag(1/s) quantize(diag(s) w_i), so the error is exact for the calibration activations. As in AWQ, the
    search quantizes by min-max RTN and the clip search (if on) runs once on the chosen scaling; the result
    is never worse than alpha = 0 (no scaling) with the same clip search.
    """
    act = np.maximum(np.asarray(act_scale, np.float64), 1e-8)
    h = np.asarray(hessian, np.float64)

    def evaluate(s: np.ndarray, clip: bool) -> tuple[list[BlockQuantized], float]:
        qs, err = [], 0.0
        hs = h / np.outer(s, s) if clip else None
        for w in weights:
            bq = quantize_rtn(w * s[:, None], bits, block_size, symmetric, clip, hs)
            err += output_error(w, bq.dequantize().astype(np.float64) / s[:, None], h)
            qs.append(bq)
        return qs, err

    def scales_for(alpha: float) -> np.ndarray:
        s = act ** alpha
        return np.clip(s / np.sqrt(s.max() * s.min()), 1e-4, 1e4)

    errors = [evaluate(scales_for(j / grid), False)[1] for j in range(grid)]
    alpha = int(np.argmin(errors)) / grid
    s = scales_for(alpha)
    qs, err = evaluate(s, clip_search)
    ones = np.ones_like(act)
    plain_qs, plain_err = (qs, err) if alpha == 0 else evaluate(ones, clip_search)
    if plain_err <= err:
        return AWQResult(ones.astype(np.float32), 0.0, plain_qs, plain_err, plain_err)
    return AWQResult(s.astype(np.float32), alpha, qs, err, plain_err)


# --------------------------------------------------------------------------------------------------------------
# packings


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis, low bits first: [..., L] -> uint8 [..., L*bits/8] (L*bits % 8 == 0)."""
    per = 8 // bits
    c = codes.astype(np.uint8).reshape(codes.shape[:-1] + (codes.shape[-1] // per, per))
    out = np.zeros(c.shape[:-1], np.uint8)
    for i in range(per):
        out |= (c[..., i] << (bits * i)).astype(np.uint8)
    return out


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_bits: uint8 [..., B] -> codes [..., B*8/bits]."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * per,)).astype(np.uint8)


def pack_matmulnbits(bq: BlockQuantized) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B uint8 [N, n_blocks, blob], scales [N*n_blocks], zero points uint8 [N*zp_bytes] or None if symmetric)."""
    if bq.bits not in (2, 4, 8):
        raise ValueError(f"MatMulNBits stores 2, 4 or 8 bits, not {bq.bits}")
    k, n = bq.shape
    nb = bq.n_blocks
    padded = np.zeros((nb * bq.block_size, n), np.uint8)
    padded[:k] = bq.codes
    per_col = padded.T.reshape(n, nb, bq.block_size)
    b = pack_bits(per_col, bq.bits)
    scales = np.ascontiguousarray(bq.scales.T).reshape(-1)
    if bq.symmetric:
        return b, scales, None
    per = 8 // bq.bits
    zp_bytes = -(-nb // per)
    zp = np.zeros((n, zp_bytes * per), np.uint8)
    zp[:, :nb] = bq.zero_points.T
    return b, scales, pack_bits(zp, bq.bits).reshape(-1)


def unpack_matmulnbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int,
                       bits: int, block_size: int) -> BlockQuantized:
    """Decode MatMulNBits initializers back to a BlockQuantized (the inverse of pack_matmulnbits)."""
    nb = n_blocks(k, block_size)
    codes = unpack_bits(np.asarray(b).reshape(n, nb, -1), bits).reshape(n, nb * block_size)[:, :k].T.copy()
    sc = np.asarray(scales).reshape(n, nb).T.copy()
    if zero_points is None:
        zp = np.full((nb, n), 2 ** (bits - 1), np.uint8)
    else:
        zp = unpack_bits(np.asarray(zero_points).reshape(n, -1), bits)[:, :nb].T.copy()
    return BlockQuantized(codes, sc, zp, bits, block_size, zero_points is None)


def onnx_blocked(bq: BlockQuantized) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Values [K, N], scales [n_blocks, N] and zero points [n_blocks, N] for DequantizeLinear(axis=0, block_size).

    Symmetric: signed values (code - 2**(bits-1)) and no zero points (int4/int8). Asymmetric: the codes and
    zero points themselves (uint4/uint8). Values are returned as int8/uint8 arrays; their ONNX type is
    INT4/UINT4 for bits=4.
    """
    if bq.symmetric:
        return (bq.codes.astype(np.int16) - 2 ** (bq.bits - 1)).astype(np.int8), bq.scales, None
    return bq.codes, bq.scales, bq.zero_points


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """ONNX INT4/UINT4 raw data: flattened values, element 2i in the low nibble of byte i (odd count padded)."""
    flat = np.asarray(values).reshape(-1).astype(np.int16) & 0xF
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, count: int, signed: bool) -> np.ndarray:
    """Inverse of pack_nibbles: the first `count` 4-bit values, as int8 (signed) or uint8."""
    p = np.asarray(packed, np.uint8)
    flat = np.stack([p & 0xF, p >> 4], axis=-1).reshape(-1)[:count]
    if signed:
        return np.where(flat >= 8, flat.astype(np.int16) - 16, flat).astype(np.int8)
    return flat.astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# per-channel int8 (quant8 weights)


def quantize_per_channel_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per-channel quantization along `axis`: (int8 values, float32 scales [w.shape[axis]]).

    Scale = max|w| / 127 per channel (codes -127..127, so the range is symmetric as ORT's int8 kernels expect).
    """
    w = np.asarray(w, np.float32)
    red = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = np.abs(w).max(axis=red) if red else np.abs(w)
    scale = (amax / 127.0).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale)
    shape = [1] * w.ndim
    shape[axis % w.ndim] = -1
    q = np.clip(np.round(w / safe.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


# --------------------------------------------------------------------------------------------------------------
# activation ranges (quant8 static calibration)


class RangeObserver:
    """Collects an activation's range over calibration batches: min/max, then (optionally) a histogram.

    Pass 1 calls `observe_minmax` on every batch; methods other than minmax need pass 2 (`observe_histogram`)
    over a histogram of `bins` bins on [-amax, amax] (symmetric, so it folds exactly onto |x| for entropy).
    """

    def __init__(self, bins: int = 4096):
        self.bins = bins
        self.min = np.inf
        self.max = -np.inf
        self.hist: np.ndarray | None = None

    def observe_minmax(self, x: np.ndarray) -> None:
        if x.size:
            self.min = min(self.min, float(np.min(x)))
            self.max = max(self.max, float(np.max(x)))

    @property
    def amax(self) -> float:
        return max(abs(self.min), abs(self.max), 1e-12)

    def observe_histogram(self, x: np.ndarray) -> None:
        """Exact zeros (ReLU outputs, padding) are left out: zero is always representable, and a spike there
        would pull the entropy threshold down to nothing."""
        x = np.asarray(x, np.float32).ravel()
        h, _ = np.histogram(x, bins=self.bins, range=(-self.amax, self.amax))
        h[self.bins // 2] -= int(np.count_nonzero(x == 0))
        self.hist = h.astype(np.int64) if self.hist is None else self.hist + h

    def range(self, method: str = "minmax", percentile: float = 99.999) -> tuple[float, float]:
        """(lo, hi) to quantize to, always containing 0."""
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if method == "minmax" or self.hist is None or self.hist.sum() == 0:
            return lo, hi
        edges = np.linspace(-self.amax, self.amax, self.bins + 1)
        if method == "percentile":
            cdf = np.cumsum(self.hist) / self.hist.sum()
            tail = (100.0 - percentile) / 100.0
            p_lo = edges[np.searchsorted(cdf, tail, side="left")] if lo < 0 else 0.0
            p_hi = edges[min(np.searchsorted(cdf, 1.0 - tail, side="left") + 1, self.bins)] if hi > 0 else 0.0
            return max(lo, min(p_lo, 0.0)), min(hi, max(p_hi, 0.0))
        if method == "entropy":
            half = self.bins // 2
            folded = self.hist[half:][:half] + self.hist[:half][::-1]  # |x| histogram on [0, amax]
            t = entropy_threshold(folded) * self.amax
            return max(lo, -t), min(hi, t)
        raise ValueError(f"unknown calibration method {method!r}")


def entropy_threshold(hist_abs: np.ndarray, levels: int = 128, start: int | None = None) -> float:
    """TensorRT-style KL calibration: the fraction of the |x| histogram's range to keep.

    For each candidate cut i, the reference distribution P is hist[:i] with the clipped tail added to its
    last bin; Q is P merged into `levels` levels and expanded back over P's non-empty bins. Returns the cut
    (as a fraction of the histogram range) with the smallest KL(P || Q).
    """
    hist = np.asarray(hist_abs, np.float64)
    n = hist.size
    if hist.sum() == 0:
        return 1.0
    start = start or levels
    best_kl, best_i = np.inf, n
    levels_idx = np.arange(levels)
    for i in range(start, n + 1, max(1, (n - start) // 256)):
        ref = hist[:i]
        p = ref.copy()
        p[-1] += hist[i:].sum()  # the clipped tail lands in the last kept bin
        edges = np.linspace(0, i, levels + 1).astype(np.int64)
        nonzero = ref > 0
        sums = np.add.reduceat(ref, edges[:-1])  # merge into `levels` levels ...
        counts = np.add.reduceat(nonzero.astype(np.float64), edges[:-1])
        per_bin = np.divide(sums, counts, out=np.zeros(levels), where=counts > 0)
        q = np.where(nonzero, np.repeat(per_bin[levels_idx], np.diff(edges)), 0.0)  # ... spread over non-empty bins
        support = p > 0
        pn = p[support] / p.sum()
        qn = np.maximum(q[support], 1e-10 * q.sum() + 1e-30)
        qn = qn / qn.sum()
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i / n


def activation_qparams(lo: float, hi: float, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor 8-bit (scale, zero point) for the range [lo, hi] (containing 0).

    Asymmetric: uint8 with zero point round(-lo/scale); symmetric: int8 with zero point 0, scale amax/127.
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        amax = max(abs(lo), abs(hi))
        scale = amax / 127.0 if amax > 0 else 1.0
        return np.array(scale, np.float32), np.array(0, np.int8)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return np.array(scale, np.float32), np.array(zp, np.uint8)
