// AVX2 + FMA + F16C SparseQuantMatMul for CPUs without AVX-512 VNNI. int8 activations use
// maddubs (u8 codes x s8 activations, no saturation: 2 * 15 * 127 < 32767) then madd to int32.
// Block sizes that are multiples of 32; others use the scalar code.
#include <immintrin.h>

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
  if (p.accuracy_level == 4) return int8_cols<ScaleT, IndexT>(p, a, n0, n1);
  fp32_cols<ScaleT, IndexT>(p, a, n0, n1);
}

}  // namespace

void columns_avx2(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  with_storage_types(p, [&](auto scale, auto index) { columns_typed<decltype(scale), decltype(index)>(p, a, n0, n1); });
}

void prepare_rows_avx2(const Problem& p, int8_t* aq, float* af, float* ascale, float* acorr, int64_t m0, int64_t m1) {
  // Activation preparation is a small part of the work; the scalar code vectorizes well enough.
  prepare_rows_scalar(p, aq, af, ascale, acorr, m0, m1);
}

}  // namespace msops
