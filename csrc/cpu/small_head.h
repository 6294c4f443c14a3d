// Row helpers for heads of at most kSmallHeadMaxOutputs outputs, shared by the CPU forward's
// small-batch pass and the fused backward: one row of logits, its softmax, 1/2 p^T D p, and the
// head's geometry D computed once without any ATen call (at batch sizes of a training step the
// ATen calls' fixed costs, not the arithmetic, dominate).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "../common.h"
#include "simd.h"

namespace relflat {

constexpr int64_t kSmallHeadMaxOutputs = 32;

// z = W x + b for one row x (m); returns ||x||^2.
template <typename T>
RELFLAT_INLINE T row_logits(const T* __restrict__ x, const T* __restrict__ w, const T* b, int64_t d, int64_t m,
                            T* z) {
  T a = 0;
#pragma omp simd reduction(+ : a)
  for (int64_t j = 0; j < m; ++j) a += x[j] * x[j];
  for (int64_t s = 0; s < d; ++s) {
    const T* __restrict__ ws = w + s * m;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < m; ++j) acc += ws[j] * x[j];
    z[s] = acc + (b ? b[s] : T(0));
  }
  return a;
}

// p = softmax(z); returns the index of the largest entry.
template <typename T>
RELFLAT_INLINE int64_t softmax_row(const T* z, T* p, int64_t d) {
  T mx = z[0];
  for (int64_t s = 1; s < d; ++s) mx = std::max(mx, z[s]);
  T total = 0;
  for (int64_t s = 0; s < d; ++s) total += (p[s] = std::exp(z[s] - mx));
  int64_t k = 0;
  for (int64_t s = 0; s < d; ++s) {
    p[s] /= total;
    if (p[s] > p[k]) k = s;
  }
  return k;
}

// dp = D p and 1/2 p^T D p for the symmetric D (d, d).
template <typename T>
RELFLAT_INLINE T half_quadratic(const T* D, const T* p, int64_t d, T* dp) {
  T c = 0;
  for (int64_t s = 0; s < d; ++s) {
    T acc = 0;
    for (int64_t t = 0; t < d; ++t) acc += D[s * d + t] * p[t];
    dp[s] = acc;
    c += p[s] * acc;
  }
  return T(0.5) * c;
}

// sigma(z) sigma(-z) / d, without subtracting from 1.
template <typename T>
RELFLAT_INLINE T bce_curvature(T z, int64_t d) {
  const T e = std::exp(-std::abs(z));
  return e / ((T(1) + e) * (T(1) + e)) / T(d);
}

// The head's geometry for the closed form: D[s, t] = ||w_s - w_t||^2 (d, d) for cross entropy,
// from the differences themselves (no Gram-matrix cancellation), or ||w_s||^2 (d,) for BCE.
inline at::Tensor head_geometry(const at::Tensor& weight, LossCode loss) {
  const int64_t d = weight.size(0), m = weight.size(1);
  at::Tensor out = at::empty(loss == kCrossEntropy ? at::IntArrayRef{d, d} : at::IntArrayRef{d}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "head_geometry", [&] {
    using T = scalar_t;
    const T* w = weight.data_ptr<T>();
    T* g = out.data_ptr<T>();
    for (int64_t s = 0; s < d; ++s) {
      if (loss != kCrossEntropy) {
        T acc = 0;
        for (int64_t j = 0; j < m; ++j) acc += w[s * m + j] * w[s * m + j];
        g[s] = acc;
        continue;
      }
      g[s * d + s] = 0;
      for (int64_t t = s + 1; t < d; ++t) {
        T acc = 0;
        for (int64_t j = 0; j < m; ++j) {
          const T diff = w[s * m + j] - w[t * m + j];
          acc += diff * diff;
        }
        g[s * d + t] = g[t * d + s] = acc;
      }
    }
  });
  return out;
}

}  // namespace relflat
