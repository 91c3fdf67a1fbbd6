// GroupNorm and LayerNorm, forward and backward, fp32, parallel over groups / rows.
// MindSpore 2.10's CPU GroupNorm and LayerNorm are far slower than torch's and run on one core
// (docs/performance.md, "CPU backend and kernels"). The backward kernels recompute the statistics from x, so only x is kept.
// Statistics are summed in double: one pass gives mean and variance without cancellation at these sizes.
#include <cmath>
#include <vector>

#include "common.h"

using mindbooth::element_count;
using mindbooth::input;
using mindbooth::output;
using mindbooth::parallel_for;

namespace {

struct Moments {
  float mean, rstd;
};

Moments moments(const float* x, int64_t count, float eps) {
  double sum = 0.0, sum_squares = 0.0;
#pragma omp simd reduction(+ : sum, sum_squares)
  for (int64_t i = 0; i < count; ++i) {
    sum += x[i];
    sum_squares += static_cast<double>(x[i]) * x[i];
  }
  double mean = sum / count;
  double variance = sum_squares / count - mean * mean;
  if (variance < 0.0) variance = 0.0;
  return {static_cast<float>(mean), static_cast<float>(1.0 / std::sqrt(variance + eps))};
}

// sum(dy), sum(dy * x) over count values
void gradient_sums(const float* dy, const float* x, int64_t count, double* sum_dy, double* sum_dy_x) {
  double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < count; ++i) {
    a += dy[i];
    b += static_cast<double>(dy[i]) * x[i];
  }
  *sum_dy = a;
  *sum_dy_x = b;
}

struct GroupLayout {
  int64_t batch, channels, pixels, groups, group_channels;
  float eps;
};

// x (N, C, *spatial) in `groups` groups of channels, config = [groups, eps]; groups is 0 where C does not divide
GroupLayout group_layout(int ndim, const int64_t* shape, const float* config) {
  const int64_t batch = shape[0], channels = shape[1], groups = static_cast<int64_t>(config[0]);
  const bool valid = groups > 0 && channels % groups == 0;
  return {batch, channels, element_count(ndim, shape) / (batch * channels), valid ? groups : 0,
          valid ? channels / groups : 0, config[1]};
}

}  // namespace

// inputs x (N, C, *spatial), gamma (C), beta (C), config (2) = [groups, eps]; output y (x's shape)
MINDBOOTH_KERNEL(GroupNormForward) {
  if (nparam != 5 || !mindbooth::all_float32(nparam, dtypes) || ndims[0] < 2) return 1;
  const auto [batch, channels, pixels, groups, group_channels, eps] = group_layout(ndims[0], shapes[0], input(params, 3));
  if (groups == 0) return 2;
  const float *x = input(params, 0), *gamma = input(params, 1), *beta = input(params, 2);
  float* y = output(params, 4);
  parallel_for(batch * groups, [&](int64_t begin, int64_t end, int) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t first_channel = (ng % groups) * group_channels;
      const int64_t offset = ((ng / groups) * channels + first_channel) * pixels;
      const Moments m = moments(x + offset, group_channels * pixels, eps);
      for (int64_t c = 0; c < group_channels; ++c) {
        const float scale = m.rstd * gamma[first_channel + c];
        const float shift = beta[first_channel + c] - m.mean * scale;
        const float* xc = x + offset + c * pixels;
        float* yc = y + offset + c * pixels;
#pragma omp simd
        for (int64_t i = 0; i < pixels; ++i) yc[i] = xc[i] * scale + shift;
      }
    }
  });
  return 0;
}

// inputs x, gamma, dy, config; outputs dx (x's shape), dgamma (C), dbeta (C)
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * gamma, means over the group.
MINDBOOTH_KERNEL(GroupNormBackward) {
  if (nparam != 7 || !mindbooth::all_float32(nparam, dtypes) || ndims[0] < 2) return 1;
  const auto [batch, channels, pixels, groups, group_channels, eps] = group_layout(ndims[0], shapes[0], input(params, 3));
  if (groups == 0) return 2;
  const float *x = input(params, 0), *gamma = input(params, 1), *dy = input(params, 2);
  float *dx = output(params, 4), *dgamma = output(params, 5), *dbeta = output(params, 6);
  const double count = static_cast<double>(group_channels * pixels);
  std::vector<double> sum_dy(batch * channels), sum_dy_xhat(batch * channels);
  parallel_for(batch * groups, [&](int64_t begin, int64_t end, int) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t first_channel = (ng % groups) * group_channels;
      const int64_t first_row = (ng / groups) * channels + first_channel;  // (n, c) index of the group's first channel
      const int64_t offset = first_row * pixels;
      const Moments m = moments(x + offset, group_channels * pixels, eps);
      double mean_g = 0.0, mean_g_xhat = 0.0;
      for (int64_t c = 0; c < group_channels; ++c) {
        double a, b;
        gradient_sums(dy + offset + c * pixels, x + offset + c * pixels, pixels, &a, &b);
        const double xhat_sum = m.rstd * (b - m.mean * a);  // sum(dy * xhat) over the channel
        sum_dy[first_row + c] = a;
        sum_dy_xhat[first_row + c] = xhat_sum;
        mean_g += gamma[first_channel + c] * a;
        mean_g_xhat += gamma[first_channel + c] * xhat_sum;
      }
      mean_g /= count;
      mean_g_xhat /= count;
      // dx = rstd * gamma_c * dy + x * (-rstd^2 * mean_g_xhat) + rstd * (mean * rstd * mean_g_xhat - mean_g)
      const float x_coefficient = static_cast<float>(-m.rstd * m.rstd * mean_g_xhat);
      const float constant = static_cast<float>(m.rstd * (m.mean * m.rstd * mean_g_xhat - mean_g));
      for (int64_t c = 0; c < group_channels; ++c) {
        const float dy_coefficient = m.rstd * gamma[first_channel + c];
        const float* xc = x + offset + c * pixels;
        const float* dyc = dy + offset + c * pixels;
        float* dxc = dx + offset + c * pixels;
#pragma omp simd
        for (int64_t i = 0; i < pixels; ++i) dxc[i] = dyc[i] * dy_coefficient + xc[i] * x_coefficient + constant;
      }
    }
  });
  for (int64_t c = 0; c < channels; ++c) {
    double a = 0.0, b = 0.0;
    for (int64_t n = 0; n < batch; ++n) {
      a += sum_dy[n * channels + c];
      b += sum_dy_xhat[n * channels + c];
    }
    dbeta[c] = static_cast<float>(a);
    dgamma[c] = static_cast<float>(b);
  }
  return 0;
}

// inputs x (..., C), gamma (C), beta (C), config (1) = [eps]; output y (x's shape)
MINDBOOTH_KERNEL(LayerNormForward) {
  if (nparam != 5 || !mindbooth::all_float32(nparam, dtypes) || ndims[0] < 1) return 1;
  const int64_t width = shapes[0][ndims[0] - 1], rows = element_count(ndims[0], shapes[0]) / width;
  const float *x = input(params, 0), *gamma = input(params, 1), *beta = input(params, 2);
  const float eps = input(params, 3)[0];
  float* y = output(params, 4);
  parallel_for(rows, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * width;
      float* yr = y + r * width;
      const Moments m = moments(xr, width, eps);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) yr[i] = (xr[i] - m.mean) * m.rstd * gamma[i] + beta[i];
    }
  });
  return 0;
}

// inputs x, gamma, dy, config; outputs dx (x's shape), dgamma (C), dbeta (C)
MINDBOOTH_KERNEL(LayerNormBackward) {
  if (nparam != 7 || !mindbooth::all_float32(nparam, dtypes) || ndims[0] < 1) return 1;
  const int64_t width = shapes[0][ndims[0] - 1], rows = element_count(ndims[0], shapes[0]) / width;
  const float *x = input(params, 0), *gamma = input(params, 1), *dy = input(params, 2);
  const float eps = input(params, 3)[0];
  float *dx = output(params, 4), *dgamma = output(params, 5), *dbeta = output(params, 6);
  // each chunk of rows sums its dgamma/dbeta apart; the chunks are added in order after
  const int chunks = mindbooth::thread_count(rows);
  std::vector<std::vector<float>> dgamma_part(chunks, std::vector<float>(width, 0.0f));
  std::vector<std::vector<float>> dbeta_part(chunks, std::vector<float>(width, 0.0f));
  parallel_for(rows, [&](int64_t begin, int64_t end, int chunk) {
    float* dgamma_chunk = dgamma_part[chunk].data();
    float* dbeta_chunk = dbeta_part[chunk].data();
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * width;
      const float* dyr = dy + r * width;
      float* dxr = dx + r * width;
      const Moments m = moments(xr, width, eps);
      double mean_g = 0.0, mean_g_xhat = 0.0;
#pragma omp simd reduction(+ : mean_g, mean_g_xhat)
      for (int64_t i = 0; i < width; ++i) {
        const float g = dyr[i] * gamma[i];
        mean_g += g;
        mean_g_xhat += static_cast<double>(g) * ((xr[i] - m.mean) * m.rstd);
      }
      const float a = static_cast<float>(mean_g / width), b = static_cast<float>(mean_g_xhat / width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float xhat = (xr[i] - m.mean) * m.rstd;
        dxr[i] = m.rstd * (dyr[i] * gamma[i] - a - xhat * b);
        dgamma_chunk[i] += dyr[i] * xhat;
        dbeta_chunk[i] += dyr[i];
      }
    }
  });
  std::vector<double> dgamma_sum(width, 0.0), dbeta_sum(width, 0.0);
  for (int chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t i = 0; i < width; ++i) {
      dgamma_sum[i] += dgamma_part[chunk][i];
      dbeta_sum[i] += dbeta_part[chunk][i];
    }
  }
  for (int64_t i = 0; i < width; ++i) {
    dgamma[i] = static_cast<float>(dgamma_sum[i]);
    dbeta[i] = static_cast<float>(dbeta_sum[i]);
  }
  return 0;
}
