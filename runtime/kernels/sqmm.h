// SparseQuantMatMul: Y[..., N] = A[..., K] @ W[K, N] (+ outliers) (+ bias), W stored as kept 4-bit groups.
//
// Weight format (see docs/spquant.md; the ONNX function in runtime/sparse_quant_function.py is the
// executable specification):
//   K is split into n_blocks = ceil(K / block) groups of `block` rows. Columns come in tiles of T = `tile`
//   consecutive columns (attribute, default 1; the last tile may be partial) that keep the same blocks. Tile t
//   keeps the tile-groups j in [group_ptr[t], group_ptr[t+1]) (CSR over tile-groups), in any block order;
//   column c of tile t is stored at slot s = j * T + c:
//     group_index[j]  block id b of tile-group j (uint16 or int32)
//     packed[s, i]    byte i holds code u[i] (low nibble) and u[i + block/2] (high nibble), i < block/2
//     scales[s]       float16 or float; or uint8 codes (attribute scale_code = 1): code c = s << 7 | e << 3 | m
//                     stands for (-1)^s * 2^(scale_exponent + e) * (1 + m / 8), scale_exponent a node attribute
//     zero_points[s]  optional int8 z' in [-8, 7]; the zero point is 8 + z' (8 when absent: symmetric)
//   W[b*block + i, t*T + c] = (u[i] - 8 - z') * scales[s]; rows of dropped groups are zero; rows >= K and
//   columns >= N (the partial last tile) are padding. T = 1 is plain per-column CSR.
//   Outliers (optional, R = attribute `outliers` per column): W[rows[n, r], n] += outlier_values[n, r], with
//   rows little-endian uint16 stored as uint8 [2 * N * R] and outlier_values float [N, R].
//
// Activation compute: accuracy_level 4 quantizes A per (row, block) to int8 (symmetric, like
// MatMulNBits accuracy_level=4) and runs u8 x s8 dot products; accuracy_level 0 keeps A in fp32.
// Outliers and bias are always applied in fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace msops {

struct Problem {
  int64_t M = 0, K = 0, N = 0, block = 0, n_blocks = 0, Kp = 0;  // Kp = n_blocks * block
  int64_t tile = 1;                 // T: columns per tile; group_ptr is [ceil(N / T) + 1]
  int accuracy_level = 4;
  const float* A = nullptr;         // [M, K]
  const uint8_t* packed = nullptr;  // [nnz * T, block/2]
  const void* scales = nullptr;
  bool scales_f16 = false;
  bool scales_u8 = false;           // 8-bit scale codes
  uint32_t scale_code_bias = 0;     // (127 + scale_exponent) << 23 (see scale_from_code)
  const int8_t* zero_points = nullptr;  // [nnz * T] or null
  const int32_t* group_ptr = nullptr;   // [tiles + 1]
  const void* group_index = nullptr;    // [nnz] tile-groups
  bool index_u16 = false;
  int64_t R = 0;                            // outliers per column (0: none)
  const uint16_t* outlier_rows = nullptr;   // [N, R]
  const float* outlier_values = nullptr;    // [N, R]
  const float* bias = nullptr;  // [N] or null
  float* Y = nullptr;           // [M, N]
  // Block a multiple of 32, tiles of a multiple of 8 columns: the codes again, each run of 8 slots (one tile-group's
  // 8 columns) stored per 32-row sub-block h as 128 bytes [dword q][column][4 bytes] of the sub-block's block-32
  // packing (byte i = u[32h + i] | u[32h + 16 + i] << 4; transpose_codes8), which is the order the tile-of-8 kernel
  // computes with. Null: it transposes every tile-group in registers on every call (block 32 only).
  const uint8_t* codes8 = nullptr;
};

// Problem::codes8 from packed, `slots` slots (a multiple of 8) of block/2 bytes, block = 32H: out[(g*H + h)*128 +
// q*32 + c*4 + i] = byte q*4 + i of sub-block h of slot g*8 + c (at block 32: packed[(g*8 + c)*16 + q*4 + i]).
void transpose_codes8(const uint8_t* packed, int64_t slots, int64_t block, uint8_t* out);

// Per-call prepared activations. For accuracy_level 4: aq (int8, zero padded to Kp), ascale and
// acorr = ascale * (sum of the block's int8 codes). For level 0: af (fp32 padded to Kp) and
// acorr = block sums of af. A group's contribution is sw * (ascale * dot(u, a) - z * acorr).
struct Activations {
  const float* af = nullptr;   // [M, Kp]
  const int8_t* aq = nullptr;  // [M, Kp]
  const float* ascale = nullptr;  // [M, n_blocks]
  const float* acorr = nullptr;   // [M, n_blocks]
  const float* apair = nullptr;   // [M, n_blocks, 2]: (ascale, acorr) interleaved, level 4 only
  // Level 4, one row, Problem::codes8 given (the tile-of-8 kernel's one-row path): every 4 bytes of aq repeated 8
  // times, one 32-byte vector per 4 activations, so that its dot products load them instead of broadcasting them
  // per tile-group.
  const int32_t* abcast = nullptr;  // [Kp / 4, 8]
  // Level 4, block 32: minus the sums of the int8 activations that land in each int32 lane of a vpdpbusd
  // over [rows 0..15 | rows 16..31] of a block: lane i gets rows 4i..4i+3 and 16+4i..16+4i+3.
  const int32_t* alanes = nullptr;  // [M, n_blocks, 4]
  // Row-tiled copies for many rows (AVX-512, level 4): 16 rows per tile, zero padded.
  //   atile [tiles, n_blocks, block/4, 16 rows, 4 bytes] holding a + 128 as uint8; stile, ctile [tiles, n_blocks, 16]
  int64_t tiles = 0;
  const int8_t* atile = nullptr;
  const float* stile = nullptr;
  const float* ctile = nullptr;
};

constexpr int64_t kTileRows = 16;
constexpr int64_t kTiledMinRows = 8;  // from this many rows the many-row paths run

// Whether the tile-of-8 kernel of sqmm_tile8.h can compute p: int8 activations, tiles of a multiple of 8 columns,
// block 32, or any block of 32H rows whose codes were relaid (Problem::codes8).
inline bool tile8_computes(const Problem& p) {
  return p.accuracy_level == 4 && p.tile % 8 == 0 && (p.block == 32 || (p.block % 32 == 0 && p.codes8));
}

// Whether AVX-512 runs p's many rows through the tile-of-8 kernel, which reads the activations as prepared: no row
// tiles, no lane sums.
inline bool uses_tile8_rows(const Problem& p) { return tile8_computes(p) && p.M >= kTiledMinRows; }

// Fill the row-tiled copies from aq/ascale/acorr (rows past M are zero).
void tile_rows(const Problem& p, const int8_t* aq, const float* ascale, const float* acorr, int8_t* atile, float* stile,
               float* ctile, int64_t tiles);

// Column n's kept groups: tile-groups j in [j0, j1); group j of the column is stored at slot j * stride + c.
struct ColumnGroups {
  int64_t j0, j1, stride, c;
  int64_t slot(int64_t j) const { return j * stride + c; }
};
inline ColumnGroups column_groups(const Problem& p, int64_t n) {
  const int64_t t = n / p.tile;
  return {p.group_ptr[t], p.group_ptr[t + 1], p.tile, n - t * p.tile};
}

// Whether AVX-512 has column-tile kernels for p (block 32, tiles of 4, 8 or 16 columns): the one-token one needs
// Activations::alanes, the many-row one shares each activation tile across the tile's columns.
inline bool has_tile_kernels(const Problem& p) { return p.block == 32 && (p.tile == 4 || p.tile == 8 || p.tile == 16); }

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Rows [m0, m1): fill the buffers of Activations (level 4: aq/ascale/acorr; level 0: acorr, and af
// when K is not a multiple of block).
void prepare_rows_scalar(const Problem& p, int8_t* aq, float* af, float* ascale, float* acorr, int64_t m0, int64_t m1);
void prepare_rows_avx2(const Problem& p, int8_t* aq, float* af, float* ascale, float* acorr, int64_t m0, int64_t m1);
void prepare_rows_avx512(const Problem& p, int8_t* aq, float* af, float* ascale, float* acorr, int64_t m0, int64_t m1);

// Columns [n0, n1) of Y for all rows: the quantized part only (outliers and bias come after). n0 is a multiple
// of the tile (AVX-512 walks whole tiles of 4, 8 or 16 columns at block 32, int8 activations).
void columns_scalar(const Problem& p, const Activations& a, int64_t n0, int64_t n1);
void columns_avx2(const Problem& p, const Activations& a, int64_t n0, int64_t n1);
void columns_avx512(const Problem& p, const Activations& a, int64_t n0, int64_t n1);
// Many rows, int8 activations, block a multiple of 32: uses the row-tiled activations.
void columns_avx512_tiled(const Problem& p, const Activations& a, int64_t n0, int64_t n1);

// Columns [n0, n1): add outliers (fp32 A) and bias. Every ISA uses this one: the outlier streams cost their
// bytes, and a masked gather plus a 16-lane reduction per column measured no faster than scalar loads.
void epilogue(const Problem& p, int64_t n0, int64_t n1);

float half_to_float(uint16_t h);

// An 8-bit scale code as float: sign bit, 4-bit exponent e, 3-bit mantissa m: (-1)^s 2^(scale_exponent + e) (1 + m/8).
// The low 7 bits shifted into a float's exponent and top mantissa bits plus the exponent bias, the sign bit moved to
// bit 31 (symmetric quantization uses signed scales: the largest magnitude lands on code -8).
inline float scale_from_code(uint8_t c, uint32_t bias) {
  const uint32_t bits = ((static_cast<uint32_t>(c & 0x80u)) << 24) | ((static_cast<uint32_t>(c & 0x7fu) << 20) + bias);
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

// One group's scale as float, for each storage type of Problem::scales (see with_storage_types); `half` turns
// float16 bits into a float (each ISA its own conversion).
template <class ScaleT, class Half>
inline float load_scale(const Problem& p, int64_t g, Half half) {
  if constexpr (std::is_same_v<ScaleT, float>) return static_cast<const float*>(p.scales)[g];
  else if constexpr (std::is_same_v<ScaleT, uint16_t>) return half(static_cast<const uint16_t*>(p.scales)[g]);
  else return scale_from_code(static_cast<const uint8_t*>(p.scales)[g], p.scale_code_bias);
}

// Calls fn(ScaleT{}, IndexT{}) with the storage types of p: scales float16 (as uint16_t), float or 8-bit codes
// (uint8_t), group indices uint16_t or int32_t. Each ISA's entry point instantiates its templated kernel through
// this one switch.
template <class Fn>
inline void with_storage_types(const Problem& p, Fn&& fn) {
  if (p.scales_u8) {
    if (p.index_u16) fn(uint8_t{}, uint16_t{});
    else fn(uint8_t{}, int32_t{});
  } else if (p.scales_f16) {
    if (p.index_u16) fn(uint16_t{}, uint16_t{});
    else fn(uint16_t{}, int32_t{});
  } else {
    if (p.index_u16) fn(float{}, uint16_t{});
    else fn(float{}, int32_t{});
  }
}

}  // namespace msops
