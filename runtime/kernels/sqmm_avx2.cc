// AVX2 + FMA + F16C SparseQuantMatMul for CPUs without AVX-512 VNNI. int8 activations use
// maddubs (u8 codes x s8 activations, no saturation: 2 * 15 * 127 < 32767) then madd to int32.
// Block sizes that are multiples of 32; others use the scalar code.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "sqmm.h"
#include "sqmm_x86.h"

namespace msops {
namespace {


inline float zero_point1(const int8_t* zp, int64_t g) { return 8.f + (zp ? static_cast<float>(zp[g]) : 0.f); }

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <class ScaleT, class IndexT>
void int8_cols(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  const IndexT* idx = static_cast<const IndexT*>(p.group_index);
  const int64_t B = p.block, half = B / 2, chunks = half / 16;
  const __m128i nib = _mm_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const ColumnGroups cg = column_groups(p, n);
    for (int64_t m = 0; m < p.M; ++m) {
      const int8_t* arow = a.aq + m * p.Kp;
      const float* srow = a.ascale + m * p.n_blocks;
      const float* crow = a.acorr + m * p.n_blocks;
      __m256 facc = _mm256_setzero_ps();
      float corr = 0.f;
      for (int64_t j = cg.j0; j < cg.j1; ++j) {
        const int64_t b = idx[j], g = cg.slot(j);
        const int8_t* x = arow + b * B;
        const uint8_t* w = p.packed + g * half;
        __m256i d = _mm256_setzero_si256();
        for (int64_t c = 0; c < chunks; ++c) {
          const __m128i pk = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c * 16));
          const __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(pk, 4), nib), _mm_and_si128(pk, nib));
          const __m256i xa = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + half + c * 16)),
                                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + c * 16)));
          d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_maddubs_epi16(u, xa), ones));
        }
        const float sw = load_scale1<ScaleT>(p, g);
        facc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sw * srow[b]), facc);
        corr += sw * zero_point1(p.zero_points, g) * crow[b];
      }
      p.Y[m * p.N + n] = hsum256(facc) - corr;
    }
  }
}

// 8 consecutive slots' scales as floats (sqmm.h's load_scale, 8 at a time).
template <class ScaleT> inline __m256 load_scales8(const Problem& p, int64_t s);
template <> inline __m256 load_scales8<float>(const Problem& p, int64_t s) {
  return _mm256_loadu_ps(static_cast<const float*>(p.scales) + s);
}
template <> inline __m256 load_scales8<uint16_t>(const Problem& p, int64_t s) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p.scales) + s)));
}
template <> inline __m256 load_scales8<uint8_t>(const Problem& p, int64_t s) {  // scale_from_code, 8 at a time
  const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(p.scales) + s)));
  const __m256i mag = _mm256_add_epi32(_mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x7f)), 20),
                                       _mm256_set1_epi32(static_cast<int32_t>(p.scale_code_bias)));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24);
  return _mm256_castsi256_ps(_mm256_or_si256(mag, sign));
}

// The zero points z = 8 + z' of 8 consecutive slots.
inline __m256 zero_points8(const int8_t* zp, int64_t s) {
  if (!zp) return _mm256_set1_ps(8.f);
  const __m256i z = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zp + s)));
  return _mm256_add_ps(_mm256_cvtepi32_ps(z), _mm256_set1_ps(8.f));
}

// The codes of 8 consecutive slots (block 32: 16 packed bytes each, byte i = u[i] | u[16 + i] << 4), transposed for
// dot products across columns: lane l of v[q] holds rows 4q..4q+3 of column lane_columns()[l]. Two 32-bit unpack
// levels gather dword q of every slot (rows 4q..4q+3 in its low nibbles, 16+4q.. in its high ones); the columns come
// out in the order lane_columns(), which the scales are permuted to and the results permuted back from.
inline void tile_codes8(const uint8_t* w, __m256i v[8]) {
  const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));       // slots 0, 1
  const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));  // slots 2, 3
  const __m256i l2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64));
  const __m256i l3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 96));
  const __m256i lo01 = _mm256_unpacklo_epi32(l0, l1), hi01 = _mm256_unpackhi_epi32(l0, l1);
  const __m256i lo23 = _mm256_unpacklo_epi32(l2, l3), hi23 = _mm256_unpackhi_epi32(l2, l3);
  const __m256i d[4] = {_mm256_unpacklo_epi64(lo01, lo23), _mm256_unpackhi_epi64(lo01, lo23),
                        _mm256_unpacklo_epi64(hi01, hi23), _mm256_unpackhi_epi64(hi01, hi23)};
  const __m256i nib = _mm256_set1_epi8(0x0f);
  for (int q = 0; q < 4; ++q) {
    v[q] = _mm256_and_si256(d[q], nib);
    v[q + 4] = _mm256_and_si256(_mm256_srli_epi16(d[q], 4), nib);
  }
}
// Lane l of tile_codes8's vectors holds column lane_columns()[l]; column c sits in lane column_lanes()[c]. (Functions,
// not namespace constants: a static initializer with AVX2 instructions would run on CPUs without AVX2.)
inline __m256i lane_columns() { return _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7); }
inline __m256i column_lanes() { return _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); }

// Software prefetch distance in bytes of the packed codes stream (as sqmm_avx512.cc's, 256 groups of 16 bytes).
constexpr int64_t kPrefetchBytes = 4096;

// int8 activations, block 32, column tiles of a multiple of 8 columns, 8 columns at a time. A tile-group's codes
// are unpacked once and serve every row (kRows at a time), transposed so that each lane of v[q] holds one column's
// codes of rows 4q..4q+3 (tile_codes8): against the broadcast activations of those rows, maddubs leaves each
// column's partial dot products in its own lane, so one vector holds the 8 columns' dot products with no horizontal
// sums (int16 sums of 8 maddubs stay under 8 * 2 * 15 * 127 = 30480), and a row's 8 columns accumulate in one float
// vector.
template <class ScaleT, class IndexT>
void int8_block32_tile8(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  const IndexT* idx = static_cast<const IndexT*>(p.group_index);
  const int64_t T = p.tile, nb = p.n_blocks;
  const __m256i ones = _mm256_set1_epi16(1);
  constexpr int64_t kRows = 64;
  alignas(32) float acc[kRows * 8];
  for (int64_t t0 = n0; t0 < n1; t0 += T) {
    const int64_t j0 = p.group_ptr[t0 / T], j1 = p.group_ptr[t0 / T + 1];
    for (int64_t c0 = 0; c0 < T && t0 + c0 < n1; c0 += 8) {
      const int64_t cols = std::min<int64_t>(8, n1 - (t0 + c0));
      for (int64_t m0 = 0; m0 < p.M; m0 += kRows) {
        const int64_t rows = std::min<int64_t>(kRows, p.M - m0);
        for (int64_t r = 0; r < rows; ++r) _mm256_store_ps(acc + r * 8, _mm256_setzero_ps());
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t b = idx[j], s = j * T + c0;
          __m256i v[8];
          const uint8_t* w = p.packed + s * 16;
          _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchBytes), _MM_HINT_T0);  // the two lines of a
          _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchBytes + 64), _MM_HINT_T0);  // later tile-group
          tile_codes8(w, v);
          const __m256 sw = _mm256_permutevar8x32_ps(load_scales8<ScaleT>(p, s), lane_columns());  // lane order
          const __m256 swz = _mm256_mul_ps(sw, _mm256_permutevar8x32_ps(zero_points8(p.zero_points, s), lane_columns()));
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t m = m0 + r;
            const int32_t* x = reinterpret_cast<const int32_t*>(a.aq + m * p.Kp + b * 32);
            auto part = [&](int q) { return _mm256_maddubs_epi16(v[q], _mm256_set1_epi32(x[q])); };
            const __m256i s16 = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(part(0), part(1)), _mm256_add_epi16(part(2), part(3))),
                                                 _mm256_add_epi16(_mm256_add_epi16(part(4), part(5)), _mm256_add_epi16(part(6), part(7))));
            const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
            // sw * (sa * dot(u, q) - z * acorr)
            __m256 acc8 = _mm256_fmadd_ps(d, _mm256_mul_ps(sw, _mm256_set1_ps(a.ascale[m * nb + b])), _mm256_load_ps(acc + r * 8));
            acc8 = _mm256_fnmadd_ps(swz, _mm256_set1_ps(a.acorr[m * nb + b]), acc8);
            _mm256_store_ps(acc + r * 8, acc8);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {  // back to column order
          float* y = p.Y + (m0 + r) * p.N + t0 + c0;
          const __m256 out = _mm256_permutevar8x32_ps(_mm256_load_ps(acc + r * 8), column_lanes());
          if (cols == 8) {
            _mm256_storeu_ps(y, out);
          } else {
            alignas(32) float tmp[8];
            _mm256_store_ps(tmp, out);
            for (int64_t c = 0; c < cols; ++c) y[c] = tmp[c];
          }
        }
      }
    }
  }
}

template <class ScaleT, class IndexT>
void fp32_cols(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  const IndexT* idx = static_cast<const IndexT*>(p.group_index);
  const int64_t B = p.block, half = B / 2, chunks = half / 8;
  const __m128i nib = _mm_set1_epi8(0x0f);
  for (int64_t n = n0; n < n1; ++n) {
    const ColumnGroups cg = column_groups(p, n);
    for (int64_t m = 0; m < p.M; ++m) {
      const float* arow = a.af + m * p.Kp;
      const float* crow = a.acorr + m * p.n_blocks;
      __m256 facc = _mm256_setzero_ps();
      float corr = 0.f;
      for (int64_t j = cg.j0; j < cg.j1; ++j) {
        const int64_t b = idx[j], g = cg.slot(j);
        const float* x = arow + b * B;
        const uint8_t* w = p.packed + g * half;
        __m256 t = _mm256_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) {
          const __m128i pk = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c * 8));
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(pk, nib)));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(pk, 4), nib)));
          t = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + c * 8), t);
          t = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + half + c * 8), t);
        }
        const float sw = load_scale1<ScaleT>(p, g);
        facc = _mm256_fmadd_ps(t, _mm256_set1_ps(sw), facc);
        corr += sw * zero_point1(p.zero_points, g) * crow[b];
      }
      p.Y[m * p.N + n] = hsum256(facc) - corr;
    }
  }
}

template <class ScaleT, class IndexT>
void columns_typed(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  if (p.block % 32 != 0) return columns_scalar(p, a, n0, n1);
  if (p.accuracy_level == 4) {
    if (p.block == 32 && p.tile % 8 == 0) return int8_block32_tile8<ScaleT, IndexT>(p, a, n0, n1);
    return int8_cols<ScaleT, IndexT>(p, a, n0, n1);
  }
  fp32_cols<ScaleT, IndexT>(p, a, n0, n1);
}

}  // namespace

void columns_avx2(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  with_storage_types(p, [&](auto scale, auto index) { columns_typed<decltype(scale), decltype(index)>(p, a, n0, n1); });
}

namespace {

// 8 floats from x, of which `avail` exist (zeros past them).
inline __m256 load8(const float* x, int64_t avail) {
  if (avail >= 8) return _mm256_loadu_ps(x);
  if (avail <= 0) return _mm256_setzero_ps();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(x, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(avail)), lane));
}

}  // namespace

// Level 4, blocks a multiple of 32: each block's int8 codes as prepare_rows_scalar computes them (the same float
// products, rounded to nearest even), 32 at a time. At 128 rows the scalar loop cost more than the products.
void prepare_rows_avx2(const Problem& p, int8_t* aq, float* af, float* ascale, float* acorr, int64_t m0, int64_t m1) {
  const int64_t B = p.block, nb = p.n_blocks;
  if (p.accuracy_level != 4 || B % 32 != 0) return prepare_rows_scalar(p, aq, af, ascale, acorr, m0, m1);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = p.A + m * p.K;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * B, len = std::min<int64_t>(B, p.K - k0);
      __m256 vmax = _mm256_setzero_ps();
      for (int64_t k = 0; k < len; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(load8(x + k0 + k, len - k), absmask));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
      const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      int8_t* q = aq + m * p.Kp + k0;
      __m256i vsum = _mm256_setzero_si256();
      for (int64_t k = 0; k < B; k += 32) {
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + k0 + k, len - k), inv));
        const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + k0 + k + 8, len - k - 8), inv));
        const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + k0 + k + 16, len - k - 16), inv));
        const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + k0 + k + 24, len - k - 24), inv));
        vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permutevar8x32_epi32(bytes, order));
      }
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(vsum), _mm256_extracti128_si256(vsum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
      const float sa = amax / 127.f;
      ascale[m * nb + b] = sa;
      acorr[m * nb + b] = sa * static_cast<float>(_mm_cvtsi128_si32(s4));
    }
  }
}

}  // namespace msops
