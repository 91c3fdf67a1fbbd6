// Nearest-neighbour 2x upsampling of (N, C, H, W) fp32 and its input gradient (the sum over each 2x2 block).
// MindSpore's CPU ResizeNearestNeighborV2Grad is far slower than this memory-bound pass
// (docs/performance.md, "CPU backend and kernels").
#include "common.h"

using mindbooth::input;
using mindbooth::output;

MINDBOOTH_KERNEL(Upsample2xNearest) {
  if (nparam != 2 || !mindbooth::all_float32(nparam, dtypes) || ndims[0] != 4) return 1;
  const float* x = input(params, 0);
  float* y = output(params, 1);
  const int64_t planes = shapes[0][0] * shapes[0][1], height = shapes[0][2], width = shapes[0][3];
  mindbooth::parallel_for(planes * height, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {  // one input row -> two output rows
      const float* from = x + row * width;
      float* to = y + row * 4 * width;
      for (int64_t j = 0; j < width; ++j) to[2 * j] = to[2 * j + 1] = from[j];
      for (int64_t j = 0; j < 2 * width; ++j) to[2 * width + j] = to[j];
    }
  });
  return 0;
}

MINDBOOTH_KERNEL(Upsample2xNearestBackward) {
  if (nparam != 2 || !mindbooth::all_float32(nparam, dtypes) || ndims[0] != 4) return 1;
  const float* dy = input(params, 0);
  float* dx = output(params, 1);
  const int64_t planes = shapes[0][0] * shapes[0][1], height = shapes[0][2] / 2, width = shapes[0][3] / 2;
  mindbooth::parallel_for(planes * height, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {
      const float* top = dy + row * 4 * width;
      const float* bottom = top + 2 * width;
      float* to = dx + row * width;
      for (int64_t j = 0; j < width; ++j) to[j] = (top[2 * j] + top[2 * j + 1]) + (bottom[2 * j] + bottom[2 * j + 1]);
    }
  });
  return 0;
}
