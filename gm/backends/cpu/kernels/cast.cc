// fp16 -> fp32 cast of frozen weights before their MatMul, with F16C, parallel over 8-value vectors. MindSpore 2.10's CPU Cast runs
// on one core at 1.4x torch's time; the step casts every frozen weight twice (forward and backward).
#include <immintrin.h>

#include "common.h"

// input (...) float16, after (any, not read); output (...) float32.
// `after` only orders the cast after the tensor it is for (the layer's input, or in the backward its incoming
// gradient), so that the fp32 copy exists only while it is used. An ops.depend on the weight instead made MindSpore
// load the parameter twice (forward and backward) and then copy it before each load's use (TensorMove).
MINDBOOTH_KERNEL(CastFloat16ToFloat32) {
  if (nparam != 3 || !mindbooth::is_float16(dtypes[0]) || !mindbooth::is_float32(dtypes[2])) return 1;
  mindbooth::float16_to_float32(static_cast<const uint16_t*>(params[0]), mindbooth::element_count(ndims[0], shapes[0]),
                                static_cast<float*>(params[2]));
  return 0;
}

void mindbooth::float16_to_float32(const uint16_t* x, int64_t count, float* y) {
  const int64_t vectors = count / 8;
  mindbooth::parallel_for(vectors, [&](int64_t begin, int64_t end, int) {
    float16_to_float32_serial(x + 8 * begin, 8 * (end - begin), y + 8 * begin);
  });
  float16_to_float32_serial(x + 8 * vectors, count - 8 * vectors, y + 8 * vectors);  // the last < 8 values
}

void mindbooth::float16_to_float32_serial(const uint16_t* x, int64_t count, float* y) {
  const int64_t vectors = count / 8;
  for (int64_t v = 0; v < vectors; ++v) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * v));
    _mm256_storeu_ps(y + 8 * v, _mm256_cvtph_ps(half));
  }
  for (int64_t i = 8 * vectors; i < count; ++i) y[i] = _cvtsh_ss(x[i]);
}
