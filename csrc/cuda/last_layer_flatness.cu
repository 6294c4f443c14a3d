// CUDA closed-form last-layer flatness.
// Few outputs (d <= 32): one fused kernel, a warp per row: squared norm and the d logits from one
// read of the feature row, then softmax/sigmoid and <G, Hz_i> in registers: 1/2 p^T D p for cross
// entropy (D[s,t] = ||w_s - w_t||^2 in shared memory; no cancellation at confident rows),
// h . diag(G) for BCE. Many outputs: the logits GEMM goes to cuBLAS (at::addmm), softmax/sigmoid
// to ATen, then either one warp-per-row kernel for the terms (1/2 <P D, P> from one more GEMM) or,
// when m < d, the argmax-centred form from the cheaper GEMM (P - e_k) W.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "warp.cuh"

namespace relflat {
namespace {

constexpr int kMaxFusedOutputs = 32;
constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ __forceinline__ T sigmoid_curvature(T z) {  // sigma(z) sigma(-z) without subtracting from 1
  const T e = exp(-fabs(z));
  return e / ((T(1) + e) * (T(1) + e));
}

// One warp per row; lane s < d owns output s after the reductions. mat (d, d): D for cross
// entropy, G for BCE (only its diagonal is read).
template <typename T, int D>
__global__ void fused_small_kernel(const T* __restrict__ features, const T* __restrict__ weight,
                                   const T* __restrict__ bias, const T* __restrict__ mat, int64_t n, int64_t m,
                                   int d, int loss, T* __restrict__ sq_norms, T* __restrict__ per_sample,
                                   T* __restrict__ h_out) {
  __shared__ T mat_s[D * D];
  for (int e = threadIdx.x; e < d * d; e += blockDim.x) mat_s[(e / d) * D + e % d] = mat[e];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= n) return;
  const T* x = features + row * m;
  T acc[D];
#pragma unroll
  for (int s = 0; s < D; ++s) acc[s] = T(0);
  T norm = 0;
  for (int64_t j = lane; j < m; j += 32) {
    const T xj = x[j];
    norm += xj * xj;
#pragma unroll
    for (int s = 0; s < D; ++s)
      if (s < d) acc[s] += xj * __ldg(weight + s * m + j);
  }
  norm = warp_sum(norm);
  T zs = T(0);  // lane s keeps logit s
#pragma unroll
  for (int s = 0; s < D; ++s) {
    if (s < d) {
      const T v = warp_sum(acc[s]);
      if (lane == s) zs = v + (bias ? bias[s] : T(0));
    }
  }
  const bool active = lane < d;
  T h;
  if (loss == kCrossEntropy) {
    const T mx = warp_max(active ? zs : T(-INFINITY));
    const T e = active ? exp(zs - mx) : T(0);
    h = e / warp_sum(e);
  } else {
    h = active ? sigmoid_curvature(zs) / T(d) : T(0);
  }
  T term;
  if (loss == kCrossEntropy) {  // 1/2 p_s (D p)_s; D is symmetric: [t][lane] reads consecutive banks
    T dp = 0;
    for (int t = 0; t < d; ++t) {
      const T pt = __shfl_sync(kFullWarp, h, t);
      if (active) dp += mat_s[t * D + lane] * pt;
    }
    term = active ? T(0.5) * h * dp : T(0);
  } else {
    term = active ? h * mat_s[lane * D + lane] : T(0);
  }
  term = warp_sum(term);
  if (lane == 0) {
    sq_norms[row] = norm;
    per_sample[row] = norm * term;
  }
  if (h_out && active) h_out[row * d + lane] = h;
}

template <typename T>
struct FusedArgs {
  const T* features;
  const T* weight;
  const T* bias;
  const T* mat;
  int64_t n, m;
  int d, loss;
  T* sq_norms;
  T* per_sample;
  T* h_out;
};

template <typename T, int D>
void launch_fused(const FusedArgs<T>& a, int64_t blocks, cudaStream_t stream) {
  fused_small_kernel<T, D><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
      a.features, a.weight, a.bias, a.mat, a.n, a.m, a.d, a.loss, a.sq_norms, a.per_sample, a.h_out);
}

// Many outputs: h (n, d) holds p or sigma(z)sigma(-z)/d. Cross entropy: q = P D (n, d) and the
// term is 1/2 <q_i, p_i> (gdiag null); BCE: the term is <h_i, diag(G)> (q null).
template <typename T>
__global__ void terms_kernel(const T* __restrict__ features, const T* __restrict__ h, const T* __restrict__ gdiag,
                             const T* __restrict__ q, int64_t n, int64_t m, int64_t d, T* __restrict__ sq_norms,
                             T* __restrict__ per_sample) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= n) return;
  T norm = 0, term = 0;
  for (int64_t j = lane; j < m; j += 32) norm += features[row * m + j] * features[row * m + j];
  if (q) {
    for (int64_t s = lane; s < d; s += 32) term += T(0.5) * q[row * d + s] * h[row * d + s];
  } else {
    for (int64_t s = lane; s < d; s += 32) term += h[row * d + s] * gdiag[s];
  }
  norm = warp_sum(norm);
  term = warp_sum(term);
  if (lane == 0) {
    sq_norms[row] = norm;
    per_sample[row] = norm * term;
  }
}

std::tuple<at::Tensor, at::Tensor> last_layer_flatness_cuda(const at::Tensor& features_in,
                                                            const at::Tensor& weight_in,
                                                            const std::optional<at::Tensor>& bias_in,
                                                            c10::string_view loss_name, bool block_trace,
                                                            bool want_per_sample) {
  check_last_layer_args(features_in, weight_in, bias_in);
  const LossCode loss = parse_loss(loss_name);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const at::Tensor features = features_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const int64_t n = features.size(0), m = features.size(1), d = weight.size(0);
  const auto opts = features.options();
  at::Tensor sq_norms = at::empty({n}, opts);
  at::Tensor per_sample = at::empty({n}, opts);
  at::Tensor block = at::empty({0, 0}, opts);
  block_trace = block_trace || !want_per_sample;  // only the sum: it comes from the block
  if (!want_per_sample) per_sample = at::empty({0}, opts);
  if (n == 0) return {per_sample, block_trace ? at::zeros({d, d}, opts) : block};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = (n + kWarpsPerBlock - 1) / kWarpsPerBlock;

  if (loss == kMse) {  // Hz = (2/d) I
    sq_norms = features.pow(2).sum(1);
    if (want_per_sample) per_sample = sq_norms * (weight.pow(2).sum() * (2.0 / d));
    if (block_trace) block = at::eye(d, opts) * (sq_norms.sum() * (2.0 / d));
    return {per_sample, block};
  }

  at::Tensor h;
  if (d <= kMaxFusedOutputs && want_per_sample) {
    const at::Tensor gram = at::mm(weight, weight.t());
    const at::Tensor mat = loss == kCrossEntropy ? squared_distances(gram) : gram;
    if (block_trace) h = at::empty({n, d}, opts);
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "last_layer_flatness_cuda", [&] {
      const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
      scalar_t* hp = block_trace ? h.data_ptr<scalar_t>() : nullptr;
      const FusedArgs<scalar_t> args{features.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), b,
                                     mat.data_ptr<scalar_t>(), n, m, static_cast<int>(d), static_cast<int>(loss),
                                     sq_norms.data_ptr<scalar_t>(), per_sample.data_ptr<scalar_t>(), hp};
      if (d <= 8) launch_fused<scalar_t, 8>(args, blocks, stream);
      else if (d <= 16) launch_fused<scalar_t, 16>(args, blocks, stream);
      else launch_fused<scalar_t, 32>(args, blocks, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    const at::Tensor logits = bias.has_value() ? at::addmm(*bias, features, weight.t()) : at::mm(features, weight.t());
    h = loss == kCrossEntropy ? at::softmax(logits, 1)
                              : at::sigmoid(logits).mul_(at::sigmoid(-logits)).div_(static_cast<double>(d));
    if (!want_per_sample) return {per_sample, block_sum_from_rows(h, features.pow(2).sum(1), loss)};
    const at::Tensor gdiag = weight.pow(2).sum(1);
    at::Tensor q;
    if (loss == kCrossEntropy) {
      if (m < d) {  // the cheaper GEMM: n*d*m multiply-adds instead of n*d*d
        sq_norms = features.pow(2).sum(1);
        per_sample = centred_cross_entropy_terms(h, weight, gdiag).mul_(sq_norms);
      } else {
        q = at::mm(h, squared_distances(at::mm(weight, weight.t())));
      }
    }
    if (q.defined() || loss != kCrossEntropy) {
      AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "last_layer_flatness_cuda", [&] {
        terms_kernel<scalar_t><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
            features.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
            q.defined() ? nullptr : gdiag.data_ptr<scalar_t>(), q.defined() ? q.data_ptr<scalar_t>() : nullptr,
            n, m, d, sq_norms.data_ptr<scalar_t>(), per_sample.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  if (block_trace) block = block_sum_from_rows(h, sq_norms, loss);
  return {per_sample, block};
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CUDA, m) { m.impl("last_layer_flatness", &last_layer_flatness_cuda); }

}  // namespace relflat
