// The backward of last_layer_flatness, shared by both backends: GEMMs and reductions through ATen
// (on the tensors' device and current stream) around one backend-specific fused row pass.
//
// With upstream gradients g (n,) for per_sample and Gamma (d, d) for block_sum, the op's outputs
// enter the loss as L = sum_i a_i <M_i, Hz_i> with a_i = ||phi_i||^2 and M_i = g_i G + sym(Gamma),
// G = W W^T. Writing c_i = <M_i, Hz_i> and u_i = d c_i / d z_i (M fixed):
//   dL/dphi_i = 2 c_i phi_i + a_i W^T u_i
//   dL/db     = sum_i a_i u_i
//   dL/dW     = sum_i a_i u_i phi_i^T + 2 (sum_i g_i a_i Hz_i) W      (G = W W^T depends on W)
// Cross entropy, with D_M[s, t] = M_ss + M_tt - 2 M_st (so D_{M_i} = g_i D_G + D_Gamma):
//   c_i = 1/2 p^T D_M p  and  u_i = p o (D_M p - 2 c_i): non-negative sums and one difference of
//   comparable size, no cancellation at confident rows (c_i is O(1 - p_k) and so is each term).
// BCE (Hz = diag(h)/d, h = sigma(z) sigma(-z)): c_i = sum_s h_s M_ss / d,
//   u_is = h_s tanh(-z_s/2) M_ss / d  (tanh(-z/2) = sigma(-z) - sigma(z), without the difference).
// MSE (Hz = 2/d I): c_i = 2/d tr(M_i), u_i = 0.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common.h"

namespace relflat {

// What the backend's fused row pass reads and writes. For each row i, with
// v_s = g_i * qg[i, s] + qgamma[i, s] (row strides may be 0: one row shared by all samples):
//   cross entropy (h = softmax rows): c = 1/2 sum_s h_s v_s,  u_s = h_s (v_s - 2c)
//   BCE (h = sigma(z) sigma(-z) / d, slope = tanh(-z/2)): c = sum_s h_s v_s,  u_s = h_s slope_s v_s
// and writes a_u[i, s] = a_i u_s and two_c[i] = 2c.
struct RowPassArgs {
  LossCode loss;
  at::Tensor h, slope, qg, qgamma, g, a;  // qgamma may be undefined (no block gradient)
  int64_t qg_stride, qgamma_stride;
  at::Tensor a_u, two_c;
};

// Checks the gradients' shapes against the forward's inputs; an empty grad means "none".
inline void check_backward_args(const at::Tensor& grad_per_sample, const at::Tensor& grad_block,
                                const at::Tensor& features, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  check_last_layer_args(features, weight, bias);
  check_float_matrix(grad_per_sample, "grad_per_sample", 1);
  check_float_matrix(grad_block, "grad_block", 2);
  check_same(grad_per_sample, features, "grad_per_sample");
  check_same(grad_block, features, "grad_block");
  const int64_t n = features.size(0), d = weight.size(0);
  TORCH_CHECK(grad_per_sample.numel() == 0 || grad_per_sample.size(0) == n,
              "grad_per_sample must be (", n, ",) or empty, got ", grad_per_sample.sizes());
  TORCH_CHECK(grad_block.numel() == 0 || (grad_block.size(0) == d && grad_block.size(1) == d),
              "grad_block must be (", d, ", ", d, ") or empty, got ", grad_block.sizes());
}

// sum_i beta_i Hz_i (d, d) from the rows h, for weights beta of any sign (the forward's block sum
// takes square roots of non-negative weights); cross entropy's diagonal from the accurate 1 - p.
inline at::Tensor weighted_block(const at::Tensor& h, const at::Tensor& beta, LossCode loss, int64_t d) {
  if (loss == kMse) return at::eye(d, beta.options()) * (beta.sum() * (2.0 / d));
  const at::Tensor weighted = h * beta.unsqueeze(1);
  if (loss != kCrossEntropy) return at::diag(weighted.sum(0));
  at::Tensor block = at::mm(weighted.t(), h).neg_();
  block.diagonal().copy_((weighted * softmax_complement(h)).sum(0));
  return block;
}

// D_M[s, t] = M_ss + M_tt - 2 M_st for a symmetric M of any sign (no clamping, unlike
// squared_distances, whose M = W W^T is positive semi-definite).
inline at::Tensor distance_form(const at::Tensor& sym) {
  const at::Tensor diag = sym.diagonal();
  at::Tensor dist = diag.unsqueeze(1) + diag.unsqueeze(0) - 2 * sym;
  dist.fill_diagonal_(0);
  return dist;
}

template <typename RowPass>
std::tuple<at::Tensor, at::Tensor, at::Tensor> last_layer_flatness_backward_impl(
    const at::Tensor& grad_per_sample_in, const at::Tensor& grad_block_in, const at::Tensor& features_in,
    const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in, c10::string_view loss_name,
    RowPass row_pass) {
  check_backward_args(grad_per_sample_in, grad_block_in, features_in, weight_in, bias_in);
  const LossCode loss = parse_loss(loss_name);
  const at::Tensor features = features_in.contiguous(), weight = weight_in.contiguous();
  const int64_t n = features.size(0), d = weight.size(0);
  const auto opts = features.options();
  const bool has_g = grad_per_sample_in.numel() > 0, has_gamma = grad_block_in.numel() > 0;
  const at::Tensor g = has_g ? grad_per_sample_in.contiguous() : at::zeros({n}, opts);
  const at::Tensor gamma = has_gamma ? (grad_block_in + grad_block_in.t()) * 0.5 : at::Tensor();
  const at::Tensor a = features.pow(2).sum(1);
  at::Tensor a_u, two_c;
  at::Tensor beta_block;  // sum_i g_i a_i Hz_i, for G's dependence on W
  if (loss == kMse) {
    const at::Tensor trace = weight.pow(2).sum() * (2.0 / d);
    two_c = 2 * (g * trace + (has_gamma ? gamma.trace() * (2.0 / d) : at::zeros({}, opts)));
    a_u = at::zeros({n, d}, opts);
    beta_block = weighted_block(at::Tensor(), g * a, loss, d);
  } else {
    at::Tensor z = bias_in.has_value() ? at::addmm(*bias_in, features, weight.t()) : at::mm(features, weight.t());
    RowPassArgs args{loss};
    args.g = g;
    args.a = a;
    if (loss == kCrossEntropy) {
      args.h = at::softmax(z, 1);
      args.qg = at::mm(args.h, squared_distances(at::mm(weight, weight.t())));
      args.qg_stride = d;
      if (has_gamma) {
        args.qgamma = at::mm(args.h, distance_form(gamma));
        args.qgamma_stride = d;
      }
    } else {
      args.h = at::sigmoid(z).mul_(at::sigmoid(-z)).div_(d);
      args.slope = at::tanh(z * -0.5);
      args.qg = weight.pow(2).sum(1).contiguous();
      args.qg_stride = 0;
      if (has_gamma) {
        args.qgamma = gamma.diagonal().contiguous();
        args.qgamma_stride = 0;
      }
    }
    args.a_u = at::empty({n, d}, opts);
    args.two_c = at::empty({n}, opts);
    row_pass(args);
    a_u = args.a_u;
    two_c = args.two_c;
    beta_block = weighted_block(args.h, g * a, loss, d);
  }
  at::Tensor grad_features = at::addmm(features * two_c.unsqueeze(1), a_u, weight);
  at::Tensor grad_weight = at::addmm(at::mm(beta_block, weight), a_u.t(), features, /*beta=*/2, /*alpha=*/1);
  at::Tensor grad_bias = bias_in.has_value() ? a_u.sum(0) : at::empty({0}, opts);
  return {grad_features, grad_weight, grad_bias};
}

}  // namespace relflat
