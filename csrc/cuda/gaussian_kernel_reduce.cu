// CUDA Gaussian kernel reduction: one thread per query, blocks of kThreads queries stream over
// tiles of kKeyTile keys staged through shared memory (kDimChunk coordinates at a time, so any m
// fits). Each thread keeps its tile's squared distances in registers (exact differences, no
// |q|^2 + |k|^2 - 2 q.k cancellation) and folds them into the online log-sum-exp of every
// (split, bandwidth) row it owns: running max in logdens, running sum in a workspace, running
// weighted values in wval. Nothing of size nq x nk is written. A second kernel normalizes.
// This is the straightforward version: it has not been profiled on a GPU yet.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../kde.h"

namespace relflat {
namespace {

constexpr int kThreads = 128;
constexpr int kKeyTile = 32;
constexpr int kDimChunk = 32;

template <typename T>
struct KdeArgs {
  const T *queries, *keys, *values, *coef, *lognorm, *n_visible;
  const int64_t *query_split, *key_split;
  int64_t nq, nk, m, c, n_bw, n_splits;
  T *logdens, *sums, *wval;
};

template <typename T>
__global__ void kde_fold_kernel(KdeArgs<T> a) {
  __shared__ T key_tile[kKeyTile][kDimChunk + 1];
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = q < a.nq;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t k0 = 0; k0 < a.nk; k0 += kKeyTile) {
    const int kt = a.nk - k0 < kKeyTile ? static_cast<int>(a.nk - k0) : kKeyTile;
    T d2[kKeyTile];
#pragma unroll
    for (int j = 0; j < kKeyTile; ++j) d2[j] = T(0);
    for (int64_t p0 = 0; p0 < a.m; p0 += kDimChunk) {
      const int pc = a.m - p0 < kDimChunk ? static_cast<int>(a.m - p0) : kDimChunk;
      __syncthreads();
      for (int e = threadIdx.x; e < kKeyTile * kDimChunk; e += kThreads) {
        const int j = e / kDimChunk, p = e % kDimChunk;
        key_tile[j][p] = (j < kt && p < pc) ? a.keys[(k0 + j) * a.m + p0 + p] : T(0);
      }
      __syncthreads();
      if (active) {
        for (int p = 0; p < pc; ++p) {
          const T x = a.queries[q * a.m + p0 + p];
#pragma unroll
          for (int j = 0; j < kKeyTile; ++j) {
            const T diff = x - key_tile[j][p];
            d2[j] += diff * diff;
          }
        }
      }
    }
    if (!active) continue;
    for (int64_t r = 0; r < a.n_splits; ++r) {
      const int64_t query_id = a.query_split ? a.query_split[r * a.nq + q] : 0;
      for (int64_t b = 0; b < a.n_bw; ++b) {
        T logit[kKeyTile];
        T tile_max = neg_inf;
#pragma unroll
        for (int j = 0; j < kKeyTile; ++j) {
          const int64_t k = k0 + j;
          const bool visible = j < kt && (a.key_split == nullptr || a.key_split[r * a.nk + k] != query_id);
          logit[j] = visible ? d2[j] * a.coef[b * a.nk + k] + a.lognorm[b * a.nk + k] : neg_inf;
          tile_max = max(tile_max, logit[j]);
        }
        if (tile_max == neg_inf) continue;
        const int64_t row = (r * a.n_bw + b) * a.nq + q;
        const T run_max = a.logdens[row];
        const T new_max = max(run_max, tile_max);
        const T rescale = exp(run_max - new_max);
        T tile_sum = 0;
#pragma unroll
        for (int j = 0; j < kKeyTile; ++j) {
          logit[j] = exp(logit[j] - new_max);
          tile_sum += logit[j];
        }
        a.sums[row] = a.sums[row] * rescale + tile_sum;
        a.logdens[row] = new_max;
        T* acc = a.wval + row * a.c;
        for (int64_t v = 0; v < a.c; ++v) {
          T total = acc[v] * rescale;
          for (int j = 0; j < kt; ++j) total += logit[j] * a.values[(k0 + j) * a.c + v];
          acc[v] = total;
        }
      }
    }
  }
}

template <typename T>
__global__ void kde_finish_kernel(KdeArgs<T> a) {
  const int64_t rows = a.n_splits * a.n_bw * a.nq;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = row % a.nq, r = row / (a.n_bw * a.nq);
    finish_kde_row<T>(a.sums[row], a.n_visible[r * a.nq + q], a.logdens + row, a.wval + row * a.c, a.c);
  }
}

std::tuple<at::Tensor, at::Tensor> gaussian_kernel_reduce_cuda(
    const at::Tensor& queries, const at::Tensor& keys, const std::optional<at::Tensor>& values,
    const at::Tensor& bandwidths, const std::optional<at::Tensor>& key_scale,
    const std::optional<at::Tensor>& query_split, const std::optional<at::Tensor>& key_split) {
  // Arguments first: CPU queries with CUDA keys must get the argument message, not a guard error.
  check_kde_args(queries, keys, values, bandwidths, key_scale, query_split, key_split);
  const c10::cuda::CUDAGuard guard(queries.device());
  const KdeProblem in = prepare_kde(queries, keys, values, bandwidths, key_scale, query_split, key_split);
  const int64_t nq = in.nq, nk = in.nk, n_bw = in.n_bw, c = in.c;
  if (nq == 0 || nk == 0) return {in.logdens, in.wval};
  at::Tensor sums = at::zeros({in.n_splits, n_bw, nq}, queries.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "gaussian_kernel_reduce_cuda", [&] {
    using T = scalar_t;
    const KdeArgs<T> args{in.queries.data_ptr<T>(), in.keys.data_ptr<T>(), c > 0 ? in.values.data_ptr<T>() : nullptr,
                          in.coef.data_ptr<T>(), in.lognorm.data_ptr<T>(), in.n_visible.data_ptr<T>(),
                          in.query_split.defined() ? in.query_split.data_ptr<int64_t>() : nullptr,
                          in.key_split.defined() ? in.key_split.data_ptr<int64_t>() : nullptr,
                          nq, nk, queries.size(1), c, n_bw, in.n_splits,
                          in.logdens.data_ptr<T>(), sums.data_ptr<T>(), in.wval.data_ptr<T>()};
    const int64_t blocks = (nq + kThreads - 1) / kThreads;
    kde_fold_kernel<T><<<blocks, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t rows = in.n_splits * n_bw * nq;
    const int64_t finish_blocks = std::min<int64_t>((rows + 255) / 256, 65535);
    kde_finish_kernel<T><<<finish_blocks, 256, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {in.logdens, in.wval};
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CUDA, m) { m.impl("gaussian_kernel_reduce", &gaussian_kernel_reduce_cuda); }

}  // namespace relflat
