// Multi-head attention softmax(q k^T * scale) v, forward and backward, fp32, in one kernel each, on the
// projections' own layout (batch, tokens, heads * dim_head): no head split/merge transposes, no tokens^2 tensors
// between kernels. Each (sample, head) pair goes to one thread. The forward, for dim_head a multiple of 16 (SDXL's
// 64), is flash attention with its own register tiles (below); otherwise, and in the backward, queries go in blocks
// of kRows, whose scores (kRows x key tokens) stay in cache, with oneDNN's sgemm (the libdnnl.so.3 MindSpore ships)
// for the products. The backward recomputes the probabilities block by block, as flash attention does, and takes
// D = rowsum(P * dP) over the block's scores.
#include <immintrin.h>
#include <oneapi/dnnl/dnnl.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "common.h"
#include "onednn_thread.h"

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

using mindbooth::Lanes;

// max of row[0, count), count >= 1; in 8 lanes (the compiler's max reduction stayed scalar)
inline float row_max(const float* row, int64_t count) {
  float largest = row[0];
  int64_t j = 0;
  if (count >= 8) {
    Lanes lanes = *reinterpret_cast<const Lanes*>(row);
    for (j = 8; j + 8 <= count; j += 8) {
      const Lanes next = *reinterpret_cast<const Lanes*>(row + j);
      lanes = lanes > next ? lanes : next;
    }
    for (int i = 0; i < 8; ++i) largest = std::max(largest, lanes[i]);
  }
  for (; j < count; ++j) largest = std::max(largest, row[j]);
  return largest;
}

// e^x for x <= 0 in 8 lanes, inline (libmvec's call was a tenth of the forward): Cephes' expf, x = n ln2 + r with
// |r| <= ln2 / 2, e^r by its polynomial, 2^n written into the exponent bits; x below -87 gives e^-87 (~1e-38).
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts (Cody and Waite)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_to_n));
}

// row[j] = e^(row[j] - largest) for j < count; returns their sum
inline float exp_shifted(float* row, int64_t count, float largest) {
  const __m256 shift = _mm256_set1_ps(largest);
  __m256 sums = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift));
    _mm256_storeu_ps(row + j, e);
    sums = _mm256_add_ps(sums, e);
  }
  float sum = 0.0f;
  for (int i = 0; i < 8; ++i) sum += sums[i];
  for (; j < count; ++j) sum += row[j] = std::exp(row[j] - largest);
  return sum;
}

// Each row of scores (rows x keys) to its softmax, in place (the same max and exp as the flash forward's).
void softmax_rows(float* scores, int64_t rows, int64_t keys) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * keys;
    const float inverse = 1.0f / exp_shifted(row, keys, row_max(row, keys));
#pragma omp simd
    for (int64_t j = 0; j < keys; ++j) row[j] *= inverse;
  }
}

// body(sample, head) for every pair, the pairs split over the threads; false if any body failed
template <typename Body>
bool for_each_head(const Layout& l, Body body) {
  std::vector<char> failed(static_cast<size_t>(mindbooth::thread_count(l.batch * l.heads)), 0);
  mindbooth::parallel_for(l.batch * l.heads, [&](int64_t begin, int64_t end, int thread) {
    const mindbooth::SgemmOnThisThread one_thread;
    for (int64_t pair = begin; pair < end; ++pair)
      if (!body(pair / l.heads, pair % l.heads)) failed[thread] = 1;
  });
  for (char f : failed)
    if (f) return false;
  return true;
}

// ---- The forward as flash attention, for dim_head a multiple of 16 (SDXL's 64) ----
// Per (sample, head): K is packed once into 16-key tiles (d x 16 each) and V into contiguous rows; queries go in
// blocks of kBlockQueries, keys in blocks of kBlockKeys with the softmax kept online (running max and sum per
// query, the output rescaled when the max grows), so the scores never leave L2 and no packing is repeated per
// block, which sgemm on 64-deep products did. Both products are 6 x 16 register tiles (12 accumulators).

constexpr int kTileRows = 6, kTileKeys = 16;
constexpr int64_t kBlockQueries = 8 * kTileRows, kBlockKeys = 256;

// s[r][0, 16) = sum_i q[r][i] k_tile[i][0, 16) for the tile's 6 query rows (q rows of d, already scaled)
inline void score_tile(const float* q, int64_t d, const float* k_tile, float* s, int64_t s_stride) {
  Lanes acc[kTileRows][2] = {};
#pragma GCC unroll 4
  for (int64_t i = 0; i < d; ++i) {
    const Lanes k0 = *reinterpret_cast<const Lanes*>(k_tile + i * kTileKeys);
    const Lanes k1 = *reinterpret_cast<const Lanes*>(k_tile + i * kTileKeys + 8);
    for (int r = 0; r < kTileRows; ++r) {
      const float a = q[r * d + i];
      acc[r][0] += a * k0;
      acc[r][1] += a * k1;
    }
  }
  for (int r = 0; r < kTileRows; ++r) {
    *reinterpret_cast<Lanes*>(s + r * s_stride) = acc[r][0];
    *reinterpret_cast<Lanes*>(s + r * s_stride + 8) = acc[r][1];
  }
}

// o[r][0, 16) += sum_j p[r][j] v[j][0, 16) over `keys` keys, for the tile's 6 rows (o and v rows of d floats)
inline void output_tile(const float* p, int64_t p_stride, const float* v, int64_t d, int64_t keys, float* o) {
  Lanes acc[kTileRows][2];
  for (int r = 0; r < kTileRows; ++r) {
    acc[r][0] = *reinterpret_cast<const Lanes*>(o + r * d);
    acc[r][1] = *reinterpret_cast<const Lanes*>(o + r * d + 8);
  }
#pragma GCC unroll 4
  for (int64_t j = 0; j < keys; ++j) {
    const Lanes v0 = *reinterpret_cast<const Lanes*>(v + j * d), v1 = *reinterpret_cast<const Lanes*>(v + j * d + 8);
    for (int r = 0; r < kTileRows; ++r) {
      const float a = p[r * p_stride + j];
      acc[r][0] += a * v0;
      acc[r][1] += a * v1;
    }
  }
  for (int r = 0; r < kTileRows; ++r) {
    *reinterpret_cast<Lanes*>(o + r * d) = acc[r][0];
    *reinterpret_cast<Lanes*>(o + r * d + 8) = acc[r][1];
  }
}

// One (sample, head): q_head, k_head, v_head and out_head point at the head's first column, rows C apart.
bool flash_forward(const Layout& l, const float* q_head, const float* k_head, const float* v_head, float* out_head) {
  const int64_t C = l.channels, d = l.dim_head, M = l.keys;
  const int64_t padded_keys = (M + kTileKeys - 1) / kTileKeys * kTileKeys;
  const mindbooth::AlignedFloats packed_k = mindbooth::aligned_floats(padded_keys * d),
                                 packed_v = mindbooth::aligned_floats(padded_keys * d),
                                 queries = mindbooth::aligned_floats(kBlockQueries * d),
                                 output = mindbooth::aligned_floats(kBlockQueries * d),
                                 scores = mindbooth::aligned_floats(kBlockQueries * kBlockKeys);
  if (!packed_k || !packed_v || !queries || !output || !scores) return false;
  std::fill_n(packed_k.get() + M / kTileKeys * d * kTileKeys, (padded_keys - M / kTileKeys * kTileKeys) * d, 0.0f);
  std::fill_n(packed_v.get() + M * d, (padded_keys - M) * d, 0.0f);  // the padding keys: zeros, not NaN
  for (int64_t j = 0; j < M; ++j) {
    float* tile = packed_k.get() + (j / kTileKeys) * d * kTileKeys + j % kTileKeys;
    for (int64_t i = 0; i < d; ++i) tile[i * kTileKeys] = k_head[j * C + i];
    std::copy_n(v_head + j * C, d, packed_v.get() + j * d);
  }
  float running_max[kBlockQueries], running_sum[kBlockQueries];
  for (int64_t first = 0; first < l.queries; first += kBlockQueries) {
    const int64_t rows = std::min(kBlockQueries, l.queries - first);
    const int64_t tiles = (rows + kTileRows - 1) / kTileRows, padded_rows = tiles * kTileRows;
    std::fill_n(queries.get(), kBlockQueries * d, 0.0f);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < d; ++i) queries[r * d + i] = l.scale * q_head[(first + r) * C + i];
    std::fill_n(output.get(), kBlockQueries * d, 0.0f);
    std::fill_n(running_max, kBlockQueries, -1e30f);  // finite: -ffast-math assumes no infinities
    std::fill_n(running_sum, kBlockQueries, 0.0f);
    for (int64_t key0 = 0; key0 < padded_keys; key0 += kBlockKeys) {
      const int64_t block = std::min(kBlockKeys, padded_keys - key0), valid = std::min(block, M - key0);
      for (int64_t tile = 0; tile < block / kTileKeys; ++tile) {
        const float* k_tile = packed_k.get() + (key0 / kTileKeys + tile) * d * kTileKeys;
        for (int64_t t = 0; t < tiles; ++t)
          score_tile(queries.get() + t * kTileRows * d, d, k_tile,
                     scores.get() + t * kTileRows * kBlockKeys + tile * kTileKeys, kBlockKeys);
      }
      for (int64_t r = 0; r < padded_rows; ++r) {
        float* row = scores.get() + r * kBlockKeys;
        const float largest = std::max(running_max[r], row_max(row, valid));
        const float sum = exp_shifted(row, valid, largest);
        std::fill(row + valid, row + block, 0.0f);  // the padding keys of the last tile
        const float correction = std::exp(running_max[r] - largest);
        running_sum[r] = running_sum[r] * correction + sum;
        running_max[r] = largest;
        if (correction != 1.0f)
          for (int64_t i = 0; i < d; ++i) output[r * d + i] *= correction;
      }
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t column = 0; column < d; column += kTileKeys)
          output_tile(scores.get() + t * kTileRows * kBlockKeys, kBlockKeys, packed_v.get() + key0 * d + column, d,
                      block, output.get() + t * kTileRows * d + column);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float inverse = 1.0f / running_sum[r];
      for (int64_t i = 0; i < d; ++i) out_head[(first + r) * C + i] = output[r * d + i] * inverse;
    }
  }
  return true;
}

// body(sample, head) for every pair, the pairs split over the threads (no oneDNN inside); false if any failed
template <typename Body>
bool for_each_pair(const Layout& l, Body body) {
  std::vector<char> failed(static_cast<size_t>(mindbooth::thread_count(l.batch * l.heads)), 0);
  mindbooth::parallel_for(l.batch * l.heads, [&](int64_t begin, int64_t end, int thread) {
    for (int64_t pair = begin; pair < end; ++pair)
      if (!body(pair / l.heads, pair % l.heads)) failed[thread] = 1;
  });
  return std::find(failed.begin(), failed.end(), 1) == failed.end();
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
  if (d % kTileKeys == 0) {
    const bool ok = for_each_pair(l, [&](int64_t sample, int64_t head) {
      return flash_forward(l, q + sample * l.queries * C + head * d, k + sample * l.keys * C + head * d,
                           v + sample * l.keys * C + head * d, out + sample * l.queries * C + head * d);
    });
    if (!ok) std::fprintf(stderr, "MindBooth AttentionForward: out of memory\n");
    return ok ? 0 : 1;
  }
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
