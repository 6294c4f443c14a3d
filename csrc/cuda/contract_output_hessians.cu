// CUDA per-sample contraction of output Hessians, reading hz in place whatever its strides: the
// exact path passes a permuted (k, n, d) buffer, which a contiguous copy would read and write
// once more. One warp per sample; its lanes walk the row's d*k entries with the inner index along
// the smaller of hz's two inner strides (as the CPU kernel does), so a contiguous row is one
// coalesced sweep and a permuted one is read in runs that neighbouring warps share in L1. When
// rows are few, grid.y splits the columns too and a deterministic sum over the splits follows.
// The block-trace output, sum_i a_i hz_i, is a cuBLAS GEMV (or batched GEMV) over the same
// strided buffer: deterministic from run to run, no copy of hz.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "warp.cuh"

namespace relflat {
namespace {

constexpr int kWarps = 8;
constexpr int64_t kMinColsPerSplit = 1024;

struct HzLayout {
  int64_t n, outer, inner;                // rows, and each row as (outer, inner)
  int64_t row_stride, outer_stride, inner_stride;
  int64_t cols_per_split;                 // grid.y splits of the outer * inner columns
};

// out (splits, n): with one split a_i times the row's dot with gram, else the split's partial dot.
template <typename T>
__global__ void contract_kernel(const T* __restrict__ sq_norms, int64_t a_stride, const T* __restrict__ hz,
                                const T* __restrict__ gram, HzLayout l, T* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= l.n) return;
  const int64_t cols = l.outer * l.inner;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * l.cols_per_split;
  const int64_t end = cols < begin + l.cols_per_split ? cols : begin + l.cols_per_split;
  const T* base = hz + row * l.row_stride;
  int64_t c = begin + lane, o = c / l.inner, t = c % l.inner;
  T dot = T(0);
  for (; c < end; c += 32) {
    dot += gram[c] * base[o * l.outer_stride + t * l.inner_stride];  // gram is (outer, inner) contiguous
    t += 32;
    if (t >= l.inner) o += t / l.inner, t %= l.inner;
  }
  dot = warp_sum(dot);
  if (lane == 0) out[blockIdx.y * l.n + row] = gridDim.y == 1 ? sq_norms[row * a_stride] * dot : dot;
}

// sum_i a_i hz[i] as a (d, k) matrix, with cuBLAS reading hz where it lies.
at::Tensor weighted_row_sum(const at::Tensor& hz, const at::Tensor& a) {
  const int64_t n = hz.size(0), d = hz.size(1), k = hz.size(2);
  if (hz.stride(1) == hz.stride(2) * k || d == 1 || k == 1)  // rows are (d*k) vectors
    return at::mv(hz.reshape({n, d * k}).t(), a).view({d, k});
  if (hz.stride(2) == hz.stride(1) * d)  // rows are (k*d) vectors, j-major
    return at::mv(hz.transpose(1, 2).reshape({n, k * d}).t(), a).view({k, d}).t().contiguous();
  // Any other layout (the exact path's (k, n, d)): per probe j a (d, n) matrix times a.
  return at::bmm(hz.permute({2, 1, 0}), a.view({1, n, 1}).expand({k, n, 1})).view({k, d}).t().contiguous();
}

std::tuple<at::Tensor, at::Tensor> contract_output_hessians_cuda(const at::Tensor& sq_norms,
                                                                 const at::Tensor& hz,
                                                                 const at::Tensor& gram_in, bool block_trace) {
  check_contract_args(sq_norms, hz, gram_in);
  const c10::cuda::CUDAGuard guard(hz.device());
  const int64_t n = hz.size(0), d = hz.size(1), k = hz.size(2), cols = d * k;
  at::Tensor per_sample = at::empty({n}, hz.options());
  at::Tensor block = block_trace ? (n == 0 ? at::zeros({d, k}, hz.options()) : weighted_row_sum(hz, sq_norms))
                                 : at::empty({0, 0}, hz.options());
  if (n == 0 || cols == 0) return {per_sample.zero_(), block};
  const bool inner_is_k = hz.stride(2) <= hz.stride(1);
  const at::Tensor gram = (inner_is_k ? gram_in : gram_in.t()).contiguous();  // (outer, inner)
  HzLayout l{n, inner_is_k ? d : k, inner_is_k ? k : d, hz.stride(0),
             inner_is_k ? hz.stride(1) : hz.stride(2), inner_is_k ? hz.stride(2) : hz.stride(1), cols};
  // Few rows and long ones: split the columns until about four blocks per multiprocessor run.
  const int64_t row_blocks = (n + kWarps - 1) / kWarps;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = std::clamp<int64_t>((4 * sms + row_blocks - 1) / row_blocks, 1,
                                             std::min<int64_t>((cols + kMinColsPerSplit - 1) / kMinColsPerSplit, 65535));
  l.cols_per_split = (cols + splits - 1) / splits;
  const int64_t used_splits = (cols + l.cols_per_split - 1) / l.cols_per_split;
  at::Tensor partial = used_splits == 1 ? per_sample : at::empty({used_splits, n}, hz.options());
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(used_splits));
  AT_DISPATCH_FLOATING_TYPES(hz.scalar_type(), "contract_output_hessians_cuda", [&] {
    contract_kernel<scalar_t><<<grid, kWarps * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
        sq_norms.data_ptr<scalar_t>(), sq_norms.stride(0), hz.data_ptr<scalar_t>(), gram.data_ptr<scalar_t>(), l,
        partial.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (used_splits > 1) at::mul_out(per_sample, partial.sum(0), sq_norms);
  return {per_sample, block};
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CUDA, m) { m.impl("contract_output_hessians", &contract_output_hessians_cuda); }

}  // namespace relflat
