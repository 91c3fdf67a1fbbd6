// The LoRA branch y = scale * (x A^T) B^T, forward and backward, fp32, for small ranks. MindSpore 2.10's CPU MatMul
// takes 17-21 ms for each of the branch's (2048 x 640) x (640 x 4)-like products, as long as the 640 x 640 base
// layer's: 0.6 GFLOP/s. Here each is a pass over x, dy and dx, vectorised along the feature axis.
#include <vector>

#include "common.h"

using mindbooth::input;
using mindbooth::output;
using mindbooth::parallel_for;

namespace {

struct Shapes {
  int64_t rows, in, rank, out;
};

// x (..., in), a (rank, in), b (out, rank); rank 0 where they do not fit together
Shapes lora_shapes(int* ndims, int64_t** shapes) {
  const int64_t in = shapes[0][ndims[0] - 1], rank = shapes[1][0], out = shapes[2][0];
  const bool fit = ndims[1] == 2 && ndims[2] == 2 && shapes[1][1] == in && shapes[2][1] == rank;
  return {mindbooth::element_count(ndims[0], shapes[0]) / in, in, fit ? rank : 0, out};
}

// (rows, columns) -> (columns, rows), for the small A and B
std::vector<float> transposed(const float* m, int64_t rows, int64_t columns) {
  std::vector<float> t(rows * columns);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < columns; ++c) t[c * rows + r] = m[r * columns + c];
  return t;
}

// h[k] = sum_i x[i] a[k, i] for k < rank
void project_down(const float* x, const float* a, int64_t in, int64_t rank, float* h) {
  for (int64_t k = 0; k < rank; ++k) {
    const float* ak = a + k * in;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < in; ++i) sum += x[i] * ak[i];
    h[k] = sum;
  }
}

}  // namespace

// inputs x (..., in), a (rank, in), b (out, rank), config (1) = [scale]; output y (..., out)
MINDBOOTH_KERNEL(LoraForward) {
  if (nparam != 5 || !mindbooth::all_float32(nparam, dtypes)) return 1;
  const auto [rows, in, rank, out] = lora_shapes(ndims, shapes);
  if (rank == 0) return 2;
  const float *x = input(params, 0), *a = input(params, 1);
  const float scale = input(params, 3)[0];
  float* y = output(params, 4);
  const std::vector<float> b_t = transposed(input(params, 2), out, rank);  // (rank, out)
  parallel_for(rows, [&](int64_t begin, int64_t end, int) {
    std::vector<float> h(rank);
    for (int64_t n = begin; n < end; ++n) {
      project_down(x + n * in, a, in, rank, h.data());
      float* yn = y + n * out;
#pragma omp simd
      for (int64_t o = 0; o < out; ++o) yn[o] = 0.0f;
      for (int64_t k = 0; k < rank; ++k) {
        const float hk = scale * h[k];
        const float* bk = b_t.data() + k * out;
#pragma omp simd
        for (int64_t o = 0; o < out; ++o) yn[o] += hk * bk[o];
      }
    }
  });
  return 0;
}

// inputs x, a, b, config, dy (..., out); outputs dx (..., in), da (rank, in), db (out, rank), with
// g = scale * dy b (rows, rank) and h = x a^T: dx = g a, da = g^T x, db = scale * dy^T h
MINDBOOTH_KERNEL(LoraBackward) {
  if (nparam != 8 || !mindbooth::all_float32(nparam, dtypes)) return 1;
  const auto [rows, in, rank, out] = lora_shapes(ndims, shapes);
  if (rank == 0) return 2;
  const float *x = input(params, 0), *a = input(params, 1), *dy = input(params, 4);
  const float scale = input(params, 3)[0];
  float *dx = output(params, 5), *da = output(params, 6), *db = output(params, 7);
  const std::vector<float> b_t = transposed(input(params, 2), out, rank);  // (rank, out)
  // each chunk of rows sums its da and db^T apart; the chunks are added in order after
  const int chunks = mindbooth::thread_count(rows);
  std::vector<std::vector<float>> da_part(chunks, std::vector<float>(rank * in, 0.0f));
  std::vector<std::vector<float>> db_t_part(chunks, std::vector<float>(rank * out, 0.0f));
  parallel_for(rows, [&](int64_t begin, int64_t end, int chunk) {
    std::vector<float> h(rank), g(rank);
    for (int64_t n = begin; n < end; ++n) {
      const float *xn = x + n * in, *dyn = dy + n * out;
      float* dxn = dx + n * in;
      project_down(xn, a, in, rank, h.data());
      project_down(dyn, b_t.data(), out, rank, g.data());
#pragma omp simd
      for (int64_t i = 0; i < in; ++i) dxn[i] = 0.0f;
      for (int64_t k = 0; k < rank; ++k) {
        const float gk = scale * g[k], hk = scale * h[k];
        const float* ak = a + k * in;
        float* da_k = da_part[chunk].data() + k * in;
        float* db_k = db_t_part[chunk].data() + k * out;
#pragma omp simd
        for (int64_t i = 0; i < in; ++i) {
          dxn[i] += gk * ak[i];
          da_k[i] += gk * xn[i];
        }
#pragma omp simd
        for (int64_t o = 0; o < out; ++o) db_k[o] += hk * dyn[o];
      }
    }
  });
  for (int64_t j = 0; j < rank * in; ++j) {
    double sum = 0.0;
    for (int chunk = 0; chunk < chunks; ++chunk) sum += da_part[chunk][j];
    da[j] = static_cast<float>(sum);
  }
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < rank; ++k) {
      double sum = 0.0;
      for (int chunk = 0; chunk < chunks; ++chunk) sum += db_t_part[chunk][k * out + o];
      db[o * rank + k] = static_cast<float>(sum);
    }
  return 0;
}
