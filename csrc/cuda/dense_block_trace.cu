// CUDA block traces of a dense layer Hessian: one warp per (s, t) block sums its m diagonal
// entries (any strides), then kappa = <W W^T, T> through ATen.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "warp.cuh"

namespace relflat {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void block_trace_kernel(const T* __restrict__ h, int64_t row_stride, int64_t col_stride, int64_t d,
                                   int64_t m, T* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t st = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (st >= d * d) return;
  const int64_t s = st / d, t = st % d;
  const T* base = h + s * m * row_stride + t * m * col_stride;
  T acc = 0;
  for (int64_t j = lane; j < m; j += 32) acc += base[j * (row_stride + col_stride)];
  acc = warp_sum(acc);
  if (lane == 0) out[st] = acc;
}

std::tuple<at::Tensor, at::Tensor> dense_block_trace_cuda(const at::Tensor& hessian, const at::Tensor& weight) {
  check_dense_args(hessian, weight);
  const c10::cuda::CUDAGuard guard(hessian.device());
  const int64_t d = weight.size(0), m = weight.size(1);
  at::Tensor block_trace = at::empty({d, d}, weight.options());
  const int64_t blocks = (d * d + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (d * d > 0) {
    AT_DISPATCH_FLOATING_TYPES(hessian.scalar_type(), "dense_block_trace_cuda", [&] {
      block_trace_kernel<scalar_t><<<blocks, kWarpsPerBlock * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
          hessian.data_ptr<scalar_t>(), hessian.stride(0), hessian.stride(1), d, m,
          block_trace.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor kappa = (at::mm(weight, weight.t()) * block_trace).sum();
  return {kappa, block_trace};
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CUDA, m) { m.impl("dense_block_trace", &dense_block_trace_cuda); }

}  // namespace relflat
