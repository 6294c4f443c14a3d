// CPU block traces of a dense layer Hessian: reads the d*d*m diagonal entries of its m x m blocks.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"

namespace relflat {
namespace {

template <typename scalar_t>
void block_trace_kernel(const at::Tensor& hessian, int64_t d, int64_t m, at::Tensor& out) {
  const scalar_t* h = hessian.data_ptr<scalar_t>();
  const int64_t r = hessian.stride(0), c = hessian.stride(1);
  scalar_t* t = out.data_ptr<scalar_t>();
  at::parallel_for(0, d * d, 1, [&](int64_t begin, int64_t end) {
    for (int64_t st = begin; st < end; ++st) {
      const int64_t s = st / d, u = st % d;
      const scalar_t* base = h + s * m * r + u * m * c;
      scalar_t acc = 0;
      for (int64_t j = 0; j < m; ++j) acc += base[j * (r + c)];
      t[st] = acc;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dense_block_trace_cpu(const at::Tensor& hessian, const at::Tensor& weight) {
  check_dense_args(hessian, weight);
  const int64_t d = weight.size(0), m = weight.size(1);
  at::Tensor block_trace = at::empty({d, d}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(hessian.scalar_type(), "dense_block_trace_cpu",
                             [&] { block_trace_kernel<scalar_t>(hessian, d, m, block_trace); });
  const at::Tensor kappa = (at::mm(weight, weight.t()) * block_trace).sum();
  return {kappa, block_trace};
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CPU, m) { m.impl("dense_block_trace", &dense_block_trace_cpu); }

}  // namespace relflat
