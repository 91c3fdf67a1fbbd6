// Multi-head attention softmax(q k^T * scale) v, forward and backward, fp32, in one kernel each, on the
// projections' own layout (batch, tokens, heads * dim_head): no head split/merge transposes, no tokens^2 tensors
// between kernels. Each (sample, head) pair goes to one thread; its queries are done in blocks of kRows, whose
// scores (kRows x key tokens) stay in cache, with oneDNN's sgemm (the libdnnl.so.3 MindSpore ships) for the
// products. The backward recomputes the probabilities block by block, as flash attention does, and takes
// D = rowsum(P * dP) over the block's scores.
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_threadpool.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kRows = 64;

struct Layout {
  int64_t batch, queries, keys, heads, dim_head, channels;
  float scale;
};

// q (B, N, C), k and v (B, M, C) with C = heads * dim_head; config = [heads, scale]
bool layout(int* ndims, int64_t** shapes, const float* config, Layout* out) {
  if (ndims[0] != 3 || ndims[1] != 3 || ndims[2] != 3) return false;
  const int64_t heads = static_cast<int64_t>(config[0]), channels = shapes[0][2];
  if (heads <= 0 || channels % heads != 0 || shapes[1][2] != channels || shapes[2][2] != channels ||
      shapes[1][1] != shapes[2][1] || shapes[1][0] != shapes[0][0] || shapes[2][0] != shapes[0][0])
    return false;
  *out = {shapes[0][0], shapes[0][1], shapes[1][1], heads, channels / heads, channels, config[1]};
  return true;
}

// C (row-major) = alpha * op(A) op(B) + beta * C; single-threaded (the caller's thread is one of the workers)
bool gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  return dnnl_sgemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) == dnnl_success;
}

// Each row of scores (rows x keys) to its softmax, in place.
void softmax_rows(float* scores, int64_t rows, int64_t keys) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * keys;
    float largest = row[0];
    for (int64_t j = 1; j < keys; ++j) largest = std::max(largest, row[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < keys; ++j) {
      row[j] = std::exp(row[j] - largest);
      sum += row[j];
    }
    const float inverse = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < keys; ++j) row[j] *= inverse;
  }
}

// body(sample, head) for every pair, the pairs split over the threads; false if any body failed
template <typename Body>
bool for_each_head(const Layout& l, Body body) {
  std::vector<char> failed(static_cast<size_t>(mindbooth::thread_count(l.batch * l.heads)), 0);
  mindbooth::parallel_for(l.batch * l.heads, [&](int64_t begin, int64_t end, int thread) {
    // This thread's sgemm calls run on this thread only. The setting is per thread and chunk 0 runs on MindSpore's
    // calling thread, so it is put back: left at 1 there, the convolution kernel ran on one core afterwards.
    int previous = 0;
    const bool restore = dnnl_threadpool_interop_get_max_concurrency(&previous) == dnnl_success;
    dnnl_threadpool_interop_set_max_concurrency(1);
    for (int64_t pair = begin; pair < end; ++pair)
      if (!body(pair / l.heads, pair % l.heads)) failed[thread] = 1;
    if (restore) dnnl_threadpool_interop_set_max_concurrency(previous);
  });
  for (char f : failed)
    if (f) return false;
  return true;
}

}  // namespace

// q, k, v, config -> out (B, N, C)
MINDBOOTH_KERNEL(AttentionForward) {
  Layout l;
  if (nparam != 5 || !mindbooth::all_float32(nparam, dtypes) || !layout(ndims, shapes, mindbooth::input(params, 3), &l))
    return 1;
  const float *q = mindbooth::input(params, 0), *k = mindbooth::input(params, 1), *v = mindbooth::input(params, 2);
  float* out = mindbooth::output(params, 4);
  const int64_t C = l.channels, d = l.dim_head;
  const bool ok = for_each_head(l, [&](int64_t sample, int64_t head) {
    const float* q_head = q + sample * l.queries * C + head * d;
    const float* k_head = k + sample * l.keys * C + head * d;
    const float* v_head = v + sample * l.keys * C + head * d;
    float* out_head = out + sample * l.queries * C + head * d;
    std::vector<float> scores(kRows * l.keys);
    for (int64_t first = 0; first < l.queries; first += kRows) {
      const int64_t rows = std::min(kRows, l.queries - first);
      if (!gemm('N', 'T', rows, l.keys, d, l.scale, q_head + first * C, C, k_head, C, 0.0f, scores.data(), l.keys))
        return false;
      softmax_rows(scores.data(), rows, l.keys);
      if (!gemm('N', 'N', rows, d, l.keys, 1.0f, scores.data(), l.keys, v_head, C, 0.0f, out_head + first * C, C))
        return false;
    }
    return true;
  });
  if (!ok) std::fprintf(stderr, "MindBooth AttentionForward: oneDNN sgemm failed\n");
  return ok ? 0 : 1;
}

// q, k, v, dout, config -> dq (B, N, C), dk, dv (B, M, C)
MINDBOOTH_KERNEL(AttentionBackward) {
  Layout l;
  if (nparam != 8 || !mindbooth::all_float32(nparam, dtypes) || !layout(ndims, shapes, mindbooth::input(params, 4), &l))
    return 1;
  const float *q = mindbooth::input(params, 0), *k = mindbooth::input(params, 1), *v = mindbooth::input(params, 2);
  const float* dout = mindbooth::input(params, 3);
  float *dq = mindbooth::output(params, 5), *dk = mindbooth::output(params, 6), *dv = mindbooth::output(params, 7);
  const int64_t C = l.channels, d = l.dim_head;
  const bool ok = for_each_head(l, [&](int64_t sample, int64_t head) {
    const int64_t query_offset = sample * l.queries * C + head * d, key_offset = sample * l.keys * C + head * d;
    const float *q_head = q + query_offset, *dout_head = dout + query_offset;
    const float *k_head = k + key_offset, *v_head = v + key_offset;
    float *dq_head = dq + query_offset, *dk_head = dk + key_offset, *dv_head = dv + key_offset;
    std::vector<float> probabilities(kRows * l.keys), grad_scores(kRows * l.keys);
    for (int64_t first = 0; first < l.queries; first += kRows) {
      const int64_t rows = std::min(kRows, l.queries - first);
      const float accumulate = first == 0 ? 0.0f : 1.0f;  // dk, dv: the first block writes, later ones add
      const float *q_rows = q_head + first * C, *dout_rows = dout_head + first * C;
      float* P = probabilities.data();
      float* dS = grad_scores.data();
      if (!gemm('N', 'T', rows, l.keys, d, l.scale, q_rows, C, k_head, C, 0.0f, P, l.keys)) return false;
      softmax_rows(P, rows, l.keys);
      // dv += P^T dout; dP = dout v^T
      if (!gemm('T', 'N', l.keys, d, rows, 1.0f, P, l.keys, dout_rows, C, accumulate, dv_head, C)) return false;
      if (!gemm('N', 'T', rows, l.keys, d, 1.0f, dout_rows, C, v_head, C, 0.0f, dS, l.keys)) return false;
      // dS = P * (dP - rowsum(P * dP)): the softmax's Jacobian product
      for (int64_t r = 0; r < rows; ++r) {
        const float* p_row = P + r * l.keys;
        float* row = dS + r * l.keys;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < l.keys; ++j) dot += p_row[j] * row[j];
#pragma omp simd
        for (int64_t j = 0; j < l.keys; ++j) row[j] = p_row[j] * (row[j] - dot);
      }
      // dq = scale * dS k; dk += scale * dS^T q
      if (!gemm('N', 'N', rows, d, l.keys, l.scale, dS, l.keys, k_head, C, 0.0f, dq_head + first * C, C)) return false;
      if (!gemm('T', 'N', l.keys, d, rows, l.scale, dS, l.keys, q_rows, C, accumulate, dk_head, C)) return false;
    }
    return true;
  });
  if (!ok) std::fprintf(stderr, "MindBooth AttentionBackward: oneDNN sgemm failed\n");
  return ok ? 0 : 1;
}
