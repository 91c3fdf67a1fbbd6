// GEGLU's gating, value * gelu(gate) with exact (erf) GELU, forward and backward, fp32, parallel over rows.
// Built with -ffast-math so that erff/expf vectorise through glibc's libmvec (MindSpore 2.10's CPU Erf runs
// 6.5x slower than torch's, on one core). One pass over the projection replaces the split, erf and products.
#include <cmath>

#include "common.h"

using mindbooth::element_count;
using mindbooth::parallel_for;

namespace {
constexpr float kSqrtHalf = 0.70710678118654752f;    // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)
}  // namespace

// input projection (..., 2F) = [value, gate]; output (..., F) = value * gelu(gate)
MINDBOOTH_KERNEL(GatedGeluForward) {
  if (nparam != 2 || !mindbooth::all_float32(nparam, dtypes) || ndims[0] < 1) return 1;
  const float* projection = static_cast<const float*>(params[0]);
  float* y = static_cast<float*>(params[1]);
  const int64_t width = shapes[0][ndims[0] - 1] / 2;
  const int64_t rows = element_count(ndims[0], shapes[0]) / (2 * width);
  parallel_for(rows, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const float* value = projection + r * 2 * width;
      const float* gate = value + width;
      float* yr = y + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) yr[i] = value[i] * (0.5f * gate[i] * (1.0f + erff(gate[i] * kSqrtHalf)));
    }
  });
  return 0;
}

// inputs projection (..., 2F), dy (..., F); output d projection (..., 2F) = [dy * gelu(gate), dy * value * gelu'(gate)]
MINDBOOTH_KERNEL(GatedGeluBackward) {
  if (nparam != 3 || !mindbooth::all_float32(nparam, dtypes) || ndims[0] < 1) return 1;
  const float* projection = static_cast<const float*>(params[0]);
  const float* dy = static_cast<const float*>(params[1]);
  float* dprojection = static_cast<float*>(params[2]);
  const int64_t width = shapes[0][ndims[0] - 1] / 2;
  const int64_t rows = element_count(ndims[0], shapes[0]) / (2 * width);
  parallel_for(rows, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const float* value = projection + r * 2 * width;
      const float* gate = value + width;
      const float* dyr = dy + r * width;
      float* dvalue = dprojection + r * 2 * width;
      float* dgate = dvalue + width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float cdf = 0.5f * (1.0f + erff(gate[i] * kSqrtHalf));
        const float pdf = expf(-0.5f * gate[i] * gate[i]) * kInvSqrt2Pi;
        dvalue[i] = dyr[i] * gate[i] * cdf;
        dgate[i] = dyr[i] * value[i] * (cdf + gate[i] * pdf);
      }
    }
  });
  return 0;
}
