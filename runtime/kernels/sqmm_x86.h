// Scalar helpers shared by the x86 SIMD paths (sqmm_avx2.cc, sqmm_avx512.cc; both compiled with F16C).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "sqmm.h"

namespace msops {
namespace {

// One group's scale as float (sqmm.h's load_scale with the F16C conversion).
template <class ScaleT> inline float load_scale1(const Problem& p, int64_t g) {
  return load_scale<ScaleT>(p, g, [](uint16_t h) { return _cvtsh_ss(h); });
}

}  // namespace
}  // namespace msops
