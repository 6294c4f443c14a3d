// Row helpers for heads of at most kSmallHeadMaxOutputs outputs, shared by the CPU forward and the
// fused backward: logits of a tile of rows from W^T zero-padded to a fixed width (the partial sums
// stay in vector registers while the rows stream through once), a row's softmax, 1/2 p^T D p, and
// the head's geometry D computed once without any ATen call (at the batch sizes of a training step
// the ATen calls' fixed costs, not the arithmetic, dominate).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "simd.h"

namespace relflat {

constexpr int64_t kSmallHeadMaxOutputs = 32;
constexpr int kRowsPerTile = 4;

template <typename T>
RELFLAT_INLINE T dot(const T* a, const T* b, int64_t len) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < len; ++j) acc += a[j] * b[j];
  return acc;
}

// The padded width DP (8, 16 or 32) for d <= 32 outputs.
inline int64_t padded_width(int64_t d) { return d <= 8 ? 8 : (d <= 16 ? 16 : 32); }

// f called with padded_width(d) as a compile-time constant (std::integral_constant), so the row
// loops have fixed trip counts.
template <typename F>
void with_padded_width(int64_t d, F&& f) {
  if (d <= 8) f(std::integral_constant<int, 8>{});
  else if (d <= 16) f(std::integral_constant<int, 16>{});
  else f(std::integral_constant<int, 32>{});
}

// W^T zero-padded to (m, dp) and the bias to (dp,): the layout logits_tile reads.
template <typename T>
struct PaddedHead {
  std::vector<T> weight_t, bias;
  PaddedHead(const T* w, const T* b, int64_t d, int64_t m, int64_t dp) : weight_t(m * dp, T(0)), bias(dp, T(0)) {
    for (int64_t s = 0; s < d; ++s) {
      for (int64_t j = 0; j < m; ++j) weight_t[j * dp + s] = w[s * m + j];
      if (b) bias[s] = b[s];
    }
  }
};

// logits[r * ld + s] = bias[s] + x_r . w_s (s < d) and sq_norms[r] = ||x_r||^2 for R rows x (R, m),
// from W^T padded to (m, DP).
template <typename T, int DP, int R>
RELFLAT_INLINE void logits_tile(const T* x, int64_t m, const T* wt, const T* bias_pad, int64_t d, T* logits,
                                int64_t ld, T* sq_norms) {
  T acc[R][DP];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < DP; ++s) acc[r][s] = bias_pad[s];
  for (int64_t j = 0; j < m; ++j) {
    const T* w = wt + j * DP;
    for (int r = 0; r < R; ++r) {
      const T xr = x[r * m + j];
#pragma omp simd
      for (int s = 0; s < DP; ++s) acc[r][s] += xr * w[s];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t s = 0; s < d; ++s) logits[r * ld + s] = acc[r][s];
    sq_norms[r] = dot(x + r * m, x + r * m, m);
  }
}

// p = softmax(z) over d entries (the exponentials vectorized with AVX2, simd.h); returns the
// index of the largest entry.
template <typename T, bool kAvx2>
RELFLAT_INLINE int64_t softmax_row(const T* z, T* p, int64_t d) {
  int64_t k = 0;
  for (int64_t s = 1; s < d; ++s)
    if (z[s] > z[k]) k = s;
  std::copy(z, z + d, p);
  const T inverse = T(1) / ExpShiftedSum<T, kAvx2>::apply(p, d, z[k]);
  for (int64_t s = 0; s < d; ++s) p[s] *= inverse;
  return k;
}

// dp = D p (DP) and 1/2 p^T D p for the symmetric D with rows zero-padded to (d, DP) and p (DP)
// zero beyond d: a fixed-width accumulation over t, without a horizontal sum per entry.
template <typename T, int DP>
RELFLAT_INLINE T half_quadratic(const T* D, const T* p, int64_t d, T* dp) {
  for (int s = 0; s < DP; ++s) dp[s] = 0;
  for (int64_t t = 0; t < d; ++t) {
    const T pt = p[t];
    const T* __restrict__ row = D + t * DP;
#pragma omp simd
    for (int s = 0; s < DP; ++s) dp[s] += pt * row[s];
  }
  T c = 0;
#pragma omp simd reduction(+ : c)
  for (int s = 0; s < DP; ++s) c += p[s] * dp[s];
  return T(0.5) * c;
}

// sigma(z) sigma(-z) / d, without subtracting from 1.
template <typename T>
RELFLAT_INLINE T bce_curvature(T z, int64_t d) {
  const T e = std::exp(-std::abs(z));
  return e / ((T(1) + e) * (T(1) + e)) / T(d);
}

// The head's geometry for the closed form, zero-padded to DP columns: D[s, t] = ||w_s - w_t||^2
// (d, DP) for cross entropy, from the differences themselves (no Gram-matrix cancellation), or
// ||w_s||^2 (DP,) for BCE.
template <typename T, int DP>
std::vector<T> head_geometry(const T* w, int64_t d, int64_t m, LossCode loss) {
  std::vector<T> g(loss == kCrossEntropy ? d * DP : DP, T(0));
  for (int64_t s = 0; s < d; ++s) {
    const T* ws = w + s * m;
    if (loss != kCrossEntropy) {
      g[s] = dot(ws, ws, m);
      continue;
    }
    for (int64_t t = s + 1; t < d; ++t) {
      const T* wt = w + t * m;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < m; ++j) acc += (ws[j] - wt[j]) * (ws[j] - wt[j]);
      g[s * DP + t] = g[t * DP + s] = acc;
    }
  }
  return g;
}

}  // namespace relflat
