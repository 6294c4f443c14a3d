// CPU backward of last_layer_flatness: the shared ATen driver (flatness_backward.h) around a fused
// row pass that turns each softmax / sigmoid row into c_i and u_i in one read.
#include <ATen/Parallel.h>
#include <vector>
#include <torch/library.h>

#include "../flatness_backward.h"

namespace relflat {
namespace {

template <typename T>
void row_pass_kernel(const RowPassArgs& args) {
  const int64_t n = args.h.size(0), d = args.h.size(1);
  const bool cross_entropy = args.loss == kCrossEntropy;
  const T* h = args.h.data_ptr<T>();
  const T* slope = cross_entropy ? nullptr : args.slope.data_ptr<T>();
  const T* qg = args.qg.data_ptr<T>();
  const T* qgamma = args.qgamma.defined() ? args.qgamma.data_ptr<T>() : nullptr;
  const T* g = args.g.data_ptr<T>();
  const T* a = args.a.data_ptr<T>();
  T* a_u = args.a_u.data_ptr<T>();
  T* two_c = args.two_c.data_ptr<T>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    std::vector<T> v(d);
    for (int64_t i = begin; i < end; ++i) {
      const T* hi = h + i * d;
      const T* qgi = qg + i * args.qg_stride;
      T c = 0;
      for (int64_t s = 0; s < d; ++s) {
        v[s] = g[i] * qgi[s] + (qgamma ? qgamma[i * args.qgamma_stride + s] : T(0));
        c += hi[s] * v[s];
      }
      if (cross_entropy) c *= T(0.5);
      T* out = a_u + i * d;
      if (cross_entropy) {
        for (int64_t s = 0; s < d; ++s) out[s] = a[i] * hi[s] * (v[s] - 2 * c);
      } else {
        const T* slope_i = slope + i * d;
        for (int64_t s = 0; s < d; ++s) out[s] = a[i] * hi[s] * slope_i[s] * v[s];
      }
      two_c[i] = 2 * c;
    }
  });
}

void row_pass_cpu(RowPassArgs& args) {
  AT_DISPATCH_FLOATING_TYPES(args.h.scalar_type(), "last_layer_flatness_backward_cpu",
                             [&] { row_pass_kernel<scalar_t>(args); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> last_layer_flatness_backward_cpu(
    const at::Tensor& grad_per_sample, const at::Tensor& grad_block, const at::Tensor& features,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::string_view loss) {
  return last_layer_flatness_backward_impl(grad_per_sample, grad_block, features, weight, bias, loss, row_pass_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CPU, m) { m.impl("last_layer_flatness_backward", &last_layer_flatness_backward_cpu); }

}  // namespace relflat
