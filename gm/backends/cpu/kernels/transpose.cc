// Axes 1 and 2 swapped, (A, M, N, K...) -> (A, N, M, K...), fp32, into a contiguous output: the attention heads'
// split and merge, and a feature map's (C, pixels) <-> (pixels, C). MindSpore's CPU Transpose holds a buffer of 2x
// its output per op for the graph's life; mint.transpose gives a view whose copy into contiguous memory happens
// between kernels and ran slower than Transpose.
#include "common.h"

using mindbooth::input;
using mindbooth::output;

MINDBOOTH_KERNEL(SwapAxes12) {
  if (nparam != 2 || !mindbooth::all_float32(nparam, dtypes) || ndims[0] < 3) return 1;
  const float* x = input(params, 0);
  float* y = output(params, 1);
  const int64_t outer = shapes[0][0], rows = shapes[0][1], columns = shapes[0][2];
  const int64_t inner = mindbooth::element_count(ndims[0] - 3, shapes[0] + 3);  // 1 for a 3-D input
  const int64_t tile = inner >= 16 ? 8 : 32;  // a tile of the (rows, columns) plane, each entry `inner` values
  const int64_t row_tiles = (rows + tile - 1) / tile, column_tiles = (columns + tile - 1) / tile;
  mindbooth::parallel_for(outer * row_tiles * column_tiles, [&](int64_t begin, int64_t end, int) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t a = index / (row_tiles * column_tiles);
      const int64_t first_row = (index / column_tiles % row_tiles) * tile, first_column = index % column_tiles * tile;
      const int64_t last_row = std::min(rows, first_row + tile), last_column = std::min(columns, first_column + tile);
      const float* xa = x + a * rows * columns * inner;
      float* ya = y + a * rows * columns * inner;
      for (int64_t n = first_column; n < last_column; ++n) {
        for (int64_t m = first_row; m < last_row; ++m) {
          const float* from = xa + (m * columns + n) * inner;
          float* to = ya + (n * rows + m) * inner;
#pragma omp simd
          for (int64_t k = 0; k < inner; ++k) to[k] = from[k];
        }
      }
    }
  });
  return 0;
}
