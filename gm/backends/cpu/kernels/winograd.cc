// The 3x3, stride-1, padding-1 convolution by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, "Fast
// Algorithms for Convolutional Neural Networks", CVPR 2016): each 4x4 output tile is
//     Y = A^T [ (G g G^T) . (B^T d B) ] A
// of its 6x6 input tile d and the 3x3 filter g, so a tile costs 36 multiplications per (input, output) channel
// pair instead of 144. Summed over the input channels, the 36 elementwise products are 36 independent GEMMs
// (tiles x in) x (in x out), a quarter of the direct convolution's FLOPs; the transforms are a few additions per
// input and output value. oneDNN has Winograd only for AVX-512 machines; on AVX2 its direct convolution (and
// torch's) does all 144. The fp32 rounding error is a few times the direct convolution's (tests/test_cpu_kernels.py
// measures it against a float64 convolution).
//
// Layouts: the input (N, C, H, W) goes through a thread's buffer of 6 image rows in (row, column, channel) order,
// so that the transforms run over 8 channels at once; the transformed input is V[36][tiles][C], the transformed
// filters U[36][C][K], the products M[36][tiles][K]. Large inputs are done in chunks of tile rows that keep V and M
// under kChunkBytes each; U is made once per call. All three are scratch buffers kept between calls (scratch.cc).
#include "winograd.h"

#include <oneapi/dnnl/dnnl.h>

#include <immintrin.h>  // F16C for fp16 weights, as cast.cc

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>

#include "common.h"
#include "onednn_thread.h"

namespace {

using mindbooth::Lanes;  // 8 channels
constexpr int64_t kLanes = 8, kPoints = 36;
constexpr int64_t kChunkBytes = int64_t{48} << 20;

// The distance between the 36 points' matrices of n floats: n itself is often a multiple of 4 KiB, which would put
// the 36 streams the transforms read or write on the same cache sets; 16 floats (a cache line) more spreads them.
inline int64_t point_stride(int64_t n) { return n + 16; }

inline Lanes load(const float* p) { return *reinterpret_cast<const Lanes*>(p); }
inline void store(float* p, Lanes v) { *reinterpret_cast<Lanes*>(p) = v; }
inline Lanes splat(float x) { return Lanes{} + x; }

// Arrays larger than the L3 cache are written with streaming stores, which skip reading each cache line before
// writing it (the next step reads them from memory anyway). Only where both halves of a line are written one after
// the other, so that the processor's write-combining buffers send whole lines.
constexpr int64_t kStreamBytes = int64_t{32} << 20;

inline void put(float* p, Lanes v, bool stream) {
  if (stream && reinterpret_cast<uintptr_t>(p) % 32 == 0)
    _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
  else
    store(p, v);
}

// Streaming stores are weakly ordered: fence them before another thread reads what they wrote.
inline void finish_streaming() { _mm_sfence(); }

// B^T applied to a 6-vector d (with stride), the input transform along one axis
template <typename In, typename Out>
inline void input_1d(In d, Out o) {
  const Lanes four = splat(4.0f), five = splat(5.0f), two = splat(2.0f);
  o(0, four * d(0) - five * d(2) + d(4));
  o(1, d(3) + d(4) - four * (d(1) + d(2)));
  o(2, four * (d(1) - d(2)) + d(4) - d(3));
  o(3, two * (d(3) - d(1)) + d(4) - d(2));
  o(4, two * (d(1) - d(3)) + d(4) - d(2));
  o(5, four * d(1) - five * d(3) + d(5));
}

// A^T applied to a 6-vector m: the output transform along one axis (4 outputs)
template <typename In, typename Out>
inline void output_1d(In m, Out o) {
  const Lanes a = m(1) + m(2), b = m(1) - m(2), c = m(3) + m(4), d = m(3) - m(4);
  o(0, m(0) + a + c);
  o(1, b + splat(2.0f) * d);
  o(2, a + splat(4.0f) * c);
  o(3, b + splat(8.0f) * d + m(5));
}

// G applied to a 3-vector g: the filter transform along one axis (6 outputs)
template <typename In, typename Out>
inline void filter_1d(In g, Out o) {
  const Lanes sum = g(0) + g(2), quarter = splat(0.25f) * g(0), six = splat(1.0f / 6.0f);
  o(0, quarter);
  o(1, -six * (sum + g(1)));
  o(2, -six * (sum - g(1)));
  const Lanes even = splat(1.0f / 24.0f) * g(0) + six * g(2), odd = splat(1.0f / 12.0f) * g(1);
  o(3, even + odd);
  o(4, even - odd);
  o(5, g(2));
}

// dst[j * dst_stride + l] = src[l * src_stride + j] for j, l < 8: 8 channels' rows to 8 pixels' channels and back
inline void transpose_8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m256 r[8], t[8];
  for (int l = 0; l < 8; ++l) r[l] = _mm256_loadu_ps(src + l * src_stride);
  for (int l = 0; l < 8; l += 2) {
    t[l] = _mm256_unpacklo_ps(r[l], r[l + 1]);
    t[l + 1] = _mm256_unpackhi_ps(r[l], r[l + 1]);
  }
  for (int l = 0; l < 8; l += 4) {
    r[l] = _mm256_shuffle_ps(t[l], t[l + 2], 0x44);
    r[l + 1] = _mm256_shuffle_ps(t[l], t[l + 2], 0xEE);
    r[l + 2] = _mm256_shuffle_ps(t[l + 1], t[l + 3], 0x44);
    r[l + 3] = _mm256_shuffle_ps(t[l + 1], t[l + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * dst_stride, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
    _mm256_storeu_ps(dst + (j + 4) * dst_stride, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
  }
}

struct Shape {
  int64_t batch, in, out, height, width, tile_rows_per_image, tiles_per_row;
};

// 8 filters' 72 values in fp32: the weight's own (fp32), or converted from fp16 into `converted`
inline const float* filter_values(const float* weight, int64_t offset, float*) { return weight + offset; }
inline const float* filter_values(const uint16_t* weight, int64_t offset, float* converted) {
  for (int q = 0; q < 9; ++q)
    _mm256_storeu_ps(converted + 8 * q,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(weight + offset + 8 * q))));
  return converted;
}

// U[36][a][b]: the transformed filters of weight (a, b, 3, 3), read in order, 16 filters of one row a at once
// where b allows (else 8). `flipped`: each filter turned by 180 degrees (the input gradient's convolution).
template <typename Weight>
void transform_filters(const Weight* weight, int64_t rows, int64_t columns, bool flipped, float* u) {
  const int64_t group = columns % (2 * kLanes) == 0 ? 2 * kLanes : kLanes;
  const bool stream = kPoints * rows * columns * int64_t{sizeof(float)} > kStreamBytes;
  mindbooth::parallel_for(rows, [&](int64_t begin, int64_t end, int) {
    for (int64_t a = begin; a < end; ++a)
      for (int64_t b = 0; b < columns; b += group) {
        Lanes transformed[2][kPoints];
        for (int64_t h = 0; h < group; h += kLanes) {
          float converted[9 * kLanes];
          const float* filters = filter_values(weight, (a * columns + b + h) * 9, converted);  // 8 filters in a row
          Lanes g[9];
          for (int e = 0; e < 9; ++e)
            for (int l = 0; l < kLanes; ++l) g[e][l] = filters[l * 9 + (flipped ? 8 - e : e)];
          Lanes half[6][3];  // G g, column by column
          for (int j = 0; j < 3; ++j)
            filter_1d([&](int i) { return g[i * 3 + j]; }, [&](int i, Lanes v) { half[i][j] = v; });
          for (int i = 0; i < 6; ++i)
            filter_1d([&](int j) { return half[i][j]; },
                      [&](int j, Lanes v) { transformed[h / kLanes][i * 6 + j] = v; });
        }
        for (int p = 0; p < kPoints; ++p)
          for (int64_t h = 0; h < group; h += kLanes)
            put(u + p * point_stride(rows * columns) + a * columns + b + h, transformed[h / kLanes][p], stream);
      }
    if (stream) finish_streaming();
  });
}

// V[36][chunk tiles][in] for the tile rows [first, last) of the whole batch (row r: image r / rows per image),
// 16 channels at a time where the channels allow (else 8): their 6 image rows go to a buffer in (row, column,
// channel) order, small enough for L1, and each tile's 36 transformed values are written as whole cache lines.
void transform_input(const float* x, const Shape& s, int64_t first, int64_t last, float* v) {
  const int64_t tiles = (last - first) * s.tiles_per_row, columns = 4 * s.tiles_per_row + 2;
  const int64_t planes = s.height * s.width, group = s.in % (2 * kLanes) == 0 ? 2 * kLanes : kLanes;
  const bool stream = kPoints * tiles * s.in * int64_t{sizeof(float)} > kStreamBytes;
  mindbooth::parallel_for(last - first, [&](int64_t begin, int64_t end, int) {
    std::unique_ptr<float[]> rows(new float[6 * columns * group]);
    for (int64_t r = first + begin; r < first + end; ++r) {
      const int64_t image = r / s.tile_rows_per_image, top = 4 * (r % s.tile_rows_per_image) - 1;
      const int64_t tile0 = (r - first) * s.tiles_per_row;
      for (int64_t c0 = 0; c0 < s.in; c0 += group) {
        for (int64_t i = 0; i < 6; ++i)
          for (int64_t h = 0; h < group; h += kLanes) {
            const int64_t y = top + i;
            float* row = rows.get() + i * columns * group + h;
            if (y < 0 || y >= s.height) {
              for (int64_t j = 0; j < columns; ++j) store(row + j * group, splat(0.0f));
              continue;
            }
            const float* plane = x + ((image * s.in + c0 + h) * s.height + y) * s.width;  // channel c0 + h, row y
            store(row, splat(0.0f));  // column -1
            int64_t column = 0;  // image column `column` is buffer column column + 1
            for (; column + kLanes <= s.width; column += kLanes)
              transpose_8x8(plane + column, planes, row + (column + 1) * group, group);
            for (; column < s.width; ++column)
              for (int l = 0; l < kLanes; ++l) row[(column + 1) * group + l] = plane[l * planes + column];
            for (int64_t j = s.width + 1; j < columns; ++j) store(row + j * group, splat(0.0f));
          }
        for (int64_t tx = 0; tx < s.tiles_per_row; ++tx) {
          Lanes transformed[2][kPoints];
          for (int64_t h = 0; h < group; h += kLanes) {
            const float* corner = rows.get() + 4 * tx * group + h;
            Lanes half[6][6];  // B^T d, column by column
            for (int j = 0; j < 6; ++j)
              input_1d([&](int i) { return load(corner + (i * columns + j) * group); },
                       [&](int i, Lanes value) { half[i][j] = value; });
            for (int i = 0; i < 6; ++i)
              input_1d([&](int j) { return half[i][j]; },
                       [&](int j, Lanes value) { transformed[h / kLanes][i * 6 + j] = value; });
          }
          float* out = v + (tile0 + tx) * s.in + c0;
          for (int p = 0; p < kPoints; ++p)
            for (int64_t h = 0; h < group; h += kLanes)
              put(out + p * point_stride(tiles * s.in) + h, transformed[h / kLanes][p], stream);
        }
      }
    }
    if (stream) finish_streaming();
  });
}

// y (N, out, H, W) for the tile rows [first, last) from M[36][chunk tiles][out], 8 channels at a time through a
// buffer of their 4 output rows in (row, column, channel) order
void transform_output(const float* m, const Shape& s, int64_t first, int64_t last, float* y) {
  const int64_t tiles = (last - first) * s.tiles_per_row, columns = 4 * s.tiles_per_row;
  const int64_t planes = s.height * s.width;
  mindbooth::parallel_for(last - first, [&](int64_t begin, int64_t end, int) {
    std::unique_ptr<float[]> rows(new float[4 * columns * kLanes]);
    for (int64_t r = first + begin; r < first + end; ++r) {
      const int64_t image = r / s.tile_rows_per_image, top = 4 * (r % s.tile_rows_per_image);
      const int64_t tile0 = (r - first) * s.tiles_per_row, height = std::min<int64_t>(4, s.height - top);
      for (int64_t k0 = 0; k0 < s.out; k0 += kLanes) {
        for (int64_t tx = 0; tx < s.tiles_per_row; ++tx) {
          const float* in = m + (tile0 + tx) * s.out + k0;
          Lanes half[4][6];  // A^T m, column by column
          for (int j = 0; j < 6; ++j)
            output_1d([&](int i) { return load(in + (i * 6 + j) * point_stride(tiles * s.out)); },
                      [&](int i, Lanes value) { half[i][j] = value; });
          float* corner = rows.get() + 4 * tx * kLanes;
          for (int i = 0; i < 4; ++i)
            output_1d([&](int j) { return half[i][j]; },
                      [&](int j, Lanes value) { store(corner + (i * columns + j) * kLanes, value); });
        }
        for (int64_t i = 0; i < height; ++i) {
          float* plane = y + ((image * s.out + k0) * s.height + top + i) * s.width;
          const float* row = rows.get() + i * columns * kLanes;
          int64_t j = 0;
          for (; j + kLanes <= s.width; j += kLanes) transpose_8x8(row + j * kLanes, kLanes, plane + j, planes);
          for (; j < s.width; ++j)
            for (int l = 0; l < kLanes; ++l) plane[l * planes + j] = row[j * kLanes + l];
        }
      }
    }
  });
}

// M[p] = V[p] U[p] for the 36 points, each GEMM on one thread (oneDNN's sgemm held to that thread); U[p] is
// (out, in) when `u_out_in`, else (in, out)
bool multiply(const float* v, const float* u, bool u_out_in, const Shape& s, int64_t tiles, float* m) {
  std::atomic<bool> failed{false};
  mindbooth::parallel_for(kPoints, [&](int64_t begin, int64_t end, int) {
    const mindbooth::SgemmOnThisThread one_thread;
    for (int64_t p = begin; p < end; ++p)
      if (dnnl_sgemm('N', u_out_in ? 'T' : 'N', tiles, s.out, s.in, 1.0f, v + p * point_stride(tiles * s.in), s.in,
                     u + p * point_stride(s.in * s.out), u_out_in ? s.in : s.out, 0.0f,
                     m + p * point_stride(tiles * s.out), s.out) != dnnl_success)
        failed = true;
  });
  return !failed;
}

}  // namespace

namespace mindbooth {

bool winograd_applies(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t padding) {
  return kernel == 3 && padding == 1 && in_channels % kLanes == 0 && out_channels % kLanes == 0;
}

bool winograd_conv3x3(const float* x, const void* weight, bool weight_float16, bool transposed, int64_t batch,
                      int64_t in_channels, int64_t out_channels, int64_t height, int64_t width, float* y) {
  const Shape s{batch, in_channels, out_channels, height, width, (height + 3) / 4, (width + 3) / 4};
  const mindbooth::ScratchFloats u(kPoints * point_stride(s.in * s.out));
  if (!u) return false;
  // the weight is (out, in, 3, 3) for the convolution, (in, out, 3, 3) for the input gradient
  const int64_t rows_a = transposed ? s.in : s.out, columns_b = transposed ? s.out : s.in;
  if (weight_float16)
    transform_filters(static_cast<const uint16_t*>(weight), rows_a, columns_b, transposed, u.get());
  else
    transform_filters(static_cast<const float*>(weight), rows_a, columns_b, transposed, u.get());
  const int64_t rows = s.batch * s.tile_rows_per_image;
  const int64_t row_bytes = kPoints * s.tiles_per_row * std::max(s.in, s.out) * int64_t{sizeof(float)};
  const int64_t chunk_rows = std::clamp<int64_t>(kChunkBytes / row_bytes, 1, rows);
  const mindbooth::ScratchFloats v(kPoints * point_stride(chunk_rows * s.tiles_per_row * s.in));
  if (!v) return false;
  const mindbooth::ScratchFloats m(kPoints * point_stride(chunk_rows * s.tiles_per_row * s.out));
  if (!m) return false;
  for (int64_t first = 0; first < rows; first += chunk_rows) {
    const int64_t last = std::min(rows, first + chunk_rows);
    transform_input(x, s, first, last, v.get());
    if (!multiply(v.get(), u.get(), !transposed, s, (last - first) * s.tiles_per_row, m.get())) return false;
    transform_output(m.get(), s, first, last, y);
  }
  return true;
}

}  // namespace mindbooth
