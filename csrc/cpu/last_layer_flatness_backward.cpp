// CPU backward of last_layer_flatness. Few outputs (d <= 32) and no block gradient (the penalty's
// case): one fused pass over the rows, each read once: logits, softmax / sigmoid, c_i and u_i, the
// feature gradient row, and per-thread sums for the weight and bias gradients and for
// sum_i g_i a_i Hz_i; then one d x d x m product. Otherwise the shared ATen driver
// (flatness_backward.h) around a fused row pass that turns each softmax / sigmoid row into c_i
// and u_i.
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include <torch/library.h>

#include "../flatness_backward.h"
#include "small_head.h"

namespace relflat {
namespace {

template <typename T>
void row_pass_kernel(const RowPassArgs& args) {
  const int64_t n = args.h.size(0), d = args.h.size(1);
  const bool cross_entropy = args.loss == kCrossEntropy;
  const T* h = args.h.data_ptr<T>();
  const T* slope = cross_entropy ? nullptr : args.slope.data_ptr<T>();
  const T* qg = args.qg.data_ptr<T>();
  const T* qgamma = args.qgamma.defined() ? args.qgamma.data_ptr<T>() : nullptr;
  const T* g = args.g.data_ptr<T>();
  const T* a = args.a.data_ptr<T>();
  T* a_u = args.a_u.data_ptr<T>();
  T* two_c = args.two_c.data_ptr<T>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    std::vector<T> v(d);
    for (int64_t i = begin; i < end; ++i) {
      const T* hi = h + i * d;
      const T* qgi = qg + i * args.qg_stride;
      T c = 0;
      for (int64_t s = 0; s < d; ++s) {
        v[s] = g[i] * qgi[s] + (qgamma ? qgamma[i * args.qgamma_stride + s] : T(0));
        c += hi[s] * v[s];
      }
      if (cross_entropy) c *= T(0.5);
      T* out = a_u + i * d;
      if (cross_entropy) {
        for (int64_t s = 0; s < d; ++s) out[s] = a[i] * hi[s] * (v[s] - 2 * c);
      } else {
        const T* slope_i = slope + i * d;
        for (int64_t s = 0; s < d; ++s) out[s] = a[i] * hi[s] * slope_i[s] * v[s];
      }
      two_c[i] = 2 * c;
    }
  });
}

// The fused pass over rows [begin, end) for d <= kSmallHeadMaxOutputs (cross entropy or BCE,
// per-sample gradients only), a kernel for run_best_isa (simd.h). mat: D = ||w_s - w_t||^2 (d, d)
// for cross entropy, diag(G) (d,) for BCE. Writes the feature gradient rows and adds to this
// thread's sums: gw (d, m) = sum a u phi^T, gb (d) = sum a u, block (d, d) = sum g a Hz.
template <typename T>
struct BackwardRows {
  const T* phi;
  const T* w;
  const T* b;
  const T* g;
  const T* mat;
  int64_t m, d;
  bool cross_entropy;
  int64_t begin, end;
  T* gf;
  T* gw;
  T* gb;
  T* block;

  template <bool kAvx2>
  RELFLAT_INLINE void run() const {
    T z[kSmallHeadMaxOutputs], h[kSmallHeadMaxOutputs], u[kSmallHeadMaxOutputs];
    for (int64_t i = begin; i < end; ++i) {
      const T* __restrict__ x = phi + i * m;
      const T a = row_logits(x, w, b, d, m, z);
      const T c = cross_entropy ? softmax_terms(z, h, u, a, g[i]) : sigmoid_terms(z, u, a, g[i]);
      // grad_phi_i = 2 c phi_i + W^T (a u); the weight and bias gradients' sums.
      T* __restrict__ gfi = gf + i * m;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) gfi[j] = 2 * c * x[j];
      for (int64_t s = 0; s < d; ++s) {
        const T us = u[s];
        const T* __restrict__ ws = w + s * m;
        T* __restrict__ gws = gw + s * m;
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) {
          gfi[j] += us * ws[j];
          gws[j] += us * x[j];
        }
        gb[s] += us;
      }
    }
  }

  // Cross entropy: c = 1/2 p^T (g D) p, u = a p o (g D p - 2c); block += g a (diag(p) - p p^T)
  // with the diagonal from the accurate 1 - p (the other entries' sum at the row's maximum k).
  RELFLAT_INLINE T softmax_terms(const T* z, T* h, T* u, T a, T gi) const {
    const int64_t k = softmax_row(z, h, d);
    T dp[kSmallHeadMaxOutputs];
    const T c = gi * half_quadratic(mat, h, d, dp);
    for (int64_t s = 0; s < d; ++s) u[s] = a * h[s] * (gi * dp[s] - 2 * c);
    T rest = 0;
    for (int64_t t = 0; t < d; ++t) rest += t == k ? T(0) : h[t];
    const T beta = gi * a;
    for (int64_t s = 0; s < d; ++s) {
      const T bs = beta * h[s];
      for (int64_t t = 0; t < d; ++t)
        if (t != s) block[s * d + t] -= bs * h[t];
      block[s * d + s] += bs * (s == k ? rest : T(1) - h[s]);  // never p_s - p_s^2: cancels at k
    }
    return c;
  }

  // BCE: h = sigma(z) sigma(-z) / d, c = sum h (g diag G), u = a h tanh(-z/2) (g diag G).
  RELFLAT_INLINE T sigmoid_terms(const T* z, T* u, T a, T gi) const {
    T c = 0;
    for (int64_t s = 0; s < d; ++s) {
      const T curvature = bce_curvature(z[s], d);
      const T v = gi * mat[s];
      c += curvature * v;
      u[s] = a * curvature * std::tanh(T(-0.5) * z[s]) * v;
      block[s * d + s] += gi * a * curvature;
    }
    return c;
  }
};

template <typename T>
void fused_backward(const at::Tensor& g, const at::Tensor& features, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, LossCode loss, const at::Tensor& mat,
                    at::Tensor& grad_features, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t n = features.size(0), m = features.size(1), d = weight.size(0);
  const int64_t width = d * m + d + d * d;  // per thread: gw, gb, block
  at::Tensor partial = at::zeros({at::get_num_threads(), width}, features.options());
  T* part = partial.data_ptr<T>();
  const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  at::parallel_for(0, n, 32, [&](int64_t begin, int64_t end) {
    T* mine = part + at::get_thread_num() * width;
    run_best_isa(BackwardRows<T>{features.data_ptr<T>(), weight.data_ptr<T>(), b, g.data_ptr<T>(), mat.data_ptr<T>(),
                                 m, d, loss == kCrossEntropy, begin, end, grad_features.data_ptr<T>(), mine,
                                 mine + d * m, mine + d * m + d});
  });
  const at::Tensor sums = partial.size(0) == 1 ? partial.squeeze(0) : partial.sum(0);
  const at::Tensor block = sums.narrow(0, d * m + d, d * d).view({d, d});
  grad_weight = at::addmm(sums.narrow(0, 0, d * m).view({d, m}), block, weight, /*beta=*/1, /*alpha=*/2);
  grad_bias = bias.has_value() ? sums.narrow(0, d * m, d).clone() : at::empty({0}, features.options());
}

void row_pass_cpu(RowPassArgs& args) {
  AT_DISPATCH_FLOATING_TYPES(args.h.scalar_type(), "last_layer_flatness_backward_cpu",
                             [&] { row_pass_kernel<scalar_t>(args); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> last_layer_flatness_backward_cpu(
    const at::Tensor& grad_per_sample, const at::Tensor& grad_block, const at::Tensor& features,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::string_view loss) {
  const LossCode code = parse_loss(loss);
  if (code != kMse && weight.size(0) <= kSmallHeadMaxOutputs && grad_block.numel() == 0 && grad_per_sample.numel() > 0) {
    check_backward_args(grad_per_sample, grad_block, features, weight, bias);
    const at::Tensor f = features.contiguous(), w = weight.contiguous(), g = grad_per_sample.contiguous();
    const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
    const at::Tensor mat = head_geometry(w, code);
    at::Tensor grad_features = at::empty_like(f), grad_weight, grad_bias;
    AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "last_layer_flatness_backward_cpu", [&] {
      fused_backward<scalar_t>(g, f, w, b, code, mat, grad_features, grad_weight, grad_bias);
    });
    return {grad_features, grad_weight, grad_bias};
  }
  return last_layer_flatness_backward_impl(grad_per_sample, grad_block, features, weight, bias, loss, row_pass_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CPU, m) { m.impl("last_layer_flatness_backward", &last_layer_flatness_backward_cpu); }

}  // namespace relflat
