// CPU closed-form last-layer flatness, in three steps that never form anything of size n*d*d:
// 1. logits (n, d) and squared feature norms. Few outputs (d <= 32): a register-blocked loop that
//    reads each feature row once (BLAS is slow for such skinny products); many outputs: BLAS.
// 2. softmax / sigmoid through ATen's vectorized kernels, in place (when only the block sum is
//    asked for, as for wide heads, the softmax is taken inside the block's pass instead).
// (Batches of up to 4096 rows with d <= 32, and cross entropy with d < 16 at any batch size: one
//  pass over tiles of rows instead, SmallBatchTerms, since there the fixed costs of the steps below,
//  or ATen's softmax over short rows, dominate; the block sum, if asked, from its rows.)
// 3. one pass per row for <G, Hz_i>: cross entropy as 1/2 p^T D p (D[s,t] = ||w_s - w_t||^2, no
//    cancellation at confident rows; inline for d <= 64, else from the GEMM P D), or, when m < d,
//    the argmax-centred form from the GEMM (P - e_k) W (common.h).
// The row loops are kernels for run_best_isa (simd.h): AVX2+FMA or the baseline ISA at run time.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../common.h"
#include "simd.h"
#include "small_head.h"

namespace relflat {
namespace {

constexpr int64_t kRegisterBlockedMaxOutputs = 32;

// logits[i] = bias + x_i W^T and sq_norms[i] = ||x_i||^2 for rows [begin, end), W^T zero-padded
// to (m, DP) (DP <= 32).
template <typename T, int DP>
struct LogitsRows {
  const T* features;
  int64_t m;
  const T* weight_t_pad;
  const T* bias_pad;
  int64_t d, begin, end;
  T* logits;
  T* sq_norms;

  template <bool kAvx2>
  RELFLAT_INLINE void run() const {
    int64_t i = begin;
    for (; i + kRowsPerTile <= end; i += kRowsPerTile)
      logits_tile<T, DP, kRowsPerTile>(features + i * m, m, weight_t_pad, bias_pad, d, logits + i * d, d,
                                        sq_norms + i);
    for (; i < end; ++i) logits_tile<T, DP, 1>(features + i * m, m, weight_t_pad, bias_pad, d, logits + i * d, d, sq_norms + i);
  }
};

// per_sample[i] = sq_norms[i] <G, Hz_i> for rows [begin, end) of h already holding p_i (cross
// entropy, `quadratic`: 1/2 p^T D p with mat = D) or the BCE curvatures (h . diag(G), mat = diag(G)).
// DP > 0: mat zero-padded to (d, DP) or (DP,), so the inner loops have a fixed length (d <= DP <= 32);
// DP = 0: unpadded, for d <= kInlineQuadraticMaxOutputs (and any d for BCE).
template <typename T, int DP>
struct TermsRows {
  const T* h;
  const T* mat;
  const T* sq_norms;
  int64_t d;
  bool quadratic;
  int64_t begin, end;
  T* per_sample;

  template <bool kAvx2>
  RELFLAT_INLINE void run() const {
    for (int64_t i = begin; i < end; ++i) per_sample[i] = sq_norms[i] * (DP > 0 ? padded_term(i) : term(i));
  }

  RELFLAT_INLINE T padded_term(int64_t i) const {
    constexpr int kWidth = DP > 0 ? DP : 1;
    T p[kWidth] = {};
    for (int64_t s = 0; s < d; ++s) p[s] = h[i * d + s];
    T out = 0;
    if (quadratic) {
      T dp[kWidth] = {};  // D p
      for (int64_t t = 0; t < d; ++t) {
#pragma omp simd
        for (int s = 0; s < kWidth; ++s) dp[s] += mat[t * kWidth + s] * p[t];
      }
#pragma omp simd reduction(+ : out)
      for (int s = 0; s < kWidth; ++s) out += p[s] * dp[s];
      return out * T(0.5);
    }
#pragma omp simd reduction(+ : out)
    for (int s = 0; s < kWidth; ++s) out += p[s] * mat[s];
    return out;
  }

  RELFLAT_INLINE T term(int64_t i) const {
    const T* row = h + i * d;
    if (!quadratic) return dot(row, mat, d);
    T out = 0;
    for (int64_t s = 0; s < d; ++s) out += row[s] * dot(mat + s * d, row, d);
    return out * T(0.5);
  }
};

// Small batches (a training step's penalty): per_sample[i] for rows [begin, end) in one pass over
// tiles of rows, from W^T padded to (m, DP) and the head's geometry mat (D for cross entropy,
// ||w_s||^2 for BCE; small_head.h).
template <typename T, int DP>
struct SmallBatchTerms {
  const T* phi;
  const T* weight_t_pad;
  const T* bias_pad;
  const T* mat;
  int64_t m, d;
  bool cross_entropy;
  int64_t begin, end;
  T* per_sample;
  T* h;         // (n, d): the softmax rows, or sigma(z) sigma(-z) / d, for the block sum
  T* sq_norms;  // (n,)

  template <bool kAvx2>
  RELFLAT_INLINE void run() const {
    int64_t i = begin;
    for (; i + kRowsPerTile <= end; i += kRowsPerTile) tile<kAvx2, kRowsPerTile>(i);
    for (; i < end; ++i) tile<kAvx2, 1>(i);
  }

  template <bool kAvx2, int R>
  RELFLAT_INLINE void tile(int64_t i) const {
    T z[R][DP], dp[DP];
    logits_tile<T, DP, R>(phi + i * m, m, weight_t_pad, bias_pad, d, &z[0][0], DP, sq_norms + i);
    for (int r = 0; r < R; ++r) {
      T* hi = h + (i + r) * d;
      T c = 0;
      if (cross_entropy) {
        T p[DP] = {};
        softmax_row<T, kAvx2>(z[r], p, d);
        c = half_quadratic<T, DP>(mat, p, d, dp);
        std::copy(p, p + d, hi);
      } else {
        for (int64_t s = 0; s < d; ++s) c += (hi[s] = bce_curvature(z[r][s], d)) * mat[s];
      }
      per_sample[i + r] = sq_norms[i + r] * c;
    }
  }
};

// Up to this many rows (and kSmallHeadMaxOutputs outputs) the per-sample terms come from
// SmallBatchTerms: no ATen call but the output's allocation. Above it, the register-blocked
// logits and the row pass below, whose fixed costs are then paid back.
constexpr int64_t kSmallBatchRows = 4096;
// Cross entropy with fewer outputs than this takes that pass at any batch size: ATen's softmax
// over rows shorter than 16 is a scalar loop (90 ns a row at d = 10 against 10 at d = 16, torch
// 2.13 on 2 cores), which made it 70% of a LeNet head's call.
constexpr int64_t kAtenFastSoftmaxOutputs = 16;

// Logits and squared norms with the register-blocked loop (d <= 32).
template <typename T>
void register_blocked_logits(const at::Tensor& features, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::Tensor& logits, at::Tensor& sq_norms) {
  const int64_t n = features.size(0), m = features.size(1), d = weight.size(0);
  const T* x = features.data_ptr<T>();
  T* out = logits.data_ptr<T>();
  T* norms = sq_norms.data_ptr<T>();
  with_padded_width(d, [&](auto width) {
    constexpr int DP = decltype(width)::value;
    const PaddedHead<T> head(weight.data_ptr<T>(), bias.has_value() ? bias->data_ptr<T>() : nullptr, d, m, DP);
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      run_best_isa(LogitsRows<T, DP>{x, m, head.weight_t.data(), head.bias.data(), d, begin, end, out, norms});
    });
  });
}

// per_sample[i] = a_i * 1/2 <q_i, p_i> with q = P D (n, d).
template <typename T>
void half_quadratic_from_gemm(const at::Tensor& p, const at::Tensor& q, const at::Tensor& sq_norms,
                              at::Tensor& per_sample) {
  const int64_t n = p.size(0), d = p.size(1);
  const T* pp = p.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* a = sq_norms.data_ptr<T>();
  T* out = per_sample.data_ptr<T>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = a[i] * T(0.5) * dot(qp + i * d, pp + i * d, d);
  });
}

// Cross entropy's block sum sum_i a_i (diag(p_i) - p_i p_i^T) in one pass over the rows of
// softmax probabilities, or of logits with the softmax taken in the same pass. Each row (in
// place) becomes q_i = sqrt(a_i) p_i for the symmetric product; the diagonal
// sum_i a_i p_is (1 - p_is) goes to a per-thread sum, with 1 - p_k (k the row's largest entry)
// taken as the sum of the other entries. The same as block_sum_from_rows (common.h, which CUDA
// uses), fused into one pass for the CPU, where the softmax and the eight elementwise passes of
// the generic form cost more than the GEMM (bench/RESULTS.md).
template <typename T>
struct CrossEntropyBlockRows {
  T* rows;  // (n, d): logits or probabilities in, q out
  bool logits;
  const T* sq_norms;
  int64_t d, begin, end;
  double* diag;  // (d,) this thread's diagonal sum, in float64: a float32 one drifts over many rows

  template <bool kAvx2>
  RELFLAT_INLINE void run() const {
    for (int64_t i = begin; i < end; ++i) {
      T* row = rows + i * d;
      const int64_t k = std::max_element(row, row + d) - row;
      // From logits, row becomes exp(z - z_k), p = row * inverse.
      const T inverse = logits ? T(1) / ExpShiftedSum<T, kAvx2>::apply(row, d, row[k]) : T(1);
      T rest = 0;  // the entries other than k, summed (never 1 - p_k)
#pragma omp simd reduction(+ : rest)
      for (int64_t t = 0; t < k; ++t) rest += row[t];
#pragma omp simd reduction(+ : rest)
      for (int64_t t = k + 1; t < d; ++t) rest += row[t];
      const T ai = sq_norms[i], root = std::sqrt(ai) * inverse;
#pragma omp simd
      for (int64_t s = 0; s < k; ++s) {
        const T p = row[s] * inverse;
        diag[s] += double(ai * p * (T(1) - p));
      }
      diag[k] += double(ai * (row[k] * inverse) * (rest * inverse));  // p_k times the accurate 1 - p_k
#pragma omp simd
      for (int64_t s = k + 1; s < d; ++s) {
        const T p = row[s] * inverse;
        diag[s] += double(ai * p * (T(1) - p));
      }
#pragma omp simd
      for (int64_t s = 0; s < d; ++s) row[s] *= root;
    }
  }
};

// The block from the rows (n, d) of logits or probabilities, which it overwrites.
at::Tensor cross_entropy_block(at::Tensor& rows, bool logits, const at::Tensor& sq_norms) {
  const int64_t n = rows.size(0), d = rows.size(1);
  at::Tensor partial = at::zeros({at::get_num_threads(), d}, rows.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "cross_entropy_block", [&] {
    using T = scalar_t;
    T* data = rows.data_ptr<T>();
    const T* a = sq_norms.data_ptr<T>();
    double* part = partial.data_ptr<double>();
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      run_best_isa(CrossEntropyBlockRows<T>{data, logits, a, d, begin, end, part + at::get_thread_num() * d});
    });
  });
  at::Tensor block = symmetric_gram(rows).neg_();
  block.diagonal().copy_(partial.sum(0));
  return block;
}

void squared_norms(const at::Tensor& features, at::Tensor& sq_norms) {
  const int64_t n = features.size(0), m = features.size(1);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "squared_norms", [&] {
    const scalar_t* phi = features.data_ptr<scalar_t>();
    scalar_t* a = sq_norms.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1024, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) a[i] = dot(phi + i * m, phi + i * m, m);
    });
  });
}

// The block sum from h (the softmax rows, or the BCE curvatures); cross entropy overwrites h.
at::Tensor block_sum(at::Tensor& h, const at::Tensor& sq_norms, int64_t loss) {
  return loss == kCrossEntropy ? cross_entropy_block(h, /*logits=*/false, sq_norms)
                               : block_sum_from_rows(h, sq_norms, loss);
}

std::tuple<at::Tensor, at::Tensor> last_layer_flatness_cpu(const at::Tensor& features_in,
                                                           const at::Tensor& weight_in,
                                                           const std::optional<at::Tensor>& bias_in,
                                                           c10::string_view loss_name, bool block_trace, bool want_per_sample) {
  check_last_layer_args(features_in, weight_in, bias_in);
  const LossCode loss = parse_loss(loss_name);
  const at::Tensor features = features_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t n = features.size(0), m = features.size(1), d = weight.size(0);
  const auto opts = features.options();
  at::Tensor sq_norms = at::empty({n}, opts);
  at::Tensor per_sample = at::empty({n}, opts);
  at::Tensor block = at::empty({0, 0}, opts);

  if (loss == kMse) {  // Hz = (2/d) I: per_sample = a_i (2/d) ||W||_F^2, no logits needed.
    squared_norms(features, sq_norms);
    per_sample = want_per_sample ? sq_norms * (weight.pow(2).sum() * (2.0 / d)) : at::empty({0}, opts);
    if (block_trace || !want_per_sample) block = at::eye(d, opts) * (sq_norms.sum() * (2.0 / d));
    return {per_sample, block};
  }

  if (d <= kSmallHeadMaxOutputs && (n <= kSmallBatchRows || (loss == kCrossEntropy && d < kAtenFastSoftmaxOutputs))) {
    at::Tensor h = at::empty({n, d}, opts);
    const std::optional<at::Tensor> b = bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous())
                                                            : std::nullopt;
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "last_layer_flatness_cpu", [&] {
      using T = scalar_t;
      with_padded_width(d, [&](auto width) {
        constexpr int DP = decltype(width)::value;
        const std::vector<T> mat = head_geometry<T, DP>(weight.data_ptr<T>(), d, m, loss);
        const PaddedHead<T> head(weight.data_ptr<T>(), b.has_value() ? b->data_ptr<T>() : nullptr, d, m, DP);
        at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
          run_best_isa(SmallBatchTerms<T, DP>{features.data_ptr<T>(), head.weight_t.data(), head.bias.data(), mat.data(),
                                              m, d, loss == kCrossEntropy, begin, end, per_sample.data_ptr<T>(),
                                              h.data_ptr<T>(), sq_norms.data_ptr<T>()});
        });
      });
    });
    if (block_trace || !want_per_sample) block = block_sum(h, sq_norms, loss);
    return {want_per_sample ? per_sample : at::empty({0}, opts), block};
  }
  const at::Tensor gdiag = weight.pow(2).sum(1);  // G = W W^T only where D needs it
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  // Step 1: logits and squared norms.
  at::Tensor h;
  if (d <= kRegisterBlockedMaxOutputs) {
    h = at::empty({n, d}, opts);
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "last_layer_flatness_cpu", [&] {
      register_blocked_logits<scalar_t>(features, weight, bias, h, sq_norms);
    });
  } else {
    h = bias.has_value() ? at::addmm(*bias, features, weight.t()) : at::mm(features, weight.t());
    squared_norms(features, sq_norms);
  }
  // Only the block sum, when the caller contracts it with G itself (wide heads): for cross entropy
  // the softmax is taken inside the block's pass over the logits.
  if (!want_per_sample && loss == kCrossEntropy)
    return {at::empty({0}, opts), cross_entropy_block(h, /*logits=*/true, sq_norms)};
  // Step 2: h = softmax(z) for cross entropy, sigma(z) sigma(-z)/d for BCE.
  if (loss == kCrossEntropy) {
    at::_softmax_out(h, h, 1, false);
  } else {
    h = at::sigmoid(h).mul_(at::sigmoid(-h)).div_(d);
  }
  // Step 3: per-sample terms (or only the block sum).
  const bool quadratic = loss == kCrossEntropy;
  if (!want_per_sample) {
    return {at::empty({0}, opts), block_sum(h, sq_norms, loss)};
  } else if (quadratic && d > kInlineQuadraticMaxOutputs) {
    if (m < d) {  // the cheaper GEMM: n*d*m multiply-adds instead of n*d*d
      per_sample = centred_cross_entropy_terms(h, weight, gdiag).mul_(sq_norms);
    } else {
      const at::Tensor q = at::mm(h, squared_distances(at::mm(weight, weight.t())));
      AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "last_layer_flatness_cpu",
                                 [&] { half_quadratic_from_gemm<scalar_t>(h, q, sq_norms, per_sample); });
    }
  } else {
    const bool padded = d <= kRegisterBlockedMaxOutputs;
    const int64_t dp = padded_width(d);
    const at::Tensor mat = quadratic ? squared_distances(at::mm(weight, weight.t())) : gdiag;
    at::Tensor mat_pad = mat;
    if (padded) {
      mat_pad = quadratic ? at::zeros({d, dp}, opts) : at::zeros({dp}, opts);
      mat_pad.narrow(-1, 0, d).copy_(mat);
    }
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "last_layer_flatness_cpu", [&] {
      using T = scalar_t;
      const T* rows = h.data_ptr<T>();
      const T* norms = sq_norms.data_ptr<T>();
      const T* mat_data = mat_pad.data_ptr<T>();
      T* out = per_sample.data_ptr<T>();
      at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
        if (!padded) run_best_isa(TermsRows<T, 0>{rows, mat_data, norms, d, quadratic, begin, end, out});
        else if (dp == 8) run_best_isa(TermsRows<T, 8>{rows, mat_data, norms, d, quadratic, begin, end, out});
        else if (dp == 16) run_best_isa(TermsRows<T, 16>{rows, mat_data, norms, d, quadratic, begin, end, out});
        else run_best_isa(TermsRows<T, 32>{rows, mat_data, norms, d, quadratic, begin, end, out});
      });
    });
  }
  if (block_trace) block = block_sum(h, sq_norms, loss);
  return {per_sample, block};
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CPU, m) { m.impl("last_layer_flatness", &last_layer_flatness_cpu); }

}  // namespace relflat
