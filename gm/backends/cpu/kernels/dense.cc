// The frozen Dense layer's product, y = x W^T (+ b), and its input gradient, dx = dy W, on oneDNN's sgemm, with the
// weight (and bias) read as stored in fp16. Before, every product of an fp16 weight was a cast kernel writing the fp32
// copy of the whole weight to memory and a MatMul reading it back, then a BiasAdd
// pass over the output. Here the weight is converted a block of output columns at a time into a per-thread buffer
// that the sgemm reads while it is still in the cache, and the bias is added to each chunk of rows as it is written.
// The column blocks go over the threads, each product on one thread (oneDNN's sgemm held to it, as in winograd.cc).
#include <oneapi/dnnl/dnnl.h>

#include <atomic>
#include <cstdio>
#include <limits>

#include "common.h"
#include "onednn_thread.h"

namespace {

// Blocks of at most 1024 columns, which stay in the last-level cache: the sgemm packs x again for every block, so
// narrower blocks made the deep products slower (docs/performance.md, "Frozen weights in fp16").
constexpr int64_t kMaxBlockColumns = 1024;
constexpr int64_t kChunkRows = 1024;  // rows per sgemm call: its output chunk gets its bias while in the cache

const uint16_t* halves(const void* data) { return static_cast<const uint16_t*>(data); }

struct Product {
  const float* a;      // (rows, depth): x, or dy for the input gradient
  const void* weight;  // (out, in) fp16
  const void* bias;    // (columns) fp16, or null
  int64_t rows, depth, columns;  // the output is (rows, columns)
  bool input_gradient;           // dx = dy W (columns = in, depth = out); else y = x W^T (columns = out, depth = in)
  float* out;
};

// Output columns [c0, c1): the weight's block converted to fp32 into `block`, then the sgemm over chunks of rows,
// each followed by its bias.
bool multiply_block(const Product& p, int64_t c0, int64_t c1, float* block, float* bias) {
  const int64_t width = c1 - c0;
  if (!p.input_gradient)  // W's rows c0..c1, contiguous: block (width, depth)
    mindbooth::float16_to_float32_serial(halves(p.weight) + c0 * p.depth, width * p.depth, block);
  else  // W's columns c0..c1, a piece of each row: block (depth, width)
    for (int64_t r = 0; r < p.depth; ++r)
      mindbooth::float16_to_float32_serial(halves(p.weight) + r * p.columns + c0, width, block + r * width);
  if (p.bias) mindbooth::float16_to_float32_serial(halves(p.bias) + c0, width, bias);
  for (int64_t r0 = 0; r0 < p.rows; r0 += kChunkRows) {
    const int64_t count = std::min(kChunkRows, p.rows - r0);
    float* out = p.out + r0 * p.columns + c0;
    if (dnnl_sgemm('N', p.input_gradient ? 'N' : 'T', count, width, p.depth, 1.0f, p.a + r0 * p.depth, p.depth, block,
                   p.input_gradient ? width : p.depth, 0.0f, out, p.columns) != dnnl_success)
      return false;
    if (!p.bias) continue;
    for (int64_t r = 0; r < count; ++r) {
      float* row = out + r * p.columns;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) row[c] += bias[c];
    }
  }
  return true;
}

bool multiply(const Product& p) {
  // blocks of at most kMaxBlockColumns, a whole number per thread, widths a multiple of 8 (one vector)
  const int64_t threads = mindbooth::thread_count(std::numeric_limits<int>::max());
  const int64_t per_thread = std::max<int64_t>(1, (p.columns + threads * kMaxBlockColumns - 1) / (threads * kMaxBlockColumns));
  const int64_t width = ((p.columns + threads * per_thread - 1) / (threads * per_thread) + 7) / 8 * 8;
  const int64_t blocks = (p.columns + width - 1) / width;
  std::atomic<bool> failed{false};
  mindbooth::parallel_for(blocks, [&](int64_t begin, int64_t end, int) {
    const mindbooth::SgemmOnThisThread one_thread;
    const mindbooth::ScratchFloats buffer(width * p.depth), bias(p.bias ? width : 0);
    if (!buffer || !bias) {
      failed = true;
      return;
    }
    for (int64_t b = begin; b < end && !failed; ++b)
      if (!multiply_block(p, b * width, std::min(p.columns, (b + 1) * width), buffer.get(), bias.get())) failed = true;
  });
  return !failed;
}

// the weight (1) and the bias (2, forward) fp16, the rest fp32
bool valid_dtypes(int nparam, const char** dtypes) {
  for (int i = 0; i < nparam; ++i)
    if (!((i == 1 || i == 2) && i < nparam - 1 ? mindbooth::is_float16(dtypes[i]) : mindbooth::is_float32(dtypes[i]))) return false;
  return true;
}

}  // namespace

// x (M, in) fp32, weight (out, in) fp16[, bias (out) fp16] -> y (M, out) = x W^T (+ b)
MINDBOOTH_KERNEL(DenseForward) {
  if ((nparam != 3 && nparam != 4) || !valid_dtypes(nparam, dtypes) || ndims[0] != 2 || ndims[1] != 2 ||
      shapes[0][1] != shapes[1][1] || (nparam == 4 && (ndims[2] != 1 || shapes[2][0] != shapes[1][0])))
    return 1;
  const bool has_bias = nparam == 4;
  const Product product{mindbooth::input(params, 0), params[1], has_bias ? params[2] : nullptr, shapes[0][0],
                        shapes[0][1], shapes[1][0], false, mindbooth::output(params, nparam - 1)};
  if (multiply(product)) return 0;
  std::fprintf(stderr, "MindBooth DenseForward: oneDNN sgemm failed or out of memory\n");
  return 1;
}

// dy (M, out) fp32, weight (out, in) fp16 -> dx (M, in) = dy W: the input gradient (the weight is frozen)
MINDBOOTH_KERNEL(DenseBackwardData) {
  if (nparam != 3 || !valid_dtypes(nparam, dtypes) || ndims[0] != 2 || ndims[1] != 2 || shapes[0][1] != shapes[1][0])
    return 1;
  const Product product{mindbooth::input(params, 0), params[1], nullptr, shapes[0][0], shapes[1][0], shapes[1][1], true,
                        mindbooth::output(params, 2)};
  if (multiply(product)) return 0;
  std::fprintf(stderr, "MindBooth DenseBackwardData: oneDNN sgemm failed or out of memory\n");
  return 1;
}
