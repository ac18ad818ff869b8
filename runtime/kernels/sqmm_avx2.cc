// AVX2 + FMA + F16C SparseQuantMatMul for CPUs without AVX-512 VNNI. int8 activations use
// maddubs (u8 codes x s8 activations, no saturation: 2 * 15 * 127 < 32767) then madd to int32.
// Block sizes that are multiples of 32; others use the scalar code.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "sqmm.h"
#include "sqmm_tile8.h"
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

// Column c's dot products over a group for 8 columns: madd(maddubs) per 4 rows (x[q]: rows 4q..4q+3's activations
// in every lane), the int16 sums of 8 maddubs stay under 8 * 2 * 15 * 127 = 30480. As steps (sqmm_tile8.h's one-row
// path): int16 sums, made int32 by finish.
struct DotMaddubs {
  static constexpr bool kRelaidRow = false;  // one row: sqmm_tile8.h's steps, a sub-block at a time
  static __m256i zero() { return _mm256_setzero_si256(); }
  static __m256i step(__m256i s, __m256i u, __m256i x) { return _mm256_add_epi16(s, _mm256_maddubs_epi16(u, x)); }
  static __m256i finish(__m256i s) { return _mm256_madd_epi16(s, _mm256_set1_epi16(1)); }
  static __m256i dot(const __m256i v[8], const __m256i x[8]) {
    auto part = [&](int q) { return _mm256_maddubs_epi16(v[q], x[q]); };
    const __m256i s16 = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(part(0), part(1)), _mm256_add_epi16(part(2), part(3))),
                                         _mm256_add_epi16(_mm256_add_epi16(part(4), part(5)), _mm256_add_epi16(part(6), part(7))));
    return finish(s16);
  }
};

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
    if (tile8_computes(p)) return int8_block32_tile8<ScaleT, IndexT, DotMaddubs>(p, a, n0, n1);
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
