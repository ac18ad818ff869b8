// The tile-of-8 kernel shared by the AVX2 and AVX-512 paths (int8 activations, block 32, column tiles of a multiple
// of 8 columns); each includes it and instantiates it with its own dot product. Everything here has internal linkage:
// the two translation units are compiled for different instruction sets, and neither may call the other's copy.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "sqmm.h"

namespace msops {
namespace {

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
// The same vectors from Problem::codes8, where the transposition was done once: lane l holds column l.
inline void relaid_codes8(const uint8_t* w, __m256i v[8]) {
  const __m256i nib = _mm256_set1_epi8(0x0f);
  for (int q = 0; q < 4; ++q) {
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * q));
    v[q] = _mm256_and_si256(d, nib);
    v[q + 4] = _mm256_and_si256(_mm256_srli_epi16(d, 4), nib);
  }
}

// Lane l of tile_codes8's vectors holds column lane_columns()[l]; column c sits in lane column_lanes()[c]. (Functions,
// not namespace constants: a static initializer with AVX2 instructions would run on CPUs without AVX2.)
inline __m256i lane_columns() { return _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7); }
inline __m256i column_lanes() { return _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); }

// Software prefetch distance in bytes of the packed codes stream (as sqmm_avx512.cc's, 256 groups of 16 bytes).
constexpr int64_t kPrefetchBytes = 4096;

// int8 activations, block 32 (or 32H with relaid codes: below), column tiles of a multiple of 8 columns, 8 columns at
// a time. A tile-group's codes are unpacked once and serve every row (kRows at a time), transposed so that each lane
// of v[q] holds one column's codes of rows 4q..4q+3 (tile_codes8, or relaid_codes8 when Problem::codes8 holds them
// transposed already, kRelaid): against the broadcast activations of those rows, maddubs leaves each column's partial
// dot products in its own lane (Dot::dot: maddubs on AVX2, vpdpbusd with AVX-512 VNNI), so one vector holds the 8
// columns' dot products with no horizontal sums, and a row's 8 columns accumulate in one float vector. Lanes are in
// lane_columns() order, or in column order with kRelaid. With kRelaid, one row reads its broadcast activations from
// Activations::abcast when it is given (Dot::relaid_row, where the ISA has one, takes the whole group at once).
template <class ScaleT, class IndexT, class Dot, bool kRelaid>
void int8_block32_tile8_impl(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  const IndexT* idx = static_cast<const IndexT*>(p.group_index);
  const int64_t T = p.tile, nb = p.n_blocks;
  constexpr int64_t kRows = 64;
  alignas(32) float acc[kRows * 8];
  // Lane order of the codes' columns, and back to column order.
  auto to_lanes = [](__m256 x) { return kRelaid ? x : _mm256_permutevar8x32_ps(x, lane_columns()); };
  auto to_columns = [](__m256 x) { return kRelaid ? x : _mm256_permutevar8x32_ps(x, column_lanes()); };
  for (int64_t t0 = n0; t0 < n1; t0 += T) {
    const int64_t j0 = p.group_ptr[t0 / T], j1 = p.group_ptr[t0 / T + 1];
    for (int64_t c0 = 0; c0 < T && t0 + c0 < n1; c0 += 8) {
      const int64_t cols = std::min<int64_t>(8, n1 - (t0 + c0));
      for (int64_t m0 = 0; m0 < p.M; m0 += kRows) {
        const int64_t rows = std::min<int64_t>(kRows, p.M - m0);
        // Tile-group j's codes (128 bytes, two lines, per 32-row sub-block), every line of a later tile-group
        // prefetched.
        auto codes = [&](int64_t j) {
          const uint8_t* w = (kRelaid ? p.codes8 : p.packed) + (j * T + c0) * (p.block / 2);
          for (int64_t line = 0; line < p.block / 16; ++line)
            _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchBytes + 64 * line), _MM_HINT_T0);
          return w;
        };
        // Tile-group j's scales in lane order: sw and sw * z.
        auto scales = [&](int64_t j, __m256& sw, __m256& swz) {
          sw = to_lanes(load_scales8<ScaleT>(p, j * T + c0));
          swz = _mm256_mul_ps(sw, to_lanes(zero_points8(p.zero_points, j * T + c0)));
        };
        // Tile-group j's codes (its first 32-row sub-block) and its scales.
        auto group = [&](int64_t j, __m256i v[8], __m256& sw, __m256& swz) {
          const uint8_t* w = codes(j);
          if constexpr (kRelaid) relaid_codes8(w, v);
          else tile_codes8(w, v);
          scales(j, sw, swz);
        };
        // acc plus row m's contribution of tile-group j (block b) to its 8 columns: sw * (sa * dot - z * acorr), dot
        // the int32 dot products of the 8 columns' codes with the row's activations over the block.
        auto scaled = [&](__m256 acc8, int64_t m, int64_t b, __m256i dot, __m256 sw, __m256 swz) {
          acc8 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sw, _mm256_set1_ps(a.ascale[m * nb + b])), acc8);
          return _mm256_fnmadd_ps(swz, _mm256_set1_ps(a.acorr[m * nb + b]), acc8);
        };
        // The same for a 32-row block, x[q] holding the row's activations 4q..4q+3 of the block in every lane.
        auto accumulate = [&](__m256 acc8, int64_t m, int64_t b, const __m256i v[8], const __m256i x[8], __m256 sw,
                              __m256 swz) { return scaled(acc8, m, b, Dot::dot(v, x), sw, swz); };
        // Row m's activations of 32-row sub-block h of block b, each 4 in every lane.
        auto broadcast = [&](int64_t m, int64_t b, __m256i x[8], int64_t h = 0) {
          const int32_t* x4 = reinterpret_cast<const int32_t*>(a.aq + m * p.Kp + b * p.block + 32 * h);
          for (int q = 0; q < 8; ++q) x[q] = _mm256_set1_epi32(x4[q]);
        };
        // One row: two register accumulators, no store-to-load chain through acc. With relaid codes and a.abcast
        // (the only one-row path for blocks above 32), each 32-byte load of codes is split into its two nibble
        // vectors and multiplied against the loaded activations at once (few live registers: 8 code and 8
        // activation vectors would not fit AVX2's 16); a block of 32H rows is H such sub-blocks, each summed to
        // int32 before the next (Dot's 16-bit sums hold one sub-block).
        auto one_row = [&](auto streamed) {
          constexpr bool kStreamed = decltype(streamed)::value;
          auto contribution = [&](int64_t j, __m256 acc8) {
            const int64_t b = idx[j];
            if constexpr (kStreamed) {
              const uint8_t* w = codes(j);
              const int64_t H = p.block / 32;
              const __m256i* xb = reinterpret_cast<const __m256i*>(a.abcast) + b * H * 8;  // one row: m0 = 0
              const __m256i nib = _mm256_set1_epi8(0x0f);
              auto sub_block = [&](int64_t h) {
                __m256i s = Dot::zero();
                for (int q = 0; q < 4; ++q) {
                  const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 128 * h + 32 * q));
                  s = Dot::step(s, _mm256_and_si256(d, nib), _mm256_load_si256(xb + 8 * h + q));
                  s = Dot::step(s, _mm256_and_si256(_mm256_srli_epi16(d, 4), nib), _mm256_load_si256(xb + 8 * h + q + 4));
                }
                return Dot::finish(s);
              };
              __m256i dot;
              if constexpr (Dot::kRelaidRow) {
                dot = Dot::relaid_row(w, xb, H);
              } else {
                dot = sub_block(0);
                for (int64_t h = 1; h < H; ++h) dot = _mm256_add_epi32(dot, sub_block(h));
              }
              const __m256 sw = load_scales8<ScaleT>(p, j * T + c0);
              // sw * (sa * dot - z * acorr)
              const __m256 t = _mm256_fmsub_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(a.ascale[m0 * nb + b]),
                                               _mm256_mul_ps(zero_points8(p.zero_points, j * T + c0), _mm256_set1_ps(a.acorr[m0 * nb + b])));
              return _mm256_fmadd_ps(sw, t, acc8);
            } else {
              __m256i v[8], x[8];
              __m256 sw, swz;
              group(j, v, sw, swz);
              broadcast(m0, b, x);
              return accumulate(acc8, m0, b, v, x, sw, swz);
            }
          };
          __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
          int64_t j = j0;
          for (; j + 2 <= j1; j += 2) {
            acc0 = contribution(j, acc0);
            acc1 = contribution(j + 1, acc1);
          }
          if (j < j1) acc0 = contribution(j, acc0);
          _mm256_store_ps(acc, _mm256_add_ps(acc0, acc1));
        };
        if (rows == 1 && (p.block == 32 || a.abcast)) {
          if constexpr (kRelaid) {
            if (a.abcast) one_row(std::true_type{});
            else one_row(std::false_type{});
          } else {
            one_row(std::false_type{});
          }
        } else if (p.block == 32) {
          for (int64_t r = 0; r < rows; ++r) _mm256_store_ps(acc + r * 8, _mm256_setzero_ps());
          for (int64_t j = j0; j < j1; ++j) {
            __m256i v[8];
            __m256 sw, swz;
            group(j, v, sw, swz);
            for (int64_t r = 0; r < rows; ++r) {
              __m256i x[8];
              broadcast(m0 + r, idx[j], x);
              _mm256_store_ps(acc + r * 8, accumulate(_mm256_load_ps(acc + r * 8), m0 + r, idx[j], v, x, sw, swz));
            }
          }
        } else if constexpr (kRelaid) {  // (tile8_computes: blocks above 32 only with relaid codes)
          // A block of 32H rows: each sub-block's codes serve every row (Dot's sums hold one sub-block), the rows'
          // int32 dot products summed in dots over the H sub-blocks before the group's scales apply.
          const int64_t H = p.block / 32;
          alignas(32) int32_t dots[kRows * 8];
          for (int64_t r = 0; r < rows; ++r) _mm256_store_ps(acc + r * 8, _mm256_setzero_ps());
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t b = idx[j];
            const uint8_t* w = codes(j);
            for (int64_t h = 0; h < H; ++h) {
              __m256i v[8];
              relaid_codes8(w + 128 * h, v);
              for (int64_t r = 0; r < rows; ++r) {
                __m256i x[8];
                broadcast(m0 + r, b, x, h);
                __m256i* d = reinterpret_cast<__m256i*>(dots + r * 8);
                const __m256i dot = Dot::dot(v, x);
                _mm256_store_si256(d, h ? _mm256_add_epi32(_mm256_load_si256(d), dot) : dot);
              }
            }
            __m256 sw, swz;
            scales(j, sw, swz);
            for (int64_t r = 0; r < rows; ++r)
              _mm256_store_ps(acc + r * 8, scaled(_mm256_load_ps(acc + r * 8), m0 + r, b,
                                                  _mm256_load_si256(reinterpret_cast<const __m256i*>(dots + r * 8)), sw, swz));
          }
        }
        for (int64_t r = 0; r < rows; ++r) {  // in column order
          float* y = p.Y + (m0 + r) * p.N + t0 + c0;
          const __m256 out = to_columns(_mm256_load_ps(acc + r * 8));
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

// Block 32, or any block of 32H rows with relaid codes (tile8_computes).
template <class ScaleT, class IndexT, class Dot>
void int8_block32_tile8(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  if (p.codes8) int8_block32_tile8_impl<ScaleT, IndexT, Dot, true>(p, a, n0, n1);
  else int8_block32_tile8_impl<ScaleT, IndexT, Dot, false>(p, a, n0, n1);
}

}  // namespace
}  // namespace msops
