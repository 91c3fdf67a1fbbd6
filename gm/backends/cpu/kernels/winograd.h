// The 3x3, stride-1, padding-1 convolution by Winograd's F(4x4, 3x3) (winograd.cc).
#pragma once
#include <cstdint>

namespace mindbooth {

// Whether winograd_conv3x3 computes this convolution: a 3x3 kernel, padding 1, channel counts multiples of 8.
bool winograd_applies(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t padding);

// y (batch, out, H, W) = x (batch, in, H, W) convolved with weight (out, in, 3, 3), padding 1; the weight in fp32, or
// in fp16 where `weight_float16`; `transposed`: the weight is (in, out, 3, 3) and y is the input gradient of the
// convolution by it (x: its output gradient). False where memory or oneDNN's sgemm failed.
bool winograd_conv3x3(const float* x, const void* weight, bool weight_float16, bool transposed, int64_t batch,
                      int64_t in_channels, int64_t out_channels, int64_t height, int64_t width, float* y);

}  // namespace mindbooth
