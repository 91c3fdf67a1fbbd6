// GEGLU's gating, value * gelu(gate) with exact (erf) GELU, forward and backward, fp32, parallel over rows.
// Built with -ffast-math so that erff/expf vectorise through glibc's libmvec (MindSpore 2.10's CPU Erf is slow
// and runs on one core). One pass over the projection replaces the split, erf and products.
#include <cmath>

#include "common.h"

namespace {
constexpr float kSqrtHalf = 0.70710678118654752f;    // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)

// body(row, width, value, gate) for each row of a (..., 2 * width) projection [value, gate], in parallel
template <typename Body>
void for_each_row(int ndim, const int64_t* shape, const float* projection, Body body) {
  const int64_t width = shape[ndim - 1] / 2;
  const int64_t rows = mindbooth::element_count(ndim, shape) / (2 * width);
  mindbooth::parallel_for(rows, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) body(r, width, projection + r * 2 * width, projection + r * 2 * width + width);
  });
}
}  // namespace

// input projection (..., 2F) = [value, gate]; output (..., F) = value * gelu(gate)
MINDBOOTH_KERNEL(GatedGeluForward) {
  if (nparam != 2 || !mindbooth::all_float32(nparam, dtypes) || ndims[0] < 1) return 1;
  float* y = mindbooth::output(params, 1);
  for_each_row(ndims[0], shapes[0], mindbooth::input(params, 0), [&](int64_t r, int64_t width, const float* value,
                                                                     const float* gate) {
    float* yr = y + r * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) yr[i] = value[i] * (0.5f * gate[i] * (1.0f + erff(gate[i] * kSqrtHalf)));
  });
  return 0;
}

// inputs projection (..., 2F), dy (..., F); output d projection (..., 2F) = [dy * gelu(gate), dy * value * gelu'(gate)]
MINDBOOTH_KERNEL(GatedGeluBackward) {
  if (nparam != 3 || !mindbooth::all_float32(nparam, dtypes) || ndims[0] < 1) return 1;
  const float* dy = mindbooth::input(params, 1);
  float* dprojection = mindbooth::output(params, 2);
  for_each_row(ndims[0], shapes[0], mindbooth::input(params, 0), [&](int64_t r, int64_t width, const float* value,
                                                                     const float* gate) {
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
  });
  return 0;
}
