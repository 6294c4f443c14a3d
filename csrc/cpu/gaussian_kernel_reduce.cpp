// CPU Gaussian kernel reduction, attention-style: for a block of queries, stream over tiles of keys;
// BLAS gives the tile of dot products (kept in L2, never the nq x nk matrix), from which one tile of
// squared distances serves every split and bandwidth; each (split, bandwidth, query) row keeps an
// online log-sum-exp (running max, rescaled sum) and the running kernel-weighted sum of values.
// The tile fold is a kernel for run_best_isa (simd.h): AVX2+FMA (with an inlined vector exp) or the
// baseline ISA at run time.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../kde.h"
#include "simd.h"

namespace relflat {
namespace {

constexpr int64_t kQueryBlock = 64;  // queries per task
constexpr int64_t kKeyTile = 256;    // keys per tile: a 64 x 256 tile of doubles is 128 KiB, inside L2

// Raw views of one problem; outputs double as running state: logdens holds each row's running max
// until the end, wval its running (unnormalized) weighted sum.
template <typename T>
struct KdeView {
  const T *query_sq_norms, *key_sq_norms, *values, *coef, *lognorm, *n_visible;
  const int64_t *query_split, *key_split;  // nullptr when every key is visible
  int64_t nq, nk, c, n_bw, n_splits;
  T *logdens, *wval;
};

// One row (split r, bandwidth b, query i) against one key tile of kt keys whose logits come from
// the squared distances d2: fold the tile into the row's (running max, sum, weighted values).
// Squared distances come from the dot products as |q|^2 + |k|^2 - 2 q.k (clamped at 0), recomputed
// per row: two flops, cheaper than another pass over the tile.
template <typename T, bool kAvx2>
RELFLAT_INLINE void update_row(const T* dots, T query_sq_norm, const T* key_sq_norms, const T* coef,
                               const T* lognorm, const int64_t* key_ids, int64_t query_id, const T* values,
                               int64_t c, int64_t kt, T* buf, T& run_max, T& run_sum, T* acc) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T tile_max = kNegInf;
  if (key_ids != nullptr) {
#pragma omp simd reduction(max : tile_max)
    for (int64_t j = 0; j < kt; ++j) {
      const T d2 = std::max(query_sq_norm + key_sq_norms[j] - T(2) * dots[j], T(0));
      const T logit = key_ids[j] == query_id ? kNegInf : d2 * coef[j] + lognorm[j];
      buf[j] = logit;
      tile_max = std::max(tile_max, logit);
    }
  } else {
#pragma omp simd reduction(max : tile_max)
    for (int64_t j = 0; j < kt; ++j) {
      const T d2 = std::max(query_sq_norm + key_sq_norms[j] - T(2) * dots[j], T(0));
      const T logit = d2 * coef[j] + lognorm[j];
      buf[j] = logit;
      tile_max = std::max(tile_max, logit);
    }
  }
  if (tile_max == kNegInf) return;  // nothing visible (or every term underflows) in this tile
  const T new_max = std::max(run_max, tile_max);
  const T rescale = std::exp(run_max - new_max);  // 0 on the row's first visible tile
  const T tile_sum = ExpShiftedSum<T, kAvx2>::apply(buf, kt, new_max);
  run_sum = run_sum * rescale + tile_sum;
  run_max = new_max;
  if (c == 0) return;
  for (int64_t v = 0; v < c; ++v) acc[v] *= rescale;
  for (int64_t j = 0; j < kt; ++j) {
    const T w = buf[j];
    if (w == T(0)) continue;
    const T* row = values + j * c;
#pragma omp simd
    for (int64_t v = 0; v < c; ++v) acc[v] += w * row[v];
  }
}

// Fold one key tile [k0, k0 + kt) into the rows of queries [i0, i0 + qb). dots (qb, ld) holds the
// queries' dot products with the tile's keys.
// Fold one key tile [k0, k0 + kt) into the rows of queries [i0, i0 + qb). dots (qb, ld) holds the
// queries' dot products with the tile's keys; buf (kt) is scratch; sums the rows' running sums.
template <typename T>
struct FoldTile {
  const KdeView<T>& view;
  int64_t i0, qb, k0, kt;
  const T* dots;
  int64_t ld;
  T* buf;
  T* sums;

  template <bool kAvx2>
  RELFLAT_INLINE void run() const {
    const KdeView<T>& p = view;
    const T* kn = p.key_sq_norms + k0;
    for (int64_t r = 0; r < p.n_splits; ++r) {
      const int64_t* key_ids = p.key_split != nullptr ? p.key_split + r * p.nk + k0 : nullptr;
      for (int64_t b = 0; b < p.n_bw; ++b) {
        const T* coef = p.coef + b * p.nk + k0;
        const T* lognorm = p.lognorm + b * p.nk + k0;
        const int64_t row0 = (r * p.n_bw + b) * p.nq + i0;
        for (int64_t i = 0; i < qb; ++i) {
          const int64_t query_id = p.query_split != nullptr ? p.query_split[r * p.nq + i0 + i] : 0;
          T* acc = p.wval + (row0 + i) * p.c;
          update_row<T, kAvx2>(dots + i * ld, p.query_sq_norms[i0 + i], kn, coef, lognorm, key_ids, query_id,
                               p.values + k0 * p.c, p.c, kt, buf, p.logdens[row0 + i],
                               sums[(r * p.n_bw + b) * kQueryBlock + i], acc);
        }
      }
    }
  }
};

template <typename T>
void finish_rows(const KdeView<T>& p, int64_t i0, int64_t qb, const T* sums) {
  for (int64_t r = 0; r < p.n_splits; ++r)
    for (int64_t b = 0; b < p.n_bw; ++b)
      for (int64_t i = 0; i < qb; ++i) {
        const int64_t row = (r * p.n_bw + b) * p.nq + i0 + i;
        finish_kde_row<T>(sums[(r * p.n_bw + b) * kQueryBlock + i], p.n_visible[r * p.nq + i0 + i], p.logdens + row,
                          p.wval + row * p.c, p.c);
      }
}

std::tuple<at::Tensor, at::Tensor> gaussian_kernel_reduce_cpu(
    const at::Tensor& queries, const at::Tensor& keys, const std::optional<at::Tensor>& values,
    const at::Tensor& bandwidths, const std::optional<at::Tensor>& key_scale,
    const std::optional<at::Tensor>& query_split, const std::optional<at::Tensor>& key_split) {
  const KdeProblem in = prepare_kde(queries, keys, values, bandwidths, key_scale, query_split, key_split);
  const int64_t nq = in.nq, nk = in.nk, n_bw = in.n_bw, c = in.c;
  if (nq == 0 || nk == 0) return {in.logdens, in.wval};
  const at::Tensor keys_t = in.keys.t();  // (m, nk), a strided view BLAS reads directly
  AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "gaussian_kernel_reduce_cpu", [&] {
    using T = scalar_t;
    const KdeView<T> p{in.query_sq_norms.data_ptr<T>(),
                       in.key_sq_norms.data_ptr<T>(),
                       c > 0 ? in.values.data_ptr<T>() : nullptr,
                       in.coef.data_ptr<T>(),
                       in.lognorm.data_ptr<T>(),
                       in.n_visible.data_ptr<T>(),
                       in.query_split.defined() ? in.query_split.data_ptr<int64_t>() : nullptr,
                       in.key_split.defined() ? in.key_split.data_ptr<int64_t>() : nullptr,
                       nq, nk, c, n_bw, in.n_splits,
                       in.logdens.data_ptr<T>(), in.wval.data_ptr<T>()};
    const int64_t n_blocks = (nq + kQueryBlock - 1) / kQueryBlock;
    at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor dots = at::empty({kQueryBlock, kKeyTile}, queries.options());
      std::vector<T> buf(kKeyTile);
      std::vector<T> sums(in.n_splits * n_bw * kQueryBlock);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t i0 = blk * kQueryBlock, qb = std::min(kQueryBlock, nq - i0);
        std::fill(sums.begin(), sums.end(), T(0));
        const at::Tensor query_rows = in.queries.narrow(0, i0, qb);
        for (int64_t k0 = 0; k0 < nk; k0 += kKeyTile) {
          const int64_t kt = std::min(kKeyTile, nk - k0);
          at::Tensor tile = dots.narrow(0, 0, qb).narrow(1, 0, kt);
          at::mm_out(tile, query_rows, keys_t.narrow(1, k0, kt));
          run_best_isa(FoldTile<T>{p, i0, qb, k0, kt, tile.data_ptr<T>(), tile.stride(0), buf.data(), sums.data()});
        }
        finish_rows<T>(p, i0, qb, sums.data());
      }
    });
  });
  return {in.logdens, in.wval};
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CPU, m) { m.impl("gaussian_kernel_reduce", &gaussian_kernel_reduce_cpu); }

}  // namespace relflat
