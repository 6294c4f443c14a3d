// CUDA closed-form last-layer flatness.
// Few outputs (d <= 32): one fused kernel, a few rows per warp: squared norms and the d logits from
// one read of the feature rows (W shared by the block through shared memory), then softmax/sigmoid
// and <G, Hz_i> in registers: 1/2 p^T D p for cross
// entropy (D[s,t] = ||w_s - w_t||^2 in shared memory; no cancellation at confident rows),
// h . diag(G) for BCE. Many outputs: the logits GEMM goes to cuBLAS (at::addmm), softmax/sigmoid
// to ATen, then either one warp-per-row kernel for the terms (1/2 <P D, P> from one more GEMM)
// or, when m < d, the argmax-centred form from the cheaper GEMM (P - e_k) W. The block sum's
// symmetric product and P D, whose factors are all >= 0, run in 3xTF32 for float32 (unless the
// user allowed TF32).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <utility>

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

// Few outputs: each warp takes 64 / D rows (R*D = 64 accumulators per lane) and the block's eight
// warps share W, staged in shared memory kWeightChunk columns at a time: W is read once per block
// of 8R rows, not once per row. Per row, a reduce-scatter leaves logit s in lane s; then
// softmax/sigmoid and the term in registers. mat (d, d): D for cross entropy, G for BCE (only its
// diagonal is read).
constexpr int kWeightChunk = 128;

template <int D>
constexpr int rows_per_warp() {
  return 64 / D;
}

// v[D] per lane; returns in every lane the warp-wide sum of entry lane % D. Sum over the lanes'
// high bits first, then halve the entries each level (lanes with bit `half` set keep the upper
// half): D - 1 + (5 - log2 D) * D shuffles, not 5 D. Levels are templates so that every index is
// a constant and v stays in registers.
template <int kHalf>
struct ScatterLevel {
  template <typename T, int D>
  __device__ __forceinline__ static void run(T (&v)[D], int lane) {
    const bool upper = lane & kHalf;
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const T send = upper ? v[i] : v[i + kHalf];
      const T keep = upper ? v[i + kHalf] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullWarp, send, kHalf);
    }
    ScatterLevel<kHalf / 2>::run(v, lane);
  }
};
template <>
struct ScatterLevel<0> {
  template <typename T, int D>
  __device__ __forceinline__ static void run(T (&)[D], int) {}
};

template <typename T, int D>
__device__ __forceinline__ T warp_reduce_scatter(T (&v)[D], int lane) {
#pragma unroll
  for (int offset = 16; offset >= D; offset >>= 1)
#pragma unroll
    for (int s = 0; s < D; ++s) v[s] += __shfl_xor_sync(kFullWarp, v[s], offset);
  ScatterLevel<D / 2>::run(v, lane);
  return v[0];
}

template <typename T, int D>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    fused_small_kernel(const T* __restrict__ features, const T* __restrict__ weight, const T* __restrict__ bias,
                       const T* __restrict__ mat, int64_t n, int64_t m, int d, int loss, T* __restrict__ sq_norms,
                       T* __restrict__ per_sample, T* __restrict__ h_out) {
  constexpr int R = rows_per_warp<D>();
  __shared__ T mat_s[D * D];
  __shared__ T weight_s[D][kWeightChunk];
  for (int e = threadIdx.x; e < d * d; e += blockDim.x) mat_s[(e / d) * D + e % d] = mat[e];
  __syncthreads();  // also when m = 0 and the chunk loop below never syncs
  const int lane = threadIdx.x & 31;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5)) * R;
  T acc[R][D], norm[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    norm[r] = T(0);
#pragma unroll
    for (int s = 0; s < D; ++s) acc[r][s] = T(0);
  }
  for (int64_t c0 = 0; c0 < m; c0 += kWeightChunk) {
    __syncthreads();  // every warp is done with the previous chunk
    for (int e = threadIdx.x; e < D * kWeightChunk; e += blockDim.x) {
      const int s = e / kWeightChunk, j = e % kWeightChunk;
      weight_s[s][j] = (s < d && c0 + j < m) ? weight[s * m + c0 + j] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kWeightChunk / 32; ++jj) {
      const int j = lane + 32 * jj;
      T x[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        x[r] = (row0 + r < n && c0 + j < m) ? features[(row0 + r) * m + c0 + j] : T(0);
        norm[r] += x[r] * x[r];
      }
#pragma unroll
      for (int s = 0; s < D; ++s) {
        const T w = weight_s[s][j];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][s] += x[r] * w;
      }
    }
  }
  const bool active = lane < d;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = row0 + r;
    if (row >= n) continue;  // the same in every lane; not `break`, which would keep acc off registers
    const T zs = warp_reduce_scatter<T, D>(acc[r], lane) + (bias && active ? bias[lane] : T(0));
    const T row_norm = warp_sum(norm[r]);
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
      sq_norms[row] = row_norm;
      per_sample[row] = row_norm * term;
    }
    if (h_out && active) h_out[row * d + lane] = h;
  }
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
void launch_fused(const FusedArgs<T>& a, cudaStream_t stream) {
  constexpr int64_t kRowsPerBlock = kWarpsPerBlock * rows_per_warp<D>();
  fused_small_kernel<T, D><<<(a.n + kRowsPerBlock - 1) / kRowsPerBlock, kWarpsPerBlock * 32, 0, stream>>>(
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

// Round to TF32 (10 mantissa bits, to nearest) and keep the remainder: x = hi + lo exactly, and
// lo is below 2^-11 |x|. Inf and NaN keep their bits in hi.
__global__ void split_tf32_kernel(const float* __restrict__ x, int64_t count, float* __restrict__ hi,
                                  float* __restrict__ lo) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = x[e];
    uint32_t bits = __float_as_uint(v);
    if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
    const float h = __uint_as_float(bits);
    hi[e] = h;
    lo[e] = isfinite(h) ? v - h : 0.0f;
  }
}

std::pair<at::Tensor, at::Tensor> split_tf32(const at::Tensor& x) {
  at::Tensor hi = at::empty_like(x), lo = at::empty_like(x);
  const int64_t count = x.numel();
  if (count == 0) return {hi, lo};
  const int64_t blocks = std::min<int64_t>((count + 255) / 256, 4096);
  split_tf32_kernel<<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(x.data_ptr<float>(), count,
                                                                         hi.data_ptr<float>(), lo.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {hi, lo};
}

// Whether a float32 product of non-negative factors runs in 3xTF32: not where the user allowed
// TF32 (then ATen's GEMM uses it, as for the logits), nor past cuBLAS's int sizes.
bool use_3xtf32(const at::Tensor& a, int64_t largest) {
  return a.scalar_type() == at::kFloat && !at::globalContext().allowTF32CuBLAS() && largest > 0 &&
         largest <= std::numeric_limits<int>::max();
}

// c = op(x) op(y) (cuBLAS column-major, c with leading dimension ldc) in 3xTF32 on the tensor
// cores: lo(x) hi(y) + hi(x) lo(y) + hi(x) hi(y), the lo x lo term dropped (below 2^-22 of the
// sum). For factors >= 0 nothing cancels, so this keeps about float32's accuracy at a fraction of
// a float32 GEMM's time. x and y come split (split_tf32); the offsets select sub-matrices.
struct SplitMatrix {
  const at::Tensor &hi, &lo;
  int64_t offset, ld;
  const float* ptr(bool high) const { return (high ? hi : lo).data_ptr<float>() + offset; }
};

void gemm_3xtf32(cublasOperation_t op_x, cublasOperation_t op_y, int64_t m, int64_t n, int64_t k,
                 const SplitMatrix& x, const SplitMatrix& y, float* c, int64_t ldc) {
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const float one = 1.0f, zero = 0.0f;
  const bool x_high[3] = {false, true, true}, y_high[3] = {true, false, true};
  for (int t = 0; t < 3; ++t) {
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, op_x, op_y, static_cast<int>(m), static_cast<int>(n),
                                      static_cast<int>(k), &one, x.ptr(x_high[t]), CUDA_R_32F,
                                      static_cast<int>(x.ld), y.ptr(y_high[t]), CUDA_R_32F, static_cast<int>(y.ld),
                                      t == 0 ? &zero : &one, c, CUDA_R_32F, static_cast<int>(ldc),
                                      CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
  }
}

// P D for the cross-entropy terms, P (n, d) probabilities, D (d, d) squared distances (>= 0).
at::Tensor probabilities_times_distances(const at::Tensor& p_in, const at::Tensor& dist_in) {
  const int64_t n = p_in.size(0), d = p_in.size(1);
  if (!use_3xtf32(p_in, std::max(n, d))) return at::mm(p_in, dist_in);
  const at::Tensor p = p_in.contiguous(), dist = dist_in.contiguous();
  const auto [p_hi, p_lo] = split_tf32(p);
  const auto [d_hi, d_lo] = split_tf32(dist);
  at::Tensor out = at::empty({n, d}, p.options());
  // Row-major out = P D is column-major out^T = D^T P^T = D P^T (D symmetric, and so its halves).
  gemm_3xtf32(CUBLAS_OP_N, CUBLAS_OP_N, d, n, d, {d_hi, d_lo, 0, d}, {p_hi, p_lo, 0, d}, out.data_ptr<float>(), d);
  return out;
}

// Q^T Q (d, d) for the block sum's Q = sqrt(a) P >= 0, strip by strip as symmetric_gram does.
at::Tensor nonnegative_gram(const at::Tensor& q_in) {
  const int64_t n = q_in.size(0), d = q_in.size(1);
  if (!use_3xtf32(q_in, std::max(n, d))) return symmetric_gram(q_in);
  const at::Tensor q = q_in.contiguous();
  const std::pair<at::Tensor, at::Tensor> halves = split_tf32(q);  // not a structured binding: the lambda captures it
  const at::Tensor &hi = halves.first, &lo = halves.second;
  return symmetric_gram(q, [&](at::Tensor& part, int64_t i, int64_t rows) {
    // part (rows, d - i), row stride d, = A^T B for A = q[:, i:i+rows], B = q[:, i:]. Column-major,
    // q is q^T (d, n) with leading dimension d: part^T = B^T A = (rows i.. of q^T) (rows i..i+rows of q^T)^T.
    gemm_3xtf32(CUBLAS_OP_N, CUBLAS_OP_T, d - i, rows, n, {hi, lo, i, d}, {hi, lo, i, d}, part.data_ptr<float>(), d);
  });
}

at::Tensor block_sum(const at::Tensor& h, const at::Tensor& sq_norms, int64_t loss) {
  return block_sum_from_rows(h, sq_norms, loss, nonnegative_gram);
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
      if (d <= 8) launch_fused<scalar_t, 8>(args, stream);
      else if (d <= 16) launch_fused<scalar_t, 16>(args, stream);
      else launch_fused<scalar_t, 32>(args, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    const at::Tensor logits = bias.has_value() ? at::addmm(*bias, features, weight.t()) : at::mm(features, weight.t());
    h = loss == kCrossEntropy ? at::softmax(logits, 1)
                              : at::sigmoid(logits).mul_(at::sigmoid(-logits)).div_(static_cast<double>(d));
    if (!want_per_sample) return {per_sample, block_sum(h, features.pow(2).sum(1), loss)};
    const at::Tensor gdiag = weight.pow(2).sum(1);
    at::Tensor q;
    if (loss == kCrossEntropy) {
      if (m < d) {  // the cheaper GEMM: n*d*m multiply-adds instead of n*d*d
        sq_norms = features.pow(2).sum(1);
        per_sample = centred_cross_entropy_terms(h, weight, gdiag).mul_(sq_norms);
      } else {
        q = probabilities_times_distances(h, squared_distances(at::mm(weight, weight.t())));
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
  if (block_trace) block = block_sum(h, sq_norms, loss);
  return {per_sample, block};
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CUDA, m) { m.impl("last_layer_flatness", &last_layer_flatness_cuda); }

}  // namespace relflat
