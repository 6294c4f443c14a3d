// CUDA per-sample contraction of output Hessians: one read of hz (made contiguous (n, d*k)).
// Each block takes kRows samples; its threads stride over the d*k entries, accumulating each
// row's dot with gram in registers. The block-trace output, sum_i a_i hz_i, is one cuBLAS GEMV
// over hz (a second read): deterministic from run to run, which per-block float atomics into the
// (d, k) sum were not.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "warp.cuh"

namespace relflat {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 8;

template <typename T>
__global__ void contract_kernel(const T* __restrict__ sq_norms, const T* __restrict__ hz,
                                const T* __restrict__ gram, int64_t n, int64_t cols, T* __restrict__ per_sample) {
  __shared__ T partial[kRows][kThreads / 32];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  T dots[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) dots[r] = T(0);
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
    const T g = gram[c];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (row0 + r < n) dots[r] += g * hz[(row0 + r) * cols + c];
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const T v = warp_sum(dots[r]);
    if (lane == 0) partial[r][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < kRows && row0 + threadIdx.x < n) {
    T total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += partial[threadIdx.x][w];
    per_sample[row0 + threadIdx.x] = sq_norms[row0 + threadIdx.x] * total;
  }
}

std::tuple<at::Tensor, at::Tensor> contract_output_hessians_cuda(const at::Tensor& sq_norms_in,
                                                                 const at::Tensor& hz_in,
                                                                 const at::Tensor& gram_in, bool block_trace) {
  check_contract_args(sq_norms_in, hz_in, gram_in);
  const c10::cuda::CUDAGuard guard(hz_in.device());
  const at::Tensor sq_norms = sq_norms_in.contiguous();
  const at::Tensor hz = hz_in.contiguous();
  const at::Tensor gram = gram_in.contiguous();
  const int64_t n = hz.size(0), cols = hz.size(1) * hz.size(2);
  at::Tensor per_sample = at::empty({n}, hz.options());
  at::Tensor block = block_trace ? at::mv(hz.view({n, cols}).t(), sq_norms).view({hz.size(1), hz.size(2)})
                                 : at::empty({0, 0}, hz.options());
  if (n == 0 || cols == 0) return {per_sample.zero_(), block};
  const int64_t blocks = (n + kRows - 1) / kRows;
  AT_DISPATCH_FLOATING_TYPES(hz.scalar_type(), "contract_output_hessians_cuda", [&] {
    contract_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        sq_norms.data_ptr<scalar_t>(), hz.data_ptr<scalar_t>(), gram.data_ptr<scalar_t>(), n, cols,
        per_sample.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {per_sample, block};
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CUDA, m) { m.impl("contract_output_hessians", &contract_output_hessians_cuda); }

}  // namespace relflat
