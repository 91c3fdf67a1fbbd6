// SiLU, x * sigmoid(x), and its input gradient dy * s * (1 + x (1 - s)), fp32, element-wise in parallel.
// Built with -ffast-math so that expf vectorises through libmvec. MindSpore's path is a Sigmoid and a Mul forward
// and five element-wise ops backward, each a full pass over the ResBlocks' feature maps.
#include <cmath>

#include "common.h"

namespace {
// body(begin, end) over the elements of an fp32 tensor, in chunks of whole 64-byte lines
template <typename Body>
void for_each_chunk(int64_t count, Body body) {
  constexpr int64_t kChunk = 16384;
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  mindbooth::parallel_for(chunks, [&](int64_t first, int64_t last, int) {
    body(first * kChunk, std::min(count, last * kChunk));
  });
}
}  // namespace

MINDBOOTH_KERNEL(SiluForward) {
  if (nparam != 2 || !mindbooth::all_float32(nparam, dtypes)) return 1;
  const float* x = mindbooth::input(params, 0);
  float* y = mindbooth::output(params, 1);
  for_each_chunk(mindbooth::element_count(ndims[0], shapes[0]), [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) y[i] = x[i] / (1.0f + expf(-x[i]));
  });
  return 0;
}

// inputs x, dy; output dx
MINDBOOTH_KERNEL(SiluBackward) {
  if (nparam != 3 || !mindbooth::all_float32(nparam, dtypes)) return 1;
  const float* x = mindbooth::input(params, 0);
  const float* dy = mindbooth::input(params, 1);
  float* dx = mindbooth::output(params, 2);
  for_each_chunk(mindbooth::element_count(ndims[0], shapes[0]), [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float sigmoid = 1.0f / (1.0f + expf(-x[i]));
      dx[i] = dy[i] * sigmoid * (1.0f + x[i] * (1.0f - sigmoid));
    }
  });
  return 0;
}
