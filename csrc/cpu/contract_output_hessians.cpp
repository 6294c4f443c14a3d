// CPU per-sample contraction of output Hessians: one pass over hz, any strides.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"

namespace relflat {
namespace {

template <typename scalar_t>
void contract_kernel(const at::Tensor& sq_norms, const at::Tensor& hz, const at::Tensor& gram,
                     bool block_trace, at::Tensor& per_sample, at::Tensor& block) {
  const int64_t n = hz.size(0), d = hz.size(1), k = hz.size(2);
  // Walk (s, j) so that the inner loop follows the smaller of hz's two inner strides.
  const bool inner_is_k = hz.stride(2) <= hz.stride(1);
  const int64_t outer = inner_is_k ? d : k, inner = inner_is_k ? k : d;
  const int64_t hs0 = hz.stride(0);
  const int64_t hs_outer = inner_is_k ? hz.stride(1) : hz.stride(2);
  const int64_t hs_inner = inner_is_k ? hz.stride(2) : hz.stride(1);
  // gram laid out as [outer][inner] to match.
  const at::Tensor g = (inner_is_k ? gram : gram.t()).contiguous();
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const scalar_t* hp = hz.data_ptr<scalar_t>();
  const scalar_t* a = sq_norms.data_ptr<scalar_t>();
  const int64_t a_stride = sq_norms.stride(0);
  scalar_t* out = per_sample.data_ptr<scalar_t>();

  const int64_t threads = at::get_num_threads();
  std::vector<scalar_t> partial(block_trace ? threads * d * k : 0, scalar_t(0));
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    scalar_t* acc = block_trace ? partial.data() + at::get_thread_num() * d * k : nullptr;
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t ai = a[i * a_stride];
      scalar_t total = 0;
      for (int64_t o = 0; o < outer; ++o) {
        const scalar_t* row = hp + i * hs0 + o * hs_outer;
        const scalar_t* grow = gp + o * inner;
        scalar_t part = 0;
        if (hs_inner == 1) {
#pragma omp simd reduction(+ : part)
          for (int64_t t = 0; t < inner; ++t) part += grow[t] * row[t];
          if (acc) {
            scalar_t* arow = acc + o * inner;
#pragma omp simd
            for (int64_t t = 0; t < inner; ++t) arow[t] += ai * row[t];
          }
        } else {
          for (int64_t t = 0; t < inner; ++t) part += grow[t] * row[t * hs_inner];
          if (acc) {
            scalar_t* arow = acc + o * inner;
            for (int64_t t = 0; t < inner; ++t) arow[t] += ai * row[t * hs_inner];
          }
        }
        total += part;
      }
      out[i] = ai * total;
    }
  });
  if (block_trace) {
    // Sum the thread-local accumulators, then restore the (d, k) layout.
    at::Tensor sum = at::zeros({outer, inner}, hz.options());
    scalar_t* sp = sum.data_ptr<scalar_t>();
    for (int64_t t = 0; t < threads; ++t)
      for (int64_t e = 0; e < d * k; ++e) sp[e] += partial[t * d * k + e];
    block = inner_is_k ? sum : sum.t().contiguous();
  }
}

std::tuple<at::Tensor, at::Tensor> contract_output_hessians_cpu(const at::Tensor& sq_norms,
                                                                const at::Tensor& hz,
                                                                const at::Tensor& gram, bool block_trace) {
  check_contract_args(sq_norms, hz, gram);
  at::Tensor per_sample = at::empty({hz.size(0)}, hz.options());
  at::Tensor block = block_trace ? at::Tensor() : at::empty({0, 0}, hz.options());
  AT_DISPATCH_FLOATING_TYPES(hz.scalar_type(), "contract_output_hessians_cpu", [&] {
    contract_kernel<scalar_t>(sq_norms, hz, gram, block_trace, per_sample, block);
  });
  return {per_sample, block};
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CPU, m) { m.impl("contract_output_hessians", &contract_output_hessians_cpu); }

}  // namespace relflat
