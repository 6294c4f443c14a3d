// CUDA backward of last_layer_flatness: the shared ATen driver (flatness_backward.h; GEMMs on
// cuBLAS) around a fused row pass, one thread per row: c_i and u_i from one read of its rows.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../flatness_backward.h"

namespace relflat {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void row_pass_kernel(const T* __restrict__ h, const T* __restrict__ slope, const T* __restrict__ qg,
                                int64_t qg_stride, const T* __restrict__ qgamma, int64_t qgamma_stride,
                                const T* __restrict__ g, const T* __restrict__ a, int64_t n, int64_t d,
                                bool cross_entropy, T* __restrict__ a_u, T* __restrict__ two_c) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const T* hi = h + i * d;
  const T* qgi = qg + i * qg_stride;
  const T gi = g[i];
  auto v = [&](int64_t s) { return gi * qgi[s] + (qgamma ? qgamma[i * qgamma_stride + s] : T(0)); };
  T c = 0;
  for (int64_t s = 0; s < d; ++s) c += hi[s] * v(s);
  if (cross_entropy) c *= T(0.5);
  T* out = a_u + i * d;
  const T ai = a[i];
  if (cross_entropy) {
    for (int64_t s = 0; s < d; ++s) out[s] = ai * hi[s] * (v(s) - 2 * c);
  } else {
    for (int64_t s = 0; s < d; ++s) out[s] = ai * hi[s] * slope[i * d + s] * v(s);
  }
  two_c[i] = 2 * c;
}

void row_pass_cuda(RowPassArgs& args) {
  const int64_t n = args.h.size(0), d = args.h.size(1);
  if (n == 0) return;
  const bool cross_entropy = args.loss == kCrossEntropy;
  const int blocks = static_cast<int>((n + kThreads - 1) / kThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(args.h.scalar_type(), "last_layer_flatness_backward_cuda", [&] {
    using T = scalar_t;
    row_pass_kernel<T><<<blocks, kThreads, 0, stream>>>(
        args.h.data_ptr<T>(), cross_entropy ? nullptr : args.slope.data_ptr<T>(), args.qg.data_ptr<T>(),
        args.qg_stride, args.qgamma.defined() ? args.qgamma.data_ptr<T>() : nullptr, args.qgamma_stride,
        args.g.data_ptr<T>(), args.a.data_ptr<T>(), n, d, cross_entropy, args.a_u.data_ptr<T>(),
        args.two_c.data_ptr<T>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> last_layer_flatness_backward_cuda(
    const at::Tensor& grad_per_sample, const at::Tensor& grad_block, const at::Tensor& features,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::string_view loss) {
  check_backward_args(grad_per_sample, grad_block, features, weight, bias);  // before the guard, as the forward
  const c10::cuda::CUDAGuard guard(features.device());
  return last_layer_flatness_backward_impl(grad_per_sample, grad_block, features, weight, bias, loss, row_pass_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, CUDA, m) { m.impl("last_layer_flatness_backward", &last_layer_flatness_backward_cuda); }

}  // namespace relflat
