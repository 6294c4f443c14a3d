// CPU backward of last_layer_flatness. Few outputs (d <= 32) and no block gradient (the penalty's
// case): one fused pass over tiles of 4 rows, each row read once: logits, softmax / sigmoid, c_i
// and u_i, the feature gradient rows, and per-thread sums for the weight and bias gradients and
// for sum_i g_i a_i Hz_i; then one d x d x m product. Otherwise the shared ATen driver
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
// per-sample gradients only), a kernel for run_best_isa (simd.h), over tiles of R rows: their
// logits from W^T padded to (m, DP), c_i and u_i per row, then the feature gradient rows and this
// thread's weight-gradient sums in one sweep over the columns, so that W and the sums are read
// once per tile, not once per row. mat: D = ||w_s - w_t||^2 (d, d) for cross entropy, diag(G) (d,)
// for BCE. Writes the feature gradient rows and adds to this thread's sums: gw (d, m) = sum a u
// phi^T, gb (d) = sum a u, block (d, DP) = sum g a Hz (rows padded to DP for fixed-width updates).
template <typename T, int DP>
struct BackwardRows {
  static constexpr int kChunk = 32 / sizeof(T);  // one 256-bit register of columns
  const T* phi;
  const T* w;
  const T* weight_t_pad;
  const T* bias_pad;
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
    int64_t i = begin;
    for (; i + kRowsPerTile <= end; i += kRowsPerTile) tile<kAvx2, kRowsPerTile>(i);
    for (; i < end; ++i) tile<kAvx2, 1>(i);
  }

  template <bool kAvx2, int R>
  RELFLAT_INLINE void tile(int64_t i) const {
    T z[R][DP], u[R][DP], a[R], two_c[R];
    const T* x = phi + i * m;
    logits_tile<T, DP, R>(x, m, weight_t_pad, bias_pad, d, &z[0][0], DP, a);
    for (int r = 0; r < R; ++r) {
      const T c = cross_entropy ? softmax_terms<kAvx2>(z[r], u[r], a[r], g[i + r]) : sigmoid_terms(z[r], u[r], a[r], g[i + r]);
      two_c[r] = 2 * c;
      for (int64_t s = 0; s < d; ++s) gb[s] += u[r][s];
    }
    int64_t j = 0;
    for (; j + kChunk <= m; j += kChunk) columns<R>(x, gf + i * m, u, two_c, j, kChunk);
    if (j < m) columns<R>(x, gf + i * m, u, two_c, j, m - j);
  }

  // Columns [j, j + len) of the tile: gf_r = 2 c_r x_r + sum_s u_rs w_s, gw_s += sum_r u_rs x_r.
  template <int R>
  RELFLAT_INLINE void columns(const T* x, T* gfr, const T (&u)[R][DP], const T* two_c, int64_t j, int64_t len) const {
    T acc[R][kChunk], xs[R][kChunk];
    for (int r = 0; r < R; ++r)
      for (int64_t jj = 0; jj < len; ++jj) {
        xs[r][jj] = x[r * m + j + jj];
        acc[r][jj] = two_c[r] * xs[r][jj];
      }
    for (int64_t s = 0; s < d; ++s) {
      const T* __restrict__ ws = w + s * m + j;
      T* __restrict__ gws = gw + s * m + j;
      T sum[kChunk];
      for (int64_t jj = 0; jj < len; ++jj) sum[jj] = gws[jj];
      for (int r = 0; r < R; ++r) {
        const T us = u[r][s];
#pragma omp simd
        for (int64_t jj = 0; jj < len; ++jj) {
          acc[r][jj] += us * ws[jj];
          sum[jj] += us * xs[r][jj];
        }
      }
      for (int64_t jj = 0; jj < len; ++jj) gws[jj] = sum[jj];
    }
    for (int r = 0; r < R; ++r)
      for (int64_t jj = 0; jj < len; ++jj) gfr[r * m + j + jj] = acc[r][jj];
  }

  // Cross entropy: c = 1/2 p^T (g D) p, u = a p o (g D p - 2c); block += g a (diag(p) - p p^T)
  // with the diagonal from the accurate 1 - p (the other entries' sum at the row's maximum k).
  template <bool kAvx2>
  RELFLAT_INLINE T softmax_terms(const T* z, T* u, T a, T gi) const {
    T h[DP] = {}, dp[DP];
    const int64_t k = softmax_row<T, kAvx2>(z, h, d);
    const T c = gi * half_quadratic<T, DP>(mat, h, d, dp);
    for (int64_t s = 0; s < d; ++s) u[s] = a * h[s] * (gi * dp[s] - 2 * c);
    T rest = 0;
    for (int64_t t = 0; t < d; ++t) rest += t == k ? T(0) : h[t];
    const T beta = gi * a;
    for (int64_t s = 0; s < d; ++s) {
      const T bs = beta * h[s];
      T* __restrict__ row = block + s * DP;
      const T diagonal = row[s];
#pragma omp simd
      for (int t = 0; t < DP; ++t) row[t] -= bs * h[t];  // h is zero beyond d
      row[s] = diagonal + bs * (s == k ? rest : T(1) - h[s]);  // never p_s - p_s^2: cancels at k
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
      block[s * DP + s] += gi * a * curvature;
    }
    return c;
  }
};

// Per-thread sums (gw, gb, block), added up after the pass; then grad_weight = gw + 2 block W.
template <typename T>
void fused_backward(const at::Tensor& g, const at::Tensor& features, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, LossCode loss, at::Tensor& grad_features,
                    at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t n = features.size(0), m = features.size(1), d = weight.size(0);
  const int64_t padded_block = d * kSmallHeadMaxOutputs;  // (d, DP) with DP <= 32
  const int64_t width = d * m + d + padded_block;  // per thread: gw, gb, block
  const int threads = at::get_num_threads();
  std::vector<T> partial(threads * width, T(0));
  const T* w = weight.data_ptr<T>();
  const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  with_padded_width(d, [&](auto padded) {
    constexpr int DP = decltype(padded)::value;
    const std::vector<T> mat = head_geometry<T, DP>(w, d, m, loss);
    const PaddedHead<T> head(w, b, d, m, DP);
    at::parallel_for(0, n, 32, [&](int64_t begin, int64_t end) {
      T* mine = partial.data() + at::get_thread_num() * width;
      run_best_isa(BackwardRows<T, DP>{features.data_ptr<T>(), w, head.weight_t.data(), head.bias.data(), g.data_ptr<T>(),
                                       mat.data(), m, d, loss == kCrossEntropy, begin, end,
                                       grad_features.data_ptr<T>(), mine, mine + d * m, mine + d * m + d});
    });
  });
  T* sums = partial.data();
  for (int t = 1; t < threads; ++t) {
    const T* theirs = partial.data() + t * width;
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) sums[k] += theirs[k];
  }
  const T* block = sums + d * m + d;
  const int64_t block_stride = padded_width(d);
  T* gw = grad_weight.data_ptr<T>();
  for (int64_t s = 0; s < d; ++s) {
    T* __restrict__ out = gw + s * m;
    std::copy(sums + s * m, sums + (s + 1) * m, out);
    for (int64_t t = 0; t < d; ++t) {
      const T coefficient = 2 * block[s * block_stride + t];
      const T* __restrict__ wt = w + t * m;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) out[j] += coefficient * wt[j];
    }
  }
  if (bias.has_value()) std::copy(sums + d * m, sums + d * m + d, grad_bias.data_ptr<T>());
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
    at::Tensor grad_features = at::empty_like(f), grad_weight = at::empty_like(w);
    at::Tensor grad_bias = at::empty({b.has_value() ? w.size(0) : 0}, f.options());
    AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "last_layer_flatness_backward_cpu", [&] {
      fused_backward<scalar_t>(g, f, w, b, code, grad_features, grad_weight, grad_bias);
    });
    return {grad_features, grad_weight, grad_bias};
  }
  return last_layer_flatness_backward_impl(grad_per_sample, grad_block, features, weight, bias, loss, row_pass_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CPU, m) { m.impl("last_layer_flatness_backward", &last_layer_flatness_backward_cpu); }

}  // namespace relflat
