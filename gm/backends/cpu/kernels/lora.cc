// A LoRA branch, y = scale * (x A^T) B^T, forward and backward, fp32, on oneDNN's sgemm. The point is the backward:
// one kernel writes the input gradient and both weight gradients, so the weight gradients run when the layer's
// backward does. As separate MatMuls, MindSpore's execution order put the weight gradients at the end of the
// backward pass, and every layer's output gradient (attention's dq/dk/dv) and input (the norm and attention outputs
// recomputed under gradient checkpointing) stayed alive until then: the peak of the 1024 train step.
// Rows go over the threads in contiguous chunks; each thread sums its chunk's weight gradients into its own buffer,
// and the buffers are added at the end (rank is small: the buffers are (out + in) x rank floats per thread).
#include <oneapi/dnnl/dnnl.h>

#include <atomic>
#include <cstdio>

#include "common.h"
#include "onednn_thread.h"

namespace {

struct Shapes {
  int64_t rows, in, out, rank;
};

// x (M, in), A (rank, in), B (out, rank), config [scale]: all fp32, 2-D, and agreeing
bool shapes_of(int nparam, int* ndims, int64_t** shapes, const char** dtypes, int inputs, Shapes* s) {
  if (!mindbooth::all_float32(nparam, dtypes) || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return false;
  *s = {shapes[0][0], shapes[0][1], shapes[2][0], shapes[1][0]};
  if (shapes[1][1] != s->in || shapes[2][1] != s->rank) return false;
  // the backward's dout (M, out)
  return inputs == 4 || (ndims[3] == 2 && shapes[3][0] == s->rows && shapes[3][1] == s->out);
}

bool gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  return dnnl_sgemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) == dnnl_success;
}

// Row chunks: enough of them for every thread, at least 64 rows each
int64_t chunk_count(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(mindbooth::thread_count(rows), rows / 64)); }

}  // namespace

// x (M, in), A (rank, in), B (out, rank), config [scale] -> y (M, out) = scale * (x A^T) B^T
MINDBOOTH_KERNEL(LoRAForward) {
  Shapes s;
  if (nparam != 5 || !shapes_of(nparam, ndims, shapes, dtypes, 4, &s)) return 1;
  const float *x = mindbooth::input(params, 0), *A = mindbooth::input(params, 1), *B = mindbooth::input(params, 2);
  const float scale = mindbooth::input(params, 3)[0];
  float* y = mindbooth::output(params, 4);
  const int64_t chunks = chunk_count(s.rows), per_chunk = (s.rows + chunks - 1) / chunks;
  std::atomic<bool> failed{false};
  mindbooth::parallel_for(chunks, [&](int64_t begin, int64_t end, int) {
    const mindbooth::SgemmOnThisThread one_thread;
    const mindbooth::ScratchFloats h(per_chunk * s.rank);  // x A^T of the chunk
    if (!h) {
      failed = true;
      return;
    }
    for (int64_t c = begin; c < end && !failed; ++c) {
      const int64_t r0 = c * per_chunk, rows = std::min(s.rows, r0 + per_chunk) - r0;
      if (rows <= 0) continue;
      if (!gemm('N', 'T', rows, s.rank, s.in, 1.0f, x + r0 * s.in, s.in, A, s.in, 0.0f, h.get(), s.rank) ||
          !gemm('N', 'T', rows, s.out, s.rank, scale, h.get(), s.rank, B, s.rank, 0.0f, y + r0 * s.out, s.out))
        failed = true;
    }
  });
  if (!failed) return 0;
  std::fprintf(stderr, "MindBooth LoRAForward: oneDNN sgemm failed or out of memory\n");
  return 1;
}

// x (M, in), A (rank, in), B (out, rank), dout (M, out), config [scale] -> dx (M, in), dA (rank, in), dB (out, rank):
// with h = x A^T and dh = scale * dout B: dx = dh A, dA = dh^T x, dB = scale * dout^T h
MINDBOOTH_KERNEL(LoRABackward) {
  Shapes s;
  if (nparam != 8 || !shapes_of(nparam, ndims, shapes, dtypes, 5, &s)) return 1;
  const float *x = mindbooth::input(params, 0), *A = mindbooth::input(params, 1), *B = mindbooth::input(params, 2);
  const float* dout = mindbooth::input(params, 3);
  const float scale = mindbooth::input(params, 4)[0];
  float *dx = mindbooth::output(params, 5), *dA = mindbooth::output(params, 6), *dB = mindbooth::output(params, 7);
  const int64_t chunks = chunk_count(s.rows), per_chunk = (s.rows + chunks - 1) / chunks;
  const int64_t weights = s.rank * s.in + s.out * s.rank;  // one thread's dA then dB
  const mindbooth::ScratchFloats partial(chunks * weights);
  if (!partial) {
    std::fprintf(stderr, "MindBooth LoRABackward: out of memory\n");
    return 1;
  }
  std::atomic<bool> failed{false};
  mindbooth::parallel_for(chunks, [&](int64_t begin, int64_t end, int) {
    const mindbooth::SgemmOnThisThread one_thread;
    const mindbooth::ScratchFloats h(per_chunk * s.rank), dh(per_chunk * s.rank);
    if (!h || !dh) {
      failed = true;
      return;
    }
    for (int64_t c = begin; c < end && !failed; ++c) {
      const int64_t r0 = c * per_chunk, rows = std::min(s.rows, r0 + per_chunk) - r0;
      float* dA_part = partial.get() + c * weights;
      float* dB_part = dA_part + s.rank * s.in;
      if (rows <= 0) {
        std::fill(dA_part, dA_part + weights, 0.0f);
        continue;
      }
      const float *x_rows = x + r0 * s.in, *dout_rows = dout + r0 * s.out;
      if (!gemm('N', 'T', rows, s.rank, s.in, 1.0f, x_rows, s.in, A, s.in, 0.0f, h.get(), s.rank) ||
          !gemm('N', 'N', rows, s.rank, s.out, scale, dout_rows, s.out, B, s.rank, 0.0f, dh.get(), s.rank) ||
          !gemm('N', 'N', rows, s.in, s.rank, 1.0f, dh.get(), s.rank, A, s.in, 0.0f, dx + r0 * s.in, s.in) ||
          !gemm('T', 'N', s.rank, s.in, rows, 1.0f, dh.get(), s.rank, x_rows, s.in, 0.0f, dA_part, s.in) ||
          !gemm('T', 'N', s.out, s.rank, rows, scale, dout_rows, s.out, h.get(), s.rank, 0.0f, dB_part, s.rank))
        failed = true;
    }
  });
  if (failed) {
    std::fprintf(stderr, "MindBooth LoRABackward: oneDNN sgemm failed or out of memory\n");
    return 1;
  }
  // the chunks' weight gradients, added in chunk order (the same sum whatever the thread count's timing)
  std::copy(partial.get(), partial.get() + s.rank * s.in, dA);
  std::copy(partial.get() + s.rank * s.in, partial.get() + weights, dB);
  for (int64_t c = 1; c < chunks; ++c) {
    const float* part = partial.get() + c * weights;
    for (int64_t i = 0; i < s.rank * s.in; ++i) dA[i] += part[i];
    for (int64_t i = 0; i < s.out * s.rank; ++i) dB[i] += part[s.rank * s.in + i];
  }
  return 0;
}
