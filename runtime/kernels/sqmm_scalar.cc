// Portable reference implementation of SparseQuantMatMul (any CPU, any block size >= 2).
#include <cmath>
#include <cstring>
#include <vector>

#include "sqmm.h"

namespace msops {

float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace {

template <class ScaleT, class IndexT>
void columns_impl(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  const int64_t half = p.block / 2, nb = p.n_blocks;
  const IndexT* idx = static_cast<const IndexT*>(p.group_index);
  for (int64_t n = n0; n < n1; ++n) {
    const ColumnGroups cg = column_groups(p, n);
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f, corr = 0.f;
      for (int64_t j = cg.j0; j < cg.j1; ++j) {
        const int64_t b = static_cast<int64_t>(idx[j]), g = cg.slot(j);
        const float sw = load_scale<ScaleT>(p, g, half_to_float);
        const float z = 8.f + (p.zero_points ? static_cast<float>(p.zero_points[g]) : 0.f);
        const uint8_t* w = p.packed + g * half;
        if (p.accuracy_level == 4) {
          const int8_t* x = a.aq + m * p.Kp + b * p.block;
          int32_t d = 0;
          for (int64_t j = 0; j < half; ++j) d += (w[j] & 15) * x[j] + (w[j] >> 4) * x[j + half];
          acc += sw * a.ascale[m * nb + b] * static_cast<float>(d);
        } else {
          const float* x = a.af + m * p.Kp + b * p.block;
          float d = 0.f;
          for (int64_t j = 0; j < half; ++j) d += static_cast<float>(w[j] & 15) * x[j] + static_cast<float>(w[j] >> 4) * x[j + half];
          acc += sw * d;
        }
        corr += sw * z * a.acorr[m * nb + b];
      }
      p.Y[m * p.N + n] = acc - corr;
    }
  }
}

}  // namespace

void prepare_rows_scalar(const Problem& p, int8_t* aq, float* af, float* ascale, float* acorr, int64_t m0, int64_t m1) {
  const int64_t B = p.block, nb = p.n_blocks;
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = p.A + m * p.K;
    if (af) {  // fp32 copy padded with zeros to Kp
      std::memcpy(af + m * p.Kp, x, sizeof(float) * p.K);
      std::memset(af + m * p.Kp + p.K, 0, sizeof(float) * (p.Kp - p.K));
    }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * B, k1 = k0 + B < p.K ? k0 + B : p.K;
      if (p.accuracy_level == 4) {
        float amax = 0.f;
        for (int64_t k = k0; k < k1; ++k) amax = std::fmax(amax, std::fabs(x[k]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        int8_t* q = aq + m * p.Kp + k0;
        int32_t s = 0;
        for (int64_t k = k0; k < k1; ++k) {
          const int32_t v = static_cast<int32_t>(std::nearbyint(x[k] * inv));
          q[k - k0] = static_cast<int8_t>(v);
          s += v;
        }
        for (int64_t k = k1; k < k0 + B; ++k) q[k - k0] = 0;
        const float sa = amax / 127.f;
        ascale[m * nb + b] = sa;
        acorr[m * nb + b] = sa * static_cast<float>(s);
      } else {
        float s = 0.f;
        for (int64_t k = k0; k < k1; ++k) s += x[k];
        acorr[m * nb + b] = s;
      }
    }
  }
}

void tile_rows(const Problem& p, const int8_t* aq, const float* ascale, const float* acorr, int8_t* atile, float* stile,
               float* ctile, int64_t tiles) {
  const int64_t nb = p.n_blocks, quads = p.block / 4;
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      for (int64_t r = 0; r < kTileRows; ++r) {
        const int64_t m = t * kTileRows + r;
        const int64_t i = (t * nb + b) * kTileRows + r;
        stile[i] = m < p.M ? ascale[m * nb + b] : 0.f;
        ctile[i] = m < p.M ? acorr[m * nb + b] : 0.f;
        for (int64_t q = 0; q < quads; ++q) {
          int8_t* dst = atile + (((t * nb + b) * quads + q) * kTileRows + r) * 4;
          // stored as unsigned a + 128 (the u8 operand of vpdpbusd); padding rows are a = 0
          for (int j = 0; j < 4; ++j)
            dst[j] = static_cast<int8_t>((m < p.M ? static_cast<uint8_t>(aq[m * p.Kp + b * p.block + q * 4 + j]) : 0u) ^ 0x80u);
        }
      }
    }
}

void columns_scalar(const Problem& p, const Activations& a, int64_t n0, int64_t n1) {
  with_storage_types(p, [&](auto scale, auto index) { columns_impl<decltype(scale), decltype(index)>(p, a, n0, n1); });
}

void epilogue(const Problem& p, int64_t n0, int64_t n1) {
  if (p.R > 0) {
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.A + m * p.K;
      float* y = p.Y + m * p.N;
      for (int64_t n = n0; n < n1; ++n) {
        const uint16_t* rows = p.outlier_rows + n * p.R;
        const float* vals = p.outlier_values + n * p.R;
        // four independent sums: one chain of dependent adds would bound this loop by add latency
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        int64_t r = 0;
        for (; r + 4 <= p.R; r += 4)
          for (int i = 0; i < 4; ++i) acc[i] += x[rows[r + i]] * vals[r + i];
        for (; r < p.R; ++r) acc[r & 3] += x[rows[r]] * vals[r];
        y[n] += (acc[0] + acc[1]) + (acc[2] + acc[3]);
      }
    }
  }
  if (p.bias) {
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t n = n0; n < n1; ++n) p.Y[m * p.N + n] += p.bias[n];
  }
}

void transpose_codes8(const uint8_t* packed, int64_t slots, int64_t block, uint8_t* out) {
  const int64_t H = block / 32, half = block / 2;
  std::vector<uint8_t> u(static_cast<size_t>(block));
  uint8_t sub[16];
  for (int64_t s = 0; s < slots; ++s) {
    const uint8_t* w = packed + s * half;  // byte i = u[i] | u[half + i] << 4
    for (int64_t i = 0; i < half; ++i) {
      u[i] = w[i] & 15;
      u[half + i] = w[i] >> 4;
    }
    for (int64_t h = 0; h < H; ++h) {
      for (int i = 0; i < 16; ++i) sub[i] = static_cast<uint8_t>(u[32 * h + i] | u[32 * h + 16 + i] << 4);
      uint8_t* o = out + ((s / 8) * H + h) * 128 + (s % 8) * 4;
      for (int q = 0; q < 4; ++q) std::memcpy(o + q * 32, sub + q * 4, 4);
    }
  }
}

}  // namespace msops
