// Every op's schema, defined once. Implementations: csrc/cpu/*.cpp and csrc/cuda/*.cu.
// Ops return sums over samples (not means) so that chunks and data batches add up.
#include <torch/library.h>

TORCH_LIBRARY(relflat, m) {
  // Closed-form last-layer flatness: per_sample[i] = ||phi_i||^2 <W W^T, Hz_i> (unless per_sample is
  // false: then (0,)), and (on request) sum_i ||phi_i||^2 Hz_i (d, d); loss: "cross_entropy", "mse"
  // or "bce_with_logits". kappa = <W W^T, block_sum> / n when only the sum is needed: a symmetric
  // product, half the work of the per-sample terms for wide heads.
  m.def("last_layer_flatness(Tensor features, Tensor weight, Tensor? bias, str loss, bool block_trace,"
        " bool per_sample=True) -> (Tensor per_sample, Tensor block_sum)");
  // Its backward: the gradients of features, weight and bias (the last (0,) without a bias) for
  // upstream gradients of per_sample ((n,), or (0,) for none) and of block_sum ((d, d), or (0, 0)).
  m.def("last_layer_flatness_backward(Tensor grad_per_sample, Tensor grad_block, Tensor features,"
        " Tensor weight, Tensor? bias, str loss) -> (Tensor grad_features, Tensor grad_weight, Tensor grad_bias)");
  // per_sample[i] = sq_norms[i] <gram, hz[i]>_F, and (on request) sum_i sq_norms[i] hz[i] (d, k).
  m.def("contract_output_hessians(Tensor sq_norms, Tensor hz, Tensor gram, bool block_trace)"
        " -> (Tensor per_sample, Tensor block_sum)");
  // T[s, t] = Tr(H_{s,t}) of a dense (d*m, d*m) Hessian, and kappa = <W W^T, T>.
  m.def("dense_block_trace(Tensor hessian, Tensor weight) -> (Tensor kappa, Tensor block_trace)");
  // Gaussian KDE of each query under the keys whose split id differs from its own, for every split
  // r and bandwidth b (h_k = bandwidths[b] * key_scale[k]): logdens (R, B, nq) and the normalized
  // kernel-weighted sums of the keys' values wval (R, B, nq, c); -inf and 0 where no key is visible.
  m.def("gaussian_kernel_reduce(Tensor queries, Tensor keys, Tensor? values, Tensor bandwidths,"
        " Tensor? key_scale, Tensor? query_split, Tensor? key_split) -> (Tensor logdens, Tensor wval)");
}
