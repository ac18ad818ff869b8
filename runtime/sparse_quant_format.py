"""The sparse-quant weight format of `ai.modelsurgeon::SparseQuantMatMul`, in numpy: packing, decoding, reference.

A weight W [K, N] is cut into `n_blocks = ceil(K / block)` groups of `block` rows per output column. Columns
come in tiles of T = `tile` consecutive columns (node attribute, default 1; the last tile may be partial) whose
columns keep the same blocks. Only kept groups are stored, tile by tile (CSR over tile-groups):

- `group_ptr` int32 [ceil(N/T)+1]: tile t owns the kept tile-groups `j` in `group_ptr[t] : group_ptr[t+1]`;
- `group_index` uint16 (int32 when n_blocks > 65535) [nnz]: the block id of each kept tile-group;
- column c of tile-group j is stored at slot `s = j*T + c` of the arrays below (so the T columns of a kept block
  are adjacent; T = 1 is plain per-column CSR). Slots of the padding columns of a partial last tile are ignored;
- `packed` uint8 [nnz*T, block/2]: 4-bit codes u in 0..15; byte i holds u[i] (low nibble) and u[i + block/2]
  (high nibble), so a group's low nibbles are its first half of rows and its high nibbles the second half;
- `scales` float16 (or float32) [nnz*T], or uint8 scale codes (node attributes `scale_code` = 1 and
  `scale_exponent` = E): code c = s << 7 | e << 3 | m stands for (-1)^s * 2^(E + e) * (1 + m/8): a sign (symmetric
  quantization uses signed scales, so that the largest magnitude lands on code -8), a 4-bit exponent and a 3-bit
  mantissa, 6% relative precision over 16 octaves (the kernel makes a float of a code with shifts, a mask and an
  add). At block 32 that is 4.25 bits per weight, MatMulNBits' bytes at block 128;
- `zero_points` optional int8 [nnz*T] in [-8, 7]: the zero point is 8 + z'; absent means symmetric (zero
  point 8). Value = (u - 8 - z') * scale;
- optional outliers, a fixed number R per column (node attribute `outliers` = R): `outlier_rows`, row indices as
  little-endian uint16 stored as bytes, uint8 [2 * N * R] (so K <= 65536), and `outlier_values` float32 [N, R],
  ADDED to the decoded weight (unused slots: value 0). Bytes and float32 because the ONNX function can only
  turn an absent input into zeros through ops whose optional inputs have those types (sparse_quant_function.py);
- optional `bias` float32 [N].

Rows past K (padding of the last block) are ignored. `dense()` decodes a weight exactly as the kernel and the
ONNX function define it; `reference()` is the numpy matmul they are tested against.
"""

from __future__ import annotations

import dataclasses

import numpy as np

INPUT_NAMES = ("A", "packed", "scales", "zero_points", "group_ptr", "group_index", "outlier_rows", "outlier_values", "bias")
OPTIONAL_INPUTS = ("zero_points", "outlier_rows", "outlier_values", "bias")


SCALE_CODE_OCTAVES = 16  # code exponents e = 0..15


def scale_code_exponent(largest: float) -> int:
    """E for a layer whose largest scale is about `largest`: the top octave holds it with one octave to spare
    (error compensation can grow a group's scale), so codes reach down 14 octaves below it."""
    top = int(np.floor(np.log2(largest))) if largest > 0 else -14
    return int(np.clip(top + 1 - (SCALE_CODE_OCTAVES - 1), -126, 112))


def encode_scale_codes(scales: np.ndarray, exponent: int) -> np.ndarray:
    """uint8 codes of the nearest representable scales (magnitudes clamped to the code range; zero -> the
    smallest positive code; non-finite -> the largest)."""
    s = np.asarray(scales, np.float64)
    negative = np.signbit(s) & (s != 0)
    lo, hi = 2.0 ** exponent, 2.0 ** (exponent + SCALE_CODE_OCTAVES - 1) * (15 / 8)
    a = np.clip(np.where(np.isfinite(s), np.abs(s), hi), lo, hi)
    e = np.floor(np.log2(a)).astype(np.int64)
    m = np.rint((a / np.exp2(e) - 1.0) * 8).astype(np.int64)  # 0..8
    e, m = np.where(m == 8, e + 1, e), np.where(m == 8, 0, m)
    e = e - exponent
    top = e >= SCALE_CODE_OCTAVES  # rounding up past the largest code
    e, m = np.where(top, SCALE_CODE_OCTAVES - 1, e), np.where(top, 7, m)
    return (negative * 128 + e * 8 + m).astype(np.uint8)


def decode_scale_codes(codes: np.ndarray, exponent: int) -> np.ndarray:
    c = np.asarray(codes, np.int64)
    magnitude = np.exp2(((c & 127) >> 3) + exponent) * (1.0 + (c & 7) / 8.0)
    return np.where(c >= 128, -magnitude, magnitude).astype(np.float32)


def slot_columns(tile_of: np.ndarray, tile: int) -> np.ndarray:
    """int64 [len(tile_of) * T]: the column of slot j*T + c, given the tile of every kept tile-group j."""
    return (np.asarray(tile_of, np.int64)[:, None] * tile + np.arange(tile)).ravel()


@dataclasses.dataclass
class SparseQuantWeight:
    K: int
    N: int
    block: int
    packed: np.ndarray
    scales: np.ndarray
    group_ptr: np.ndarray
    group_index: np.ndarray
    zero_points: np.ndarray | None = None
    tile: int = 1  # T: columns per tile (they keep the same blocks)
    outlier_rows: np.ndarray | None = None  # [N, R] integer rows (serialized as uint16 bytes by inputs())
    outlier_values: np.ndarray | None = None  # [N, R]
    bias: np.ndarray | None = None
    scale_exponent: int = 0  # E of uint8 scale codes (unused for float scales)

    @property
    def scale_codes(self) -> bool:
        return self.scales.dtype == np.uint8

    def decoded_scales(self) -> np.ndarray:
        """float32 [nnz*T]: the scale of every slot."""
        if self.scale_codes:
            return decode_scale_codes(self.scales, self.scale_exponent)
        return self.scales.astype(np.float32)

    @property
    def n_blocks(self) -> int:
        return -(-self.K // self.block)

    @property
    def nnz(self) -> int:
        """Kept tile-groups (each stores `tile` groups)."""
        return int(self.group_index.shape[0])

    @property
    def n_tiles(self) -> int:
        return -(-self.N // self.tile)

    def slot_columns(self) -> np.ndarray:
        """int64 [nnz*T]: the column of every stored slot (>= N for the padding of a partial last tile)."""
        return slot_columns(np.repeat(np.arange(self.n_tiles), np.diff(self.group_ptr.astype(np.int64))), self.tile)

    @property
    def outliers_per_column(self) -> int:
        return 0 if self.outlier_rows is None else int(self.outlier_rows.shape[1])

    def inputs(self) -> dict[str, np.ndarray | None]:
        """The op's weight inputs by name, in the op's layout (None for absent optional inputs)."""
        rows = None
        if self.outlier_rows is not None:
            rows = np.ascontiguousarray(self.outlier_rows.astype("<u2")).view(np.uint8).ravel()
        values = None if self.outlier_values is None else self.outlier_values.astype(np.float32)
        return {"packed": self.packed, "scales": self.scales, "zero_points": self.zero_points,
                "group_ptr": self.group_ptr, "group_index": self.group_index, "outlier_rows": rows,
                "outlier_values": values, "bias": self.bias}

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.inputs().values() if a is not None))

    def codes(self) -> np.ndarray:
        """Unpacked 4-bit codes u, uint8 [nnz, block]."""
        return unpack_codes(self.packed)

    def dense(self) -> np.ndarray:
        """The decoded weight W [K, N] as float32 (dropped groups are zero; outliers added)."""
        u = self.codes().astype(np.float32)
        zp = 8.0 + (self.zero_points.astype(np.float32) if self.zero_points is not None else 0.0)
        values = (u - np.reshape(zp, (-1, 1))) * self.decoded_scales()[:, None]
        cols = self.slot_columns()
        blocks = np.repeat(self.group_index.astype(np.int64), self.tile)
        wt = np.zeros((self.n_tiles * self.tile, self.n_blocks, self.block), np.float32)
        wt[cols, blocks] = values
        wt = wt.reshape(len(wt), -1)[: self.N, : self.K]
        if self.outlier_rows is not None:
            r = self.outliers_per_column
            np.add.at(wt, (np.repeat(np.arange(self.N), r), self.outlier_rows.astype(np.int64).ravel()),
                      self.outlier_values.astype(np.float32).ravel())
        return np.ascontiguousarray(wt.T)


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [G, block] (values 0..15) -> packed uint8 [G, block/2] (low nibble: first half of the group)."""
    codes = np.asarray(codes, dtype=np.uint8)
    half = codes.shape[1] // 2
    if codes.shape[1] % 2 or np.any(codes > 15):
        raise ValueError("codes must be 0..15 with an even block")
    return (codes[:, :half] | (codes[:, half:] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    packed = np.asarray(packed, dtype=np.uint8)
    return np.concatenate([packed & 15, packed >> 4], axis=1)


def centered_code_tables() -> tuple[np.ndarray, np.ndarray]:
    """For every packed byte value 0..255, its low and high nibble's code minus 8 (int8 [256] each): what a
    table lookup (the op's ONNX function, an embedding lookup of a tied head) turns a packed byte into."""
    byte = np.arange(256, dtype=np.int16)
    return (byte & 15).astype(np.int8) - np.int8(8), (byte >> 4).astype(np.int8) - np.int8(8)


def index_dtype(limit: int) -> type:
    """uint16 when every index fits (< 65536), else int32."""
    return np.uint16 if limit <= 65536 else np.int32


def reference(A: np.ndarray, weight: SparseQuantWeight, accuracy_level: int = 0) -> np.ndarray:
    """Y = A @ W (+ bias) in float64 numpy. accuracy_level 4 first rounds A per (row, block) to int8 the way the
    kernel does (outliers and bias always use fp32 A)."""
    A = np.asarray(A, dtype=np.float32)
    w = weight.dense().astype(np.float64)
    a = A.reshape(-1, weight.K).astype(np.float64)
    if accuracy_level == 4:
        a = quantize_activations(A.reshape(-1, weight.K), weight.block).astype(np.float64)
        if weight.outlier_rows is not None:  # outliers see the unquantized activations
            sub = dataclasses.replace(weight, outlier_rows=None, outlier_values=None, bias=None)
            w = sub.dense().astype(np.float64)
            y = a @ w + _outliers(A.reshape(-1, weight.K), weight)
            if weight.bias is not None:
                y = y + weight.bias
            return y.reshape(*A.shape[:-1], weight.N)
    y = a @ w
    if weight.bias is not None:
        y = y + weight.bias
    return y.reshape(*A.shape[:-1], weight.N)


def _outliers(a: np.ndarray, weight: SparseQuantWeight) -> np.ndarray:
    o = np.zeros((weight.K, weight.N), np.float64)
    r = weight.outliers_per_column
    np.add.at(o, (weight.outlier_rows.astype(np.int64).ravel(), np.repeat(np.arange(weight.N), r)),
              weight.outlier_values.astype(np.float64).ravel())
    return a.astype(np.float64) @ o


def quantize_activations(a: np.ndarray, block: int) -> np.ndarray:
    """A [M, K] rounded like the kernel's int8 path: per (row, block) scale max|a|/127, round half to even."""
    M, K = a.shape
    nb = -(-K // block)
    pad = np.zeros((M, nb * block), np.float32)
    pad[:, :K] = a
    blocks = pad.reshape(M, nb, block)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(blocks * inv)
    return (q * (amax / np.float32(127.0))).reshape(M, -1)[:, :K]


def random_weight(rng: np.random.Generator, K: int, N: int, block: int, keep: float = 0.5, *, zero_points: bool = False,
                  outliers: int = 0, bias: bool = False, scale_dtype=np.float16, index_type=None, tile: int = 1
                  ) -> SparseQuantWeight:
    """A random valid weight (tests and benchmarks): each tile of `tile` columns keeps a random subset of about
    `keep` of its groups."""
    nb = -(-K // block)
    tiles = -(-N // tile)
    kept = rng.random((tiles, nb)) < keep
    counts = kept.sum(axis=1)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    owners, blocks = np.nonzero(kept)
    order = np.lexsort((rng.random(len(owners)), owners))  # within a tile any block order is valid
    blocks = blocks[order]
    slots = len(blocks) * tile
    codes = rng.integers(0, 16, size=(slots, block), dtype=np.uint8)
    idx_t = index_type or index_dtype(nb)
    if np.dtype(scale_dtype) == np.uint8:  # codes over the whole range, below a largest scale of 0.021
        scales, exponent = rng.integers(0, 256, size=slots, dtype=np.uint8), scale_code_exponent(0.021)
    else:
        scales, exponent = (rng.random(slots) * 0.02 + 0.001).astype(scale_dtype), 0
    w = SparseQuantWeight(K=K, N=N, block=block, packed=pack_codes(codes), scales=scales, group_ptr=ptr,
                          group_index=blocks.astype(idx_t), tile=tile, scale_exponent=exponent)
    if zero_points:
        w.zero_points = rng.integers(-8, 8, size=slots, dtype=np.int8)
    if outliers:
        rows = np.stack([rng.choice(K, size=min(outliers, K), replace=False) for _ in range(N)])
        w.outlier_rows = rows.astype(np.uint16)
        w.outlier_values = rng.normal(0, 0.2, size=rows.shape).astype(np.float32)
    if bias:
        w.bias = rng.normal(size=N).astype(np.float32)
    return w
