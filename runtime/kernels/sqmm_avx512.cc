// AVX-512 (F, BW, VL, DQ, VNNI) SparseQuantMatMul. Compiled with -mavx512* flags; only called when
// the CPU reports those features at run time. block 32: two groups per zmm (codes of a group are
// [low nibbles | high nibbles] = 32 consecutive rows, matching 32 consecutive int8 activations);
// block >= 64 (multiple of 64): one 64-row unit per zmm. Other block sizes use the scalar code.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "sqmm.h"
#include "sqmm_tile8.h"
#include "sqmm_x86.h"

namespace msops {
namespace {

// Software prefetch distance in groups for the packed codes stream (block 32: 16 bytes per group). The
// hardware prefetchers alone leave a single core well below DRAM bandwidth on the one-token path.
#ifndef MSOPS_PREFETCH_GROUPS
#define MSOPS_PREFETCH_GROUPS 256
#endif
constexpr int64_t kPrefetchGroups = MSOPS_PREFETCH_GROUPS;

template <class ScaleT> inline __m128 load_scales4(const Problem& p, int64_t g);
template <> inline __m128 load_scales4<float>(const Problem& p, int64_t g) {
  return _mm_loadu_ps(static_cast<const float*>(p.scales) + g);
}
template <> inline __m128 load_scales4<uint16_t>(const Problem& p, int64_t g) {
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p.scales) + g)));
}
template <> inline __m128 load_scales4<uint8_t>(const Problem& p, int64_t g) {  // scale_from_code, 4 at a time
  int32_t four;
  std::memcpy(&four, static_cast<const uint8_t*>(p.scales) + g, 4);
  const __m128i c = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(four));
  const __m128i mag = _mm_add_epi32(_mm_slli_epi32(_mm_and_si128(c, _mm_set1_epi32(0x7f)), 20),
                                    _mm_set1_epi32(static_cast<int32_t>(p.scale_code_bias)));
  const __m128i sign = _mm_slli_epi32(_mm_and_si128(c, _mm_set1_epi32(0x80)), 24);
  return _mm_castsi128_ps(_mm_or_si128(mag, sign));
}

template <class IndexT> inline __m128i load_index4(const IndexT* idx);
template <> inline __m128i load_index4<uint16_t>(const uint16_t* idx) { return _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(idx))); }
template <> inline __m128i load_index4<int32_t>(const int32_t* idx) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx)); }

inline __m128 zero_points4(const int8_t* zp, int64_t g) {
  if (!zp) return _mm_set1_ps(8.f);
  int32_t four;
  std::memcpy(&four, zp + g, 4);
  return _mm_add_ps(_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(four))), _mm_set1_ps(8.f));
}
inline float zero_point1(const int8_t* zp, int64_t g) { return 8.f + (zp ? static_cast<float>(zp[g]) : 0.f); }

inline float hsum128(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

// Codes of a 32-row group from its 16 packed bytes: [low nibbles | high nibbles] as 32 bytes.
inline __m256i unpack16(const uint8_t* w) {
  const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i m = _mm_set1_epi8(0x0f);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(p, m)), _mm_and_si128(_mm_srli_epi16(p, 4), m), 1);
}

// int8 activations, block == 32.
template <class ScaleT, class IndexT>
void int8_block32(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  const IndexT* idx = static_cast<const IndexT*>(p.group_index);
  const __m512i nib = _mm512_set1_epi8(0x0f);
  const __m512i shifts = _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4);
  const __m512i lo_half = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i hi_half = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t g0 = p.group_ptr[n], g1 = p.group_ptr[n + 1];
    for (int64_t m = 0; m < p.M; ++m) {
      const int8_t* arow = a.aq + m * p.Kp;
      const float* srow = a.ascale + m * p.n_blocks;
      const float* crow = a.acorr + m * p.n_blocks;
      const float* prow = a.apair + m * p.n_blocks * 2;
      // Independent accumulators (two per step of 4 groups, two steps per iteration): one chain of dependent
      // FMAs would bound the loop by FMA latency, not by the bytes it streams.
      __m512 facc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      __m128 cacc[2] = {_mm_setzero_ps(), _mm_setzero_ps()};
      auto four_groups = [&](int64_t g, __m512& f01, __m512& f23, __m128& c4) {
        _mm_prefetch(reinterpret_cast<const char*>(p.packed + (g + kPrefetchGroups) * 16), _MM_HINT_T0);
        const int64_t b0 = idx[g], b1 = idx[g + 1], b2 = idx[g + 2], b3 = idx[g + 3];
        const __m512i a01 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow + b0 * 32))),
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow + b1 * 32)), 1);
        const __m512i a23 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow + b2 * 32))),
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow + b3 * 32)), 1);
        const __m512i pw = _mm512_loadu_si512(p.packed + g * 16);
        const __m512i u01 = _mm512_and_si512(_mm512_srlv_epi64(_mm512_shuffle_i64x2(pw, pw, _MM_SHUFFLE(1, 1, 0, 0)), shifts), nib);
        const __m512i u23 = _mm512_and_si512(_mm512_srlv_epi64(_mm512_shuffle_i64x2(pw, pw, _MM_SHUFFLE(3, 3, 2, 2)), shifts), nib);
        const __m512i d01 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u01, a01);
        const __m512i d23 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u23, a23);
        // (ascale, acorr) of the 4 blocks: two 8-byte loads per pair of groups, then de-interleave
        const __m128 p01 = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(reinterpret_cast<const double*>(prow + 2 * b0)),
                                                      reinterpret_cast<const double*>(prow + 2 * b1)));
        const __m128 p23 = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(reinterpret_cast<const double*>(prow + 2 * b2)),
                                                      reinterpret_cast<const double*>(prow + 2 * b3)));
        const __m128 sa4 = _mm_shuffle_ps(p01, p23, _MM_SHUFFLE(2, 0, 2, 0));
        const __m128 ca4 = _mm_shuffle_ps(p01, p23, _MM_SHUFFLE(3, 1, 3, 1));
        const __m128 sw4 = load_scales4<ScaleT>(p, g);
        const __m128 s4 = _mm_mul_ps(sw4, sa4);
        const __m512 s512 = _mm512_castps128_ps512(s4);
        f01 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d01), _mm512_permutexvar_ps(lo_half, s512), f01);
        f23 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d23), _mm512_permutexvar_ps(hi_half, s512), f23);
        c4 = _mm_fmadd_ps(_mm_mul_ps(sw4, zero_points4(p.zero_points, g)), ca4, c4);
      };
      int64_t g = g0;
      for (; g + 8 <= g1; g += 8) {
        four_groups(g, facc[0], facc[1], cacc[0]);
        four_groups(g + 4, facc[2], facc[3], cacc[1]);
      }
      for (; g + 4 <= g1; g += 4) four_groups(g, facc[0], facc[1], cacc[0]);
      float tail = 0.f;
      for (; g < g1; ++g) {
        const int64_t b = idx[g];
        const __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), unpack16(p.packed + g * 16),
                                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow + b * 32)));
        const __m128i d4 = _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
        const float sw = load_scale1<ScaleT>(p, g);
        const int32_t di = _mm_cvtsi128_si32(_mm_hadd_epi32(_mm_hadd_epi32(d4, d4), _mm_hadd_epi32(d4, d4)));
        tail += sw * (srow[b] * static_cast<float>(di) - zero_point1(p.zero_points, g) * crow[b]);
      }
      const __m512 fsum = _mm512_add_ps(_mm512_add_ps(facc[0], facc[1]), _mm512_add_ps(facc[2], facc[3]));
      p.Y[m * p.N + n] = _mm512_reduce_add_ps(fsum) - hsum128(_mm_add_ps(cacc[0], cacc[1])) + tail;
    }
  }
}

// int8 activations, block 32, column tiles of T = 4U columns that share their kept blocks. One 64-byte load
// holds a block of 4 columns (16 packed bytes each, one per 128-bit lane); the block's 32 activations are
// broadcast to every lane once per tile-group and serve all U loads. Each int32 lane of the two vpdpbusd
// starts at -z * (sum of its activations), so the zero point is applied in the integer domain; the float
// work per 4 groups is one convert, one multiply and one FMA.
template <class ScaleT, class IndexT, int U>
void int8_block32_tiles(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  const IndexT* idx = static_cast<const IndexT*>(p.group_index);
  const int64_t T = 4 * U, nb = p.n_blocks;
  const __m512i nib = _mm512_set1_epi8(0x0f);
  const __m512i rep4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t t0 = n0; t0 < n1; t0 += T) {
    const int64_t t = t0 / T, j0 = p.group_ptr[t], j1 = p.group_ptr[t + 1];
    for (int64_t m = 0; m < p.M; ++m) {
      const int8_t* arow = a.aq + m * p.Kp;
      const float* srow = a.ascale + m * nb;
      const int32_t* lrow = a.alanes + m * nb * 4;
      __m512 acc[2][U];
      for (int u = 0; u < U; ++u) acc[0][u] = acc[1][u] = _mm512_setzero_ps();
      auto step = [&](int64_t j, __m512(&f)[U]) {
        const int64_t b = idx[j];
        const __m512i alo = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(arow + b * 32)));
        const __m512i ahi = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(arow + b * 32 + 16)));
        const __m512i neg = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lrow + b * 4)));
        const __m512 sa = _mm512_set1_ps(srow[b]);
        for (int u = 0; u < U; ++u) {
          const int64_t s = j * T + 4 * u;
          _mm_prefetch(reinterpret_cast<const char*>(p.packed + s * 16 + kPrefetchGroups * 16), _MM_HINT_T0);
          __m512i d;
          if (p.zero_points) {
            int32_t four;
            std::memcpy(&four, p.zero_points + s, 4);
            const __m128i z4 = _mm_add_epi32(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(four)), _mm_set1_epi32(8));
            d = _mm512_mullo_epi32(_mm512_permutexvar_epi32(rep4, _mm512_castsi128_si512(z4)), neg);
          } else {
            d = _mm512_slli_epi32(neg, 3);
          }
          const __m512i pw = _mm512_loadu_si512(p.packed + s * 16);
          d = _mm512_dpbusd_epi32(d, _mm512_and_si512(pw, nib), alo);
          d = _mm512_dpbusd_epi32(d, _mm512_and_si512(_mm512_srli_epi16(pw, 4), nib), ahi);
          const __m512 sw = _mm512_permutexvar_ps(rep4, _mm512_castps128_ps512(load_scales4<ScaleT>(p, s)));
          f[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw, sa), f[u]);
        }
      };
      int64_t j = j0;
      for (; j + 2 <= j1; j += 2) {
        step(j, acc[0]);
        step(j + 1, acc[1]);
      }
      if (j < j1) step(j, acc[0]);
      for (int u = 0; u < U; ++u) {
        const int64_t c0 = t0 + 4 * u;
        if (c0 >= n1) break;
        __m512 v = _mm512_add_ps(acc[0][u], acc[1][u]);
        v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
        v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
        const __m128 sums = _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, v));
        const int64_t cols = std::min<int64_t>(4, n1 - c0);
        _mm_mask_storeu_ps(p.Y + m * p.N + c0, static_cast<__mmask8>((1u << cols) - 1), sums);
      }
    }
  }
}

// int8 activations, block a multiple of 64: one 64-row unit per zmm.
template <class ScaleT, class IndexT>
void int8_block64(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  const IndexT* idx = static_cast<const IndexT*>(p.group_index);
  const int64_t B = p.block, half = B / 2, units = B / 64;
  const __m512i nib = _mm512_set1_epi8(0x0f);
  const __m512i shifts = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
  for (int64_t n = n0; n < n1; ++n) {
    const ColumnGroups cg = column_groups(p, n);
    for (int64_t m = 0; m < p.M; ++m) {
      const int8_t* arow = a.aq + m * p.Kp;
      const float* srow = a.ascale + m * p.n_blocks;
      const float* crow = a.acorr + m * p.n_blocks;
      __m512 facc = _mm512_setzero_ps();
      float corr = 0.f;
      for (int64_t j = cg.j0; j < cg.j1; ++j) {
        const int64_t b = idx[j], g = cg.slot(j);
        const int8_t* x = arow + b * B;
        const uint8_t* w = p.packed + g * half;
        __m512i d = _mm512_setzero_si512();
        for (int64_t c = 0; c < units; ++c) {
          const __m512i pw = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 32)));
          const __m512i u = _mm512_and_si512(_mm512_srlv_epi64(pw, shifts), nib);
          const __m512i xa = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + c * 32))),
                                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + half + c * 32)), 1);
          d = _mm512_dpbusd_epi32(d, u, xa);
        }
        const float sw = load_scale1<ScaleT>(p, g);
        facc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(sw * srow[b]), facc);
        corr += sw * zero_point1(p.zero_points, g) * crow[b];
      }
      p.Y[m * p.N + n] = _mm512_reduce_add_ps(facc) - corr;
    }
  }
}

// fp32 activations, block a multiple of 32: 16 packed bytes = rows [c, c+16) and [half+c, half+c+16).
template <class ScaleT, class IndexT>
void fp32_block32(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  const IndexT* idx = static_cast<const IndexT*>(p.group_index);
  const int64_t B = p.block, half = B / 2, chunks = half / 16;
  const __m128i nib = _mm_set1_epi8(0x0f);
  for (int64_t n = n0; n < n1; ++n) {
    const ColumnGroups cg = column_groups(p, n);
    for (int64_t m = 0; m < p.M; ++m) {
      const float* arow = a.af + m * p.Kp;
      const float* crow = a.acorr + m * p.n_blocks;
      __m512 facc = _mm512_setzero_ps();
      float corr = 0.f;
      for (int64_t j = cg.j0; j < cg.j1; ++j) {
        const int64_t b = idx[j], g = cg.slot(j);
        const float* x = arow + b * B;
        const uint8_t* w = p.packed + g * half;
        __m512 t = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) {
          const __m128i pk = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * 16));
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(pk, nib)));
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(pk, 4), nib)));
          t = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + c * 16), t);
          t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + half + c * 16), t);
        }
        const float sw = load_scale1<ScaleT>(p, g);
        facc = _mm512_fmadd_ps(t, _mm512_set1_ps(sw), facc);
        corr += sw * zero_point1(p.zero_points, g) * crow[b];
      }
      p.Y[m * p.N + n] = _mm512_reduce_add_ps(facc) - corr;
    }
  }
}

// 16 packed bytes as signed codes w = u - 8: their low nibbles to `lo`, high nibbles to `hi` (16 bytes each,
// 16-byte aligned). Returns the sum of the 32 w.
inline int32_t signed_codes16(const uint8_t* packed, int8_t* lo, int8_t* hi) {
  const __m128i nib = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
  const __m128i pk = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed));
  const __m128i l = _mm_and_si128(pk, nib), h = _mm_and_si128(_mm_srli_epi16(pk, 4), nib);
  const __m128i usum = _mm_add_epi64(_mm_sad_epu8(l, _mm_setzero_si128()), _mm_sad_epu8(h, _mm_setzero_si128()));
  _mm_store_si128(reinterpret_cast<__m128i*>(lo), _mm_sub_epi8(l, eight));
  _mm_store_si128(reinterpret_cast<__m128i*>(hi), _mm_sub_epi8(h, eight));
  return static_cast<int32_t>(_mm_cvtsi128_si64(usum) + _mm_extract_epi64(usum, 1)) - 8 * 32;
}

// Many rows: for each kept group the codes are unpacked once to signed bytes w = u - 8, and every dword of 4
// of them is an embedded {1to16} broadcast against the 16-row tile of the matching activations, stored as
// unsigned a + 128: one vpdpbusd per 4 weights x 16 rows. D = sum (a + 128) w, so
// sum a (u - z) = D - 128 * sum(w) + (8 - z) * sum(a), and the last term vanishes when symmetric (z = 8).
template <class ScaleT, class IndexT>
void int8_tiled(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  const IndexT* idx = static_cast<const IndexT*>(p.group_index);
  const int64_t B = p.block, half = B / 2, quads = B / 4, nb = p.n_blocks;
  alignas(64) int8_t codes[256];
  alignas(64) float out[kTileRows];
  constexpr int64_t kColumnChunk = 8;  // these columns' codes stay in L1/L2 while every row tile passes over them
  for (int64_t nc = n0; nc < n1; nc += kColumnChunk)
  for (int64_t t = 0; t < a.tiles; ++t) {
    const int64_t rows = std::min<int64_t>(kTileRows, p.M - t * kTileRows);
    const int8_t* at = a.atile + t * nb * quads * kTileRows * 4;
    const float* st = a.stile + t * nb * kTileRows;
    const float* ct = a.ctile + t * nb * kTileRows;
    for (int64_t n = nc; n < std::min(n1, nc + kColumnChunk); ++n) {
      const ColumnGroups cg = column_groups(p, n);
      __m512 facc = _mm512_setzero_ps();
      for (int64_t j = cg.j0; j < cg.j1; ++j) {
        const int64_t b = idx[j], g = cg.slot(j);
        const uint8_t* w = p.packed + g * half;
        int32_t wsum = 0;
        for (int64_t c = 0; c < half; c += 16) wsum += signed_codes16(w + c, codes + c, codes + half + c);
        const int8_t* ab = at + b * quads * kTileRows * 4;
        const int32_t* cw = reinterpret_cast<const int32_t*>(codes);
        __m512i d0 = _mm512_set1_epi32(-128 * wsum), d1 = _mm512_setzero_si512();
        __m512i d2 = _mm512_setzero_si512(), d3 = _mm512_setzero_si512();
        for (int64_t q = 0; q < quads; q += 4) {
          d0 = _mm512_dpbusd_epi32(d0, _mm512_load_si512(ab + (q + 0) * 64), _mm512_set1_epi32(cw[q + 0]));
          d1 = _mm512_dpbusd_epi32(d1, _mm512_load_si512(ab + (q + 1) * 64), _mm512_set1_epi32(cw[q + 1]));
          d2 = _mm512_dpbusd_epi32(d2, _mm512_load_si512(ab + (q + 2) * 64), _mm512_set1_epi32(cw[q + 2]));
          d3 = _mm512_dpbusd_epi32(d3, _mm512_load_si512(ab + (q + 3) * 64), _mm512_set1_epi32(cw[q + 3]));
        }
        const __m512 d = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_add_epi32(d0, d1), _mm512_add_epi32(d2, d3)));
        const float sw = load_scale1<ScaleT>(p, g);
        __m512 v = _mm512_mul_ps(d, _mm512_load_ps(st + b * kTileRows));
        if (p.zero_points)  // (8 - z) * sa * sum(a) = -z' * acorr
          v = _mm512_fnmadd_ps(_mm512_set1_ps(static_cast<float>(p.zero_points[g])), _mm512_load_ps(ct + b * kTileRows), v);
        facc = _mm512_fmadd_ps(v, _mm512_set1_ps(sw), facc);
      }
      _mm512_store_ps(out, facc);
      for (int64_t r = 0; r < rows; ++r) p.Y[(t * kTileRows + r) * p.N + n] = out[r];
    }
  }
}

// Many rows, block 32, column tiles: the 16-row activation tile of a kept block (8 zmm) is loaded once per
// tile-group and serves the tile's columns, C at a time (register pressure), each as in int8_tiled. The tile's
// codes stay in L1 while every row tile passes over them.
template <class ScaleT, class IndexT, int C>
void int8_tiled_tiles(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  const IndexT* idx = static_cast<const IndexT*>(p.group_index);
  const int64_t T = p.tile, nb = p.n_blocks;
  constexpr int64_t kQuads = 8;  // block 32
  alignas(64) int8_t codes[32];
  alignas(64) float out[C][kTileRows];
  for (int64_t t0 = n0; t0 < n1; t0 += T) {
    const int64_t j0 = p.group_ptr[t0 / T], j1 = p.group_ptr[t0 / T + 1];
    for (int64_t rt = 0; rt < a.tiles; ++rt) {
      const int64_t rows = std::min<int64_t>(kTileRows, p.M - rt * kTileRows);
      const int8_t* at = a.atile + rt * nb * kQuads * kTileRows * 4;
      const float* st = a.stile + rt * nb * kTileRows;
      const float* ct = a.ctile + rt * nb * kTileRows;
      for (int64_t c0 = 0; c0 < T && t0 + c0 < n1; c0 += C) {
        __m512 facc[C];
        for (int c = 0; c < C; ++c) facc[c] = _mm512_setzero_ps();
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t b = idx[j];
          const int8_t* ab = at + b * kQuads * kTileRows * 4;
          __m512i av[kQuads];
          for (int q = 0; q < kQuads; ++q) av[q] = _mm512_load_si512(ab + q * 64);
          const __m512 sa = _mm512_load_ps(st + b * kTileRows);
          for (int c = 0; c < C; ++c) {
            const int64_t s = j * T + c0 + c;
            const int32_t wsum = signed_codes16(p.packed + s * 16, codes, codes + 16);
            const int32_t* cw = reinterpret_cast<const int32_t*>(codes);
            __m512i d0 = _mm512_set1_epi32(-128 * wsum), d1 = _mm512_setzero_si512();
            for (int q = 0; q < kQuads; q += 2) {
              d0 = _mm512_dpbusd_epi32(d0, av[q], _mm512_set1_epi32(cw[q]));
              d1 = _mm512_dpbusd_epi32(d1, av[q + 1], _mm512_set1_epi32(cw[q + 1]));
            }
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)), sa);
            if (p.zero_points)  // (8 - z) * sa * sum(a) = -z' * acorr
              v = _mm512_fnmadd_ps(_mm512_set1_ps(static_cast<float>(p.zero_points[s])), _mm512_load_ps(ct + b * kTileRows), v);
            facc[c] = _mm512_fmadd_ps(v, _mm512_set1_ps(load_scale1<ScaleT>(p, s)), facc[c]);
          }
        }
        const int64_t cols = std::min<int64_t>(C, n1 - (t0 + c0));
        for (int c = 0; c < cols; ++c) _mm512_store_ps(out[c], facc[c]);
        for (int64_t r = 0; r < rows; ++r)
          for (int c = 0; c < cols; ++c) p.Y[(rt * kTileRows + r) * p.N + t0 + c0 + c] = out[c][r];
      }
    }
  }
}

// The 8 columns' dot products over a group for sqmm_tile8.h: vpdpbusd per 4 rows, in two chains.
struct DotVnni {
  // One row's dot products of 8 columns over a group of H relaid 32-row sub-blocks (codes at w, Problem::codes8;
  // activations at x, Activations::abcast): two dwords of codes per 64-byte vector against two 32-byte activation
  // vectors, half the instructions of 32-byte steps; int32 sums need no per-sub-block widening.
  static constexpr bool kRelaidRow = true;
  static __m256i relaid_row(const uint8_t* w, const __m256i* x, int64_t H) {
    const __m512i nib = _mm512_set1_epi8(0x0f);
    __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
    for (int64_t h = 0; h < H; ++h) {
      for (int q = 0; q < 4; q += 2) {
        const __m512i d = _mm512_loadu_si512(w + 128 * h + 32 * q);  // dwords q and q + 1 of the 8 columns
        lo = _mm512_dpbusd_epi32(lo, _mm512_and_si512(d, nib), _mm512_loadu_si512(x + 8 * h + q));
        hi = _mm512_dpbusd_epi32(hi, _mm512_and_si512(_mm512_srli_epi16(d, 4), nib), _mm512_loadu_si512(x + 8 * h + q + 4));
      }
    }
    const __m512i s = _mm512_add_epi32(lo, hi);
    return _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
  }
  static __m256i zero() { return _mm256_setzero_si256(); }
  static __m256i step(__m256i s, __m256i u, __m256i x) { return _mm256_dpbusd_epi32(s, u, x); }
  static __m256i finish(__m256i s) { return s; }
  static __m256i dot(const __m256i v[8], const __m256i x[8]) {
    __m256i d0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), v[0], x[0]);
    __m256i d1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), v[1], x[1]);
    for (int q = 2; q < 8; q += 2) {
      d0 = _mm256_dpbusd_epi32(d0, v[q], x[q]);
      d1 = _mm256_dpbusd_epi32(d1, v[q + 1], x[q + 1]);
    }
    return _mm256_add_epi32(d0, d1);
  }
};

template <class ScaleT, class IndexT>
void columns_typed(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  if (p.accuracy_level == 4) {
    if (uses_tile8_rows(p) || a.abcast) return int8_block32_tile8<ScaleT, IndexT, DotVnni>(p, a, n0, n1);
    if (a.alanes) {  // set exactly when has_tile_kernels(p)
      if (p.tile == 4) return int8_block32_tiles<ScaleT, IndexT, 1>(p, a, n0, n1);
      if (p.tile == 8) return int8_block32_tiles<ScaleT, IndexT, 2>(p, a, n0, n1);
      if (p.tile == 16) return int8_block32_tiles<ScaleT, IndexT, 4>(p, a, n0, n1);
    }
    if (p.block == 32 && p.tile == 1) return int8_block32<ScaleT, IndexT>(p, a, n0, n1);
    if (p.block % 64 == 0) return int8_block64<ScaleT, IndexT>(p, a, n0, n1);
  } else if (p.block % 32 == 0) {
    return fp32_block32<ScaleT, IndexT>(p, a, n0, n1);
  }
  columns_scalar(p, a, n0, n1);
}

}  // namespace

void columns_avx512(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  with_storage_types(p, [&](auto scale, auto index) { columns_typed<decltype(scale), decltype(index)>(p, a, n0, n1); });
}

void columns_avx512_tiled(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  with_storage_types(p, [&](auto scale, auto index) {
    using S = decltype(scale);
    using I = decltype(index);
    if (!has_tile_kernels(p)) return int8_tiled<S, I>(p, a, n0, n1);
    if (p.tile == 4) return int8_tiled_tiles<S, I, 4>(p, a, n0, n1);
    int8_tiled_tiles<S, I, 8>(p, a, n0, n1);
  });
}

void prepare_rows_avx512(const Problem& p, int8_t* aq, float* af, float* ascale, float* acorr, int64_t m0, int64_t m1) {
  const int64_t B = p.block, nb = p.n_blocks;
  if (B % 16 != 0) return prepare_rows_scalar(p, aq, af, ascale, acorr, m0, m1);
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = p.A + m * p.K;
    if (af) {
      std::memcpy(af + m * p.Kp, x, sizeof(float) * p.K);
      std::memset(af + m * p.Kp + p.K, 0, sizeof(float) * (p.Kp - p.K));
    }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * B, len = (k0 + B < p.K ? B : p.K - k0);
      if (p.accuracy_level == 4) {
        __m512 vmax = _mm512_setzero_ps();
        for (int64_t k = 0; k < len; k += 16) {
          const __mmask16 mk = len - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (len - k)) - 1);
          vmax = _mm512_max_ps(vmax, _mm512_and_ps(_mm512_maskz_loadu_ps(mk, x + k0 + k), sign));
        }
        const float amax = _mm512_reduce_max_ps(vmax);
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        const __m512 vinv = _mm512_set1_ps(inv);
        int8_t* q = aq + m * p.Kp + k0;
        __m512i vsum = _mm512_setzero_si512();
        for (int64_t k = 0; k < B; k += 16) {
          const int64_t r = len - k;
          const __mmask16 mk = r >= 16 ? (__mmask16)0xffff : (r <= 0 ? (__mmask16)0 : (__mmask16)((1u << r) - 1));
          const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + k0 + k), vinv));
          vsum = _mm512_add_epi32(vsum, v);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(v));
        }
        const float sa = amax / 127.f;
        ascale[m * nb + b] = sa;
        acorr[m * nb + b] = sa * static_cast<float>(_mm512_reduce_add_epi32(vsum));
      } else {
        __m512 vs = _mm512_setzero_ps();
        for (int64_t k = 0; k < len; k += 16) {
          const __mmask16 mk = len - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (len - k)) - 1);
          vs = _mm512_add_ps(vs, _mm512_maskz_loadu_ps(mk, x + k0 + k));
        }
        acorr[m * nb + b] = _mm512_reduce_add_ps(vs);
      }
    }
  }
}

}  // namespace msops
