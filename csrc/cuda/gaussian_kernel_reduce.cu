// CUDA Gaussian kernel reduction, in the shape of attention: nothing of size nq x nk is written.
//
// Pass 1, kde_fold_kernel: the log-sum-exp of every (split, bandwidth, query) row. A block takes
// kQueries queries, one slice of the keys (grid.y) and up to 8 (split, bandwidth) pairs (grid.z);
// it streams over tiles of 64 keys. Dot products come from register tiles (each thread 4 queries
// x 16 keys; float64 8 keys and 2 pairs; queries and keys staged through shared memory
// kDims coordinates at a time, read as 4-wide vectors), squared distances from the centred expansion
// |q|^2 + |k|^2 - 2 q.k that the CPU kernel uses (prepare_kde centres both sets on the keys' mean).
// Per-key coefficients, log-normalizers and split ids are staged in shared memory once per tile.
// The four threads that share a query hold its running max (the same in all four: the tile's max
// is reduced over them) and their own partial sums; each slice writes (max, sum) per row.
// Pass 2, kde_merge_kernel: merges the slices' (max, sum) pairs and divides by the visible count.
// Values (c > 0): with the row's log-sum-exp L known, the weights exp(logit - L) sum to one and
// wval is a product of matrices, taken over key chunks with cuBLAS and ATen (kde_weighted_values).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../kde.h"

namespace relflat {
namespace {

constexpr int kThreads = 128;
constexpr int kQueries = 128;  // 32 groups of 4 queries
constexpr int kDims = 16;      // coordinates staged at a time
constexpr int kPad = 4;        // keeps rows 16-byte aligned; 2-way bank conflicts on the stores only

// Per thread 4 queries x keys_per_thread keys and the state of pairs_per_block pairs: float64 gets
// fewer of both, or its registers spill (sm_90: 235 registers for float, 246 for double, no
// spills). A tile has 4 groups of keys_per_thread keys.
template <typename T>
constexpr int keys_per_thread() {
  return sizeof(T) == 4 ? 16 : 8;
}
template <typename T>
constexpr int keys_per_tile() {
  return 4 * keys_per_thread<T>();
}
template <typename T>
constexpr int pairs_per_block() {
  return sizeof(T) == 4 ? 8 : 2;
}

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
struct KdeArgs {
  const T *queries, *keys, *query_sq_norms, *key_sq_norms, *coef, *lognorm;
  const int64_t *query_split, *key_split;  // nullptr when every key is visible
  int64_t nq, nk, m, n_bw, n_pairs, tiles_per_slice;
  T *ws_max, *ws_sum;  // (slices, pairs, nq)
};

// Thread-local key j of key group kg sits at column kg * 4 + (j / 4) * 16 + j % 4 of the tile:
// for a fixed j / 4 the four groups read 16 consecutive words, no bank conflicts.
__device__ __forceinline__ int key_column(int kg, int j) { return kg * 4 + (j >> 2) * 16 + (j & 3); }

template <typename T, bool kSplit>
__global__ void __launch_bounds__(kThreads) kde_fold_kernel(KdeArgs<T> a) {
  constexpr int kPairs = pairs_per_block<T>(), kPerThread = keys_per_thread<T>(), kKeys = keys_per_tile<T>();
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  __shared__ alignas(4 * sizeof(T)) T q_s[kDims][kQueries + kPad];
  __shared__ alignas(4 * sizeof(T)) T k_s[kDims][kKeys + kPad];
  __shared__ T key_norm_s[kKeys];
  __shared__ T coef_s[kPairs][kKeys];
  __shared__ T lognorm_s[kPairs][kKeys];
  __shared__ int64_t key_id_s[kSplit ? kPairs : 1][kKeys];

  const int tid = threadIdx.x, lane = tid & 31;
  const int qg = (tid >> 5) * 8 + (lane >> 2);  // query group: queries qg * 4 + i
  const int kg = lane & 3;                      // key group: the four lanes of a query group
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kQueries;
  const int64_t pair0 = static_cast<int64_t>(blockIdx.z) * kPairs;
  const int n_pairs = a.n_pairs - pair0 < kPairs ? static_cast<int>(a.n_pairs - pair0) : kPairs;
  const int64_t key_begin = static_cast<int64_t>(blockIdx.y) * a.tiles_per_slice * kKeys;
  const int64_t key_end = a.nk < key_begin + a.tiles_per_slice * kKeys ? a.nk : key_begin + a.tiles_per_slice * kKeys;

  T query_norm[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t q = q0 + qg * 4 + i;
    query_norm[i] = q < a.nq ? a.query_sq_norms[q] : T(0);
  }
  T run_max[kPairs][4], run_sum[kPairs][4];
#pragma unroll
  for (int p = 0; p < kPairs; ++p)
#pragma unroll
    for (int i = 0; i < 4; ++i) run_max[p][i] = kNegInf, run_sum[p][i] = T(0);

  for (int64_t k0 = key_begin; k0 < key_end; k0 += kKeys) {
    __syncthreads();  // the previous tile's per-key data is no longer read
    for (int e = tid; e < kKeys; e += kThreads) key_norm_s[e] = k0 + e < key_end ? a.key_sq_norms[k0 + e] : T(0);
    for (int e = tid; e < kPairs * kKeys; e += kThreads) {  // keys past the slice get logits of -inf
      const int p = e / kKeys, col = e % kKeys;
      const int64_t k = k0 + col, pair = pair0 + p;
      const bool valid = k < key_end && p < n_pairs;
      const int64_t b = pair % a.n_bw;
      coef_s[p][col] = valid ? a.coef[b * a.nk + k] : T(0);
      lognorm_s[p][col] = valid ? a.lognorm[b * a.nk + k] : kNegInf;
      if (kSplit) key_id_s[p][col] = valid ? a.key_split[(pair / a.n_bw) * a.nk + k] : -1;
    }
    T acc[4][kPerThread];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) acc[i][j] = T(0);
    for (int64_t p0 = 0; p0 < a.m; p0 += kDims) {
      __syncthreads();  // the previous chunk is no longer read
      for (int e = tid; e < kQueries * kDims; e += kThreads) {  // a half-warp reads 16 words of a row
        const int row = e / kDims, p = e % kDims;
        const int64_t q = q0 + row;
        q_s[p][row] = (q < a.nq && p0 + p < a.m) ? a.queries[q * a.m + p0 + p] : T(0);
      }
      for (int e = tid; e < kKeys * kDims; e += kThreads) {
        const int row = e / kDims, p = e % kDims;
        const int64_t k = k0 + row;
        k_s[p][row] = (k < key_end && p0 + p < a.m) ? a.keys[k * a.m + p0 + p] : T(0);
      }
      __syncthreads();
      const int dims = a.m - p0 < kDims ? static_cast<int>(a.m - p0) : kDims;
#pragma unroll 4
      for (int p = 0; p < dims; ++p) {
        const Vec4<T> qv = *reinterpret_cast<const Vec4<T>*>(&q_s[p][qg * 4]);
#pragma unroll
        for (int jj = 0; jj < kPerThread / 4; ++jj) {
          const Vec4<T> kv = *reinterpret_cast<const Vec4<T>*>(&k_s[p][kg * 4 + jj * 16]);
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int jl = 0; jl < 4; ++jl) acc[i][jj * 4 + jl] = fma(qv.v[i], kv.v[jl], acc[i][jj * 4 + jl]);
        }
      }
    }
    __syncthreads();  // the per-key data is visible, also when m = 0 and no chunk ran
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < kPerThread; ++j)
        acc[i][j] = max(query_norm[i] + key_norm_s[key_column(kg, j)] - T(2) * acc[i][j], T(0));

    // Fold the tile into each pair's rows: the tile's max over the row's kKeys keys (the four lanes
    // of the group), then the rescaled partial sums. Logits are recomputed rather than kept.
#pragma unroll
    for (int p = 0; p < kPairs; ++p) {
      if (p >= n_pairs) break;
      int64_t query_id[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t q = q0 + qg * 4 + i;
        query_id[i] = (kSplit && q < a.nq) ? a.query_split[((pair0 + p) / a.n_bw) * a.nq + q] : -2;
      }
      auto logit = [&](int i, int j) {
        const int col = key_column(kg, j);
        if (kSplit && key_id_s[p][col] == query_id[i]) return kNegInf;
        return fma(acc[i][j], coef_s[p][col], lognorm_s[p][col]);
      };
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        T tile_max = kNegInf;
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) tile_max = max(tile_max, logit(i, j));
        tile_max = max(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = max(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const T new_max = max(run_max[p][i], tile_max);
        if (new_max == kNegInf) continue;  // nothing visible to this row yet (same in all four lanes)
        T tile_sum = T(0);
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) tile_sum += exp(logit(i, j) - new_max);
        run_sum[p][i] = run_sum[p][i] * exp(run_max[p][i] - new_max) + tile_sum;  // exp(-inf) = 0 at first
        run_max[p][i] = new_max;
      }
    }
  }

#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      T total = run_sum[p][i];
      total += __shfl_xor_sync(0xffffffffu, total, 1);
      total += __shfl_xor_sync(0xffffffffu, total, 2);
      const int64_t q = q0 + qg * 4 + i;
      if (kg == 0 && p < n_pairs && q < a.nq) {
        const int64_t at = (static_cast<int64_t>(blockIdx.y) * a.n_pairs + pair0 + p) * a.nq + q;
        a.ws_max[at] = run_max[p][i];
        a.ws_sum[at] = total;
      }
    }
  }
}

// One thread per (pair, query) row: merge the slices' partial log-sum-exps, then divide by the
// number of visible keys. logdens (R, B, nq) is laid out as the (pair, query) rows.
template <typename T>
__global__ void kde_merge_kernel(const T* __restrict__ ws_max, const T* __restrict__ ws_sum,
                                 const T* __restrict__ n_visible, int64_t slices, int64_t n_pairs, int64_t nq,
                                 int64_t n_bw, T* __restrict__ logdens) {
  const int64_t rows = n_pairs * nq;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T best = -std::numeric_limits<T>::infinity();
    for (int64_t s = 0; s < slices; ++s) best = max(best, ws_max[s * rows + row]);
    T sum = T(0);
    if (best != -std::numeric_limits<T>::infinity())
      for (int64_t s = 0; s < slices; ++s) sum += ws_sum[s * rows + row] * exp(ws_max[s * rows + row] - best);
    const int64_t q = row % nq, r = row / (n_bw * nq);
    logdens[row] = best;
    finish_kde_row<T>(sum, n_visible[r * nq + q], logdens + row, static_cast<T*>(nullptr), 0);
  }
}

// wval[r, b] = sum_k exp(logit[r, b, q, k] - L[r, b, q]) values[k] with L the rows' log-sum-exp:
// the weights need no running rescale. Key chunks keep the (R, B, nq, chunk) weights near 256 MiB
// of float32. Rows that see no key have L = -inf and get zeros.
void kde_weighted_values(const KdeProblem& in, const at::Tensor& logdens) {
  const int64_t nq = in.nq, nk = in.nk, c = in.c, n_pairs = in.n_splits * in.n_bw;
  const at::Tensor lse = logdens + in.n_visible.log().unsqueeze(1);  // (R, B, nq)
  const at::Tensor shift = at::where(lse.isfinite(), lse, at::zeros_like(lse)).unsqueeze(3);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(nk, (int64_t{1} << 26) / std::max<int64_t>(1, n_pairs * nq)));
  at::Tensor wval = in.wval.view({n_pairs * nq, c});
  for (int64_t k0 = 0; k0 < nk; k0 += chunk) {
    const int64_t kc = std::min(chunk, nk - k0);
    const at::Tensor dots = at::mm(in.queries, in.keys.narrow(0, k0, kc).t());  // (nq, kc)
    const at::Tensor d2 = (in.query_sq_norms.unsqueeze(1) + in.key_sq_norms.narrow(0, k0, kc).unsqueeze(0))
                              .sub_(dots, 2).clamp_min_(0);
    at::Tensor logits = d2.unsqueeze(0) * in.coef.narrow(1, k0, kc).unsqueeze(1);  // (B, nq, kc)
    logits = (logits + in.lognorm.narrow(1, k0, kc).unsqueeze(1)).unsqueeze(0) - shift;  // (R, B, nq, kc)
    if (in.query_split.defined()) {
      const at::Tensor same = in.query_split.unsqueeze(2) == in.key_split.narrow(1, k0, kc).unsqueeze(1);
      logits.masked_fill_(same.unsqueeze(1), -std::numeric_limits<double>::infinity());
    }
    wval.addmm_(logits.exp_().view({n_pairs * nq, kc}), in.values.narrow(0, k0, kc));
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
  const int64_t nq = in.nq, nk = in.nk, n_pairs = in.n_splits * in.n_bw;
  if (nq == 0 || nk == 0) return {in.logdens, in.wval};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "gaussian_kernel_reduce_cuda", [&] {
    using T = scalar_t;
    constexpr int kPairs = pairs_per_block<T>(), kKeys = keys_per_tile<T>();
    const int64_t query_blocks = (nq + kQueries - 1) / kQueries;
    const int64_t pair_blocks = (n_pairs + kPairs - 1) / kPairs;
    TORCH_CHECK(pair_blocks <= 65535, "gaussian_kernel_reduce: at most ", 65535 * kPairs,
                " (split, bandwidth) pairs on CUDA, got ", n_pairs);
    // Slice the keys until about four blocks per multiprocessor run, each slice at least one tile.
    const int64_t tiles = (nk + kKeys - 1) / kKeys;
    const int64_t others = query_blocks * pair_blocks;
    const int64_t wanted = std::clamp<int64_t>((4 * sms + others - 1) / others, 1, std::min<int64_t>(tiles, 65535));
    const int64_t tiles_per_slice = (tiles + wanted - 1) / wanted;
    const int64_t slices = (tiles + tiles_per_slice - 1) / tiles_per_slice;
    at::Tensor ws = at::empty({2, slices, n_pairs, nq}, queries.options());
    const KdeArgs<T> args{in.queries.data_ptr<T>(), in.keys.data_ptr<T>(), in.query_sq_norms.data_ptr<T>(),
                          in.key_sq_norms.data_ptr<T>(), in.coef.data_ptr<T>(), in.lognorm.data_ptr<T>(),
                          in.query_split.defined() ? in.query_split.data_ptr<int64_t>() : nullptr,
                          in.key_split.defined() ? in.key_split.data_ptr<int64_t>() : nullptr,
                          nq, nk, queries.size(1), in.n_bw, n_pairs, tiles_per_slice,
                          ws[0].data_ptr<T>(), ws[1].data_ptr<T>()};
    const dim3 grid(static_cast<unsigned>(query_blocks), static_cast<unsigned>(slices), static_cast<unsigned>(pair_blocks));
    if (in.query_split.defined()) kde_fold_kernel<T, true><<<grid, kThreads, 0, stream>>>(args);
    else kde_fold_kernel<T, false><<<grid, kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t rows = n_pairs * nq;
    const int64_t merge_blocks = std::min<int64_t>((rows + 255) / 256, 65535);
    kde_merge_kernel<T><<<merge_blocks, 256, 0, stream>>>(args.ws_max, args.ws_sum, in.n_visible.data_ptr<T>(), slices,
                                                          n_pairs, nq, in.n_bw, in.logdens.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (in.c > 0) kde_weighted_values(in, in.logdens);
  return {in.logdens, in.wval};
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CUDA, m) { m.impl("gaussian_kernel_reduce", &gaussian_kernel_reduce_cuda); }

}  // namespace relflat
