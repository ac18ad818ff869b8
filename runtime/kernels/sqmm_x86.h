// Scalar helpers shared by the x86 SIMD paths (sqmm_avx2.cc, sqmm_avx512.cc; both compiled with F16C).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "sqmm.h"

namespace msops {
namespace {

// One group's scale as float, for each storage type of Problem::scales (see with_storage_types).
template <class ScaleT> inline float load_scale1(const Problem& p, int64_t g);
template <> inline float load_scale1<float>(const Problem& p, int64_t g) { return static_cast<const float*>(p.scales)[g]; }
template <> inline float load_scale1<uint16_t>(const Problem& p, int64_t g) {
  return _cvtsh_ss(static_cast<const uint16_t*>(p.scales)[g]);
}
template <> inline float load_scale1<uint8_t>(const Problem& p, int64_t g) {
  return scale_from_code(static_cast<const uint8_t*>(p.scales)[g], p.scale_code_bias);
}

}  // namespace
}  // namespace msops
