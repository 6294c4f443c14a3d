// Gaussian kernel reduction: argument checks and the O((nq + nk) m) preparation both backends share.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <math.h>
#include <optional>

#include "common.h"

namespace relflat {

inline void check_kde_args(const at::Tensor& queries, const at::Tensor& keys, const std::optional<at::Tensor>& values,
                           const at::Tensor& bandwidths, const std::optional<at::Tensor>& key_scale,
                           const std::optional<at::Tensor>& query_split,
                           const std::optional<at::Tensor>& key_split) {
  check_float_matrix(queries, "queries", 2);
  check_float_matrix(keys, "keys", 2);
  check_same(keys, queries, "keys");
  TORCH_CHECK(keys.size(1) == queries.size(1), "keys must be (nk, m) with m = ", queries.size(1), ", got ",
              keys.sizes());
  if (values.has_value()) {
    check_float_matrix(*values, "values", 2);
    check_same(*values, queries, "values");
    TORCH_CHECK(values->size(0) == keys.size(0), "values must be (nk, c) with nk = ", keys.size(0), ", got ",
                values->sizes());
  }
  check_float_matrix(bandwidths, "bandwidths", 1);
  check_same(bandwidths, queries, "bandwidths");
  TORCH_CHECK(bandwidths.size(0) >= 1, "bandwidths must hold at least one bandwidth");
  if (key_scale.has_value()) {
    check_float_matrix(*key_scale, "key_scale", 1);
    check_same(*key_scale, queries, "key_scale");
    TORCH_CHECK(key_scale->size(0) == keys.size(0), "key_scale must be (", keys.size(0), "), got ",
                key_scale->sizes());
  }
  TORCH_CHECK(query_split.has_value() == key_split.has_value(),
              "query_split and key_split must be given together or not at all");
  if (query_split.has_value()) {
    for (const auto* split : {&*query_split, &*key_split}) {
      TORCH_CHECK(split->scalar_type() == at::kLong, "split ids must be int64, got ", split->scalar_type());
      TORCH_CHECK(split->dim() == 2, "split ids must be 2-D (R, n), got ", split->sizes());
      TORCH_CHECK(split->device() == queries.device(), "split ids must be on ", queries.device());
    }
    TORCH_CHECK(query_split->size(0) == key_split->size(0) && query_split->size(0) >= 1 &&
                    query_split->size(1) == queries.size(0) && key_split->size(1) == keys.size(0),
                "query_split must be (R, nq) and key_split (R, nk) with the same R >= 1, got ",
                query_split->sizes(), " and ", key_split->sizes());
  }
}

// One problem as both backends take it: the arguments checked, everything the kernels read made
// contiguous, the sizes, and the outputs in their no-visible-key state (-inf and zeros), which is
// also the answer when there are no queries or no keys. Queries and keys are centred on the keys'
// mean, which leaves distances unchanged but shrinks the norms in |q|^2 + |k|^2 - 2 q.k, so the
// expansion loses less to cancellation. coef = -1 / (2 h^2) and lognorm = -m log h - (m/2) log(2 pi),
// per bandwidth and key: (B, nk). n_visible (R, nq) counts the keys each query sees (a binary search
// per query in the sorted key ids), in the data dtype so the kernels can take its log.
struct KdeProblem {
  at::Tensor queries, keys, query_sq_norms, key_sq_norms, values, coef, lognorm, query_split, key_split,
      n_visible;
  at::Tensor logdens, wval;  // outputs (R, B, nq) and (R, B, nq, c)
  int64_t nq = 0, nk = 0, c = 0, n_bw = 0, n_splits = 1;
};

inline KdeProblem prepare_kde(const at::Tensor& queries, const at::Tensor& keys,
                              const std::optional<at::Tensor>& values, const at::Tensor& bandwidths,
                              const std::optional<at::Tensor>& key_scale, const std::optional<at::Tensor>& query_split,
                              const std::optional<at::Tensor>& key_split) {
  check_kde_args(queries, keys, values, bandwidths, key_scale, query_split, key_split);
  KdeProblem in;
  const int64_t m = queries.size(1);
  const int64_t nk = keys.size(0);
  const at::Tensor centre = nk > 0 ? keys.mean(0, /*keepdim=*/true) : at::zeros({1, m}, keys.options());
  in.queries = (queries - centre).contiguous();
  in.keys = (keys - centre).contiguous();
  in.query_sq_norms = in.queries.square().sum(1);
  in.key_sq_norms = in.keys.square().sum(1);
  if (values.has_value()) in.values = values->contiguous();
  at::Tensor h = bandwidths.unsqueeze(1).expand({bandwidths.size(0), nk});
  if (key_scale.has_value()) h = h * key_scale->unsqueeze(0);
  h = h.contiguous();
  in.coef = (-0.5 / h.square()).contiguous();
  in.lognorm = (-static_cast<double>(m) * h.log() - 0.5 * static_cast<double>(m) * std::log(2.0 * M_PI)).contiguous();
  if (query_split.has_value()) {
    in.query_split = query_split->contiguous();
    in.key_split = key_split->contiguous();
    in.n_splits = query_split->size(0);
    const at::Tensor sorted = std::get<0>(in.key_split.sort(1));
    const at::Tensor first = at::searchsorted(sorted, in.query_split, /*out_int32=*/false, /*right=*/false);
    const at::Tensor last = at::searchsorted(sorted, in.query_split, /*out_int32=*/false, /*right=*/true);
    in.n_visible = (nk - (last - first)).to(queries.scalar_type());
  } else {
    in.n_visible = at::full({1, queries.size(0)}, static_cast<double>(nk), queries.options());
  }
  in.nq = queries.size(0);
  in.nk = nk;
  in.c = values.has_value() ? values->size(1) : 0;
  in.n_bw = bandwidths.size(0);
  in.logdens = at::full({in.n_splits, in.n_bw, in.nq}, -std::numeric_limits<double>::infinity(), queries.options());
  in.wval = at::zeros({in.n_splits, in.n_bw, in.nq, in.c}, queries.options());
  return in;
}

#if defined(__CUDACC__)
#define RELFLAT_HOST_DEVICE __host__ __device__
#else
#define RELFLAT_HOST_DEVICE
#endif

// Ends one (split, bandwidth, query) row of the online log-sum-exp: logdens holds the running max
// and becomes max + log(sum) - log(#visible); the weighted values are divided by the sum. A row that
// saw nothing (sum 0) gets -inf and zeros. Shared by the CPU and CUDA kernels.
template <typename T>
RELFLAT_HOST_DEVICE inline void finish_kde_row(T sum, T n_visible, T* logdens, T* values, int64_t c) {
  if (sum > T(0)) {
    *logdens += log(sum) - log(n_visible);
    for (int64_t v = 0; v < c; ++v) values[v] /= sum;
  } else {
    *logdens = -INFINITY;
    for (int64_t v = 0; v < c; ++v) values[v] = T(0);
  }
}

}  // namespace relflat
