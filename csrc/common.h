// Shared declarations: the built-in losses, input checks and the per-backend entry points.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <tuple>

namespace relflat {

// The op schemas take the loss by name (relflat_ext/core/losses.py); kernels parse it once.
enum LossCode : int64_t { kCrossEntropy = 0, kMse = 1, kBceWithLogits = 2 };

inline LossCode parse_loss(c10::string_view name) {
  if (name == "cross_entropy") return kCrossEntropy;
  if (name == "mse") return kMse;
  TORCH_CHECK(name == "bce_with_logits", "loss must be \"cross_entropy\", \"mse\" or \"bce_with_logits\", got \"", std::string(name), "\"");
  return kBceWithLogits;
}

// Up to this many outputs the closed form evaluates p^T D p per row inline; above it a GEMM does.
constexpr int64_t kInlineQuadraticMaxOutputs = 64;

inline void check_float_matrix(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(),
              " but the other inputs have ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the other inputs are on ",
              ref.device());
}

// Argument checks shared by every backend (the Python wrappers check too; these guard direct calls).
inline void check_last_layer_args(const at::Tensor& features, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
  check_float_matrix(features, "features", 2);
  check_float_matrix(weight, "weight", 2);
  check_same(weight, features, "weight");
  TORCH_CHECK(weight.size(1) == features.size(1), "weight must be (d, m) with m = ", features.size(1),
              ", got ", weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1, "weight must be (d, m) with d >= 1 outputs, got ", weight.sizes());
  if (bias.has_value()) {
    check_float_matrix(*bias, "bias", 1);
    check_same(*bias, features, "bias");
    TORCH_CHECK(bias->size(0) == weight.size(0), "bias must be (", weight.size(0), "), got ", bias->sizes());
  }
}

inline void check_contract_args(const at::Tensor& sq_norms, const at::Tensor& hz, const at::Tensor& gram) {
  check_float_matrix(sq_norms, "sq_norms", 1);
  check_float_matrix(hz, "hz", 3);
  check_float_matrix(gram, "gram", 2);
  check_same(hz, sq_norms, "hz");
  check_same(gram, sq_norms, "gram");
  TORCH_CHECK(hz.size(0) == sq_norms.size(0) && hz.size(1) == gram.size(0) && hz.size(2) == gram.size(1),
              "hz must be (n, d, k) = (", sq_norms.size(0), ", ", gram.size(0), ", ", gram.size(1),
              "), got ", hz.sizes());
}

inline void check_dense_args(const at::Tensor& hessian, const at::Tensor& weight) {
  check_float_matrix(weight, "weight", 2);
  check_float_matrix(hessian, "hessian", 2);
  check_same(hessian, weight, "hessian");
  const int64_t dm = weight.numel();
  TORCH_CHECK(hessian.size(0) == dm && hessian.size(1) == dm, "hessian must be (d*m, d*m) = (", dm, ", ",
              dm, ") for weight of shape ", weight.sizes(), ", got ", hessian.sizes());
}

// Cross entropy without cancellation. At a confident row 1 - p_k rounds
// to 0, so nothing here subtracts from 1 or from p_k:
//   <G, diag(p) - p p^T> = 1/2 p^T D p,  D[s, t] = ||w_s - w_t||^2 (all terms >= 0), or, with
//   delta = p - e_k (k = argmax, delta_k = -sum_{t != k} p_t) and v = W^T delta:
//   <G, diag(p) - p p^T> = delta . diag(G) - 2 w_k . v - ||v||^2  (n*d*m work when m < d).

// D = ||w_s - w_t||^2 (d, d) from G: rounding relative to ||w||^2, not to the margin.
inline at::Tensor squared_distances(const at::Tensor& gram) {
  const at::Tensor sq = gram.diagonal();
  at::Tensor dist = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * gram).clamp_min_(0);
  dist.fill_diagonal_(0);
  return dist;
}

// Each probability row's largest entry k (n, 1) and the sum of its other entries (n, 1).
inline std::pair<at::Tensor, at::Tensor> winner_and_rest(const at::Tensor& p) {
  const at::Tensor k = p.argmax(1, /*keepdim=*/true);
  return {k, p.scatter(1, k, 0.0).sum(1, /*keepdim=*/true)};
}

// 1 - p for probability rows, with the row maximum's entry the sum of the other entries.
inline at::Tensor softmax_complement(const at::Tensor& p) {
  const auto [k, rest] = winner_and_rest(p);
  return (1 - p).scatter(1, k, rest);
}

// <G, diag(p_i) - p_i p_i^T> per row by the argmax-centred form (one n x d x m GEMM).
inline at::Tensor centred_cross_entropy_terms(const at::Tensor& p, const at::Tensor& weight,
                                              const at::Tensor& gdiag) {
  const auto [k, rest] = winner_and_rest(p);
  const at::Tensor delta = p.scatter(1, k, -rest);
  const at::Tensor v = at::mm(delta, weight);  // (n, m)
  const at::Tensor wk = weight.index_select(0, k.squeeze(1));
  return at::mv(delta, gdiag) - 2 * (wk * v).sum(1) - v.pow(2).sum(1);
}

// Q^T Q (d, d) from GEMMs over the tiles on and right of the diagonal, mirrored: (1/2 + 1/16) of
// a full GEMM's work with 8 tiles (BLAS has no SYRK in ATen). strip(out, i, rows) writes
// q[:, i:i+rows]^T q[:, i:] into out, a (rows, d - i) view of row stride d.
template <typename Strip>
inline at::Tensor symmetric_gram(const at::Tensor& q, const Strip& strip) {
  const int64_t d = q.size(1);
  const int64_t tile = std::max<int64_t>(64, (d + 7) / 8);
  at::Tensor out = at::empty({d, d}, q.options());
  for (int64_t i = 0; i < d; i += tile) {
    const int64_t rows = std::min(tile, d - i), rest = d - i - rows;
    at::Tensor part = out.narrow(0, i, rows).narrow(1, i, d - i);
    strip(part, i, rows);
    if (rest) out.narrow(0, i + rows, rest).narrow(1, i, rows).copy_(part.narrow(1, rows, rest).t());
  }
  return out;
}

// Columns [lo, hi) of Q^T Q into out by halves: the off-diagonal block is one square GEMM, mirrored,
// and each half recurses down to leaves of at most kGramLeaf columns, taken whole. About 0.55 of a
// full GEMM's work in GEMMs BLAS runs near its peak; the strips above took 0.69-0.89 of a full
// GEMM's time at d = 1000-4000 on the CPU, these 0.57-0.75 (bench/RESULTS.md). Halves are rounded
// to multiples of 64 columns, the GEMM kernels' blocking.
constexpr int64_t kGramLeaf = 192;

inline void gram_by_halves(const at::Tensor& q, at::Tensor& out, int64_t lo, int64_t hi) {
  const int64_t size = hi - lo;
  if (size <= kGramLeaf) {
    at::Tensor leaf = out.narrow(0, lo, size).narrow(1, lo, size);
    at::mm_out(leaf, q.narrow(1, lo, size).t(), q.narrow(1, lo, size));  // BLAS writes the view
    return;
  }
  const int64_t mid = lo + (size / 2 + 63) / 64 * 64;
  at::Tensor upper = out.narrow(0, lo, mid - lo).narrow(1, mid, hi - mid);
  at::mm_out(upper, q.narrow(1, lo, mid - lo).t(), q.narrow(1, mid, hi - mid));
  out.narrow(0, mid, hi - mid).narrow(1, lo, mid - lo).copy_(upper.t());
  gram_by_halves(q, out, lo, mid);
  gram_by_halves(q, out, mid, hi);
}

inline at::Tensor symmetric_gram(const at::Tensor& q) {
  at::Tensor out = at::empty({q.size(1), q.size(1)}, q.options());
  gram_by_halves(q, out, 0, q.size(1));
  return out;
}

// sum_i a_i Hz_i from the per-row h (n, d) of the closed form (softmax p for cross entropy,
// sigma(z) sigma(-z)/d for BCE). Cross entropy: -sum_i a_i p_i p_i^T off the diagonal and
// sum_i a_i p_is (1 - p_is) on it, with the accurate complement. Both backends use it (ATen ops
// run on the tensors' device and current stream).
// `gram` computes Q^T Q of the non-negative Q = sqrt(a) h (symmetric_gram, or the CUDA 3xTF32 one).
template <typename Gram>
inline at::Tensor block_sum_from_rows(const at::Tensor& h, const at::Tensor& sq_norms, int64_t loss, const Gram& gram) {
  const at::Tensor weighted = h * sq_norms.unsqueeze(1);
  if (loss != kCrossEntropy) return at::diag(weighted.sum(0));
  at::Tensor block = gram(h * sq_norms.sqrt().unsqueeze(1)).neg_();
  block.diagonal().copy_((weighted * softmax_complement(h)).sum(0));
  return block;
}

inline at::Tensor block_sum_from_rows(const at::Tensor& h, const at::Tensor& sq_norms, int64_t loss) {
  return block_sum_from_rows(h, sq_norms, loss, [](const at::Tensor& q) { return symmetric_gram(q); });
}

}  // namespace relflat
