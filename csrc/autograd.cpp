// The derivative of last_layer_flatness, registered in C++ (an Autograd-key kernel wrapping a
// torch::autograd::Function) and device-agnostic: its backward is the op last_layer_flatness_backward,
// one fused pass per backend. In C++ rather than through torch.library.register_autograd because
// this op sits in training loops (the flatness penalty, once per step), where the Python wrapper
// that register_autograd builds around the forward and the backward cost more than the kernels
// themselves at training batch sizes (bench/RESULTS.md, "The flatness penalty"). The other ops'
// derivatives stay in Python (relflat_ext/ops/_autograd.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace relflat {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& features, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, c10::string_view loss,
                                                bool block_trace, bool per_sample) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("relflat::last_layer_flatness", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const std::optional<at::Tensor>&,
                                                                       c10::string_view, bool, bool)>();
  return op.call(features, weight, bias, loss, block_trace, per_sample);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_per_sample,
                                                             const at::Tensor& grad_block, const at::Tensor& features,
                                                             const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             c10::string_view loss) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("relflat::last_layer_flatness_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const std::optional<at::Tensor>&,
                                                                c10::string_view)>();
  return op.call(grad_per_sample, grad_block, features, weight, bias, loss);
}

class LastLayerFlatness : public torch::autograd::Function<LastLayerFlatness> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& features, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, c10::string_view loss, bool block_trace,
                               bool per_sample) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [per_sample_terms, block_sum] = call_forward(features, weight, bias, loss, block_trace, per_sample);
    ctx->save_for_backward({features, weight, bias.value_or(at::Tensor())});
    ctx->saved_data["loss"] = std::string(loss);
    // An output without a gradient reaches backward undefined (not as zeros), and the backward op
    // takes "none" as an empty tensor: a gradient of the block alone would otherwise send zeros
    // (d, d) and leave the fused per-sample pass.
    ctx->set_materialize_grads(false);
    return {per_sample_terms, block_sum};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& features = saved[0];
    const std::optional<at::Tensor> bias = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const auto given = [&](const at::Tensor& grad, at::IntArrayRef empty_shape) {
      return grad.defined() && grad.sym_numel() > 0 ? grad.contiguous() : at::empty(empty_shape, features.options());
    };
    auto [grad_features, grad_weight, grad_bias] =
        call_backward(given(grads[0], {0}), given(grads[1], {0, 0}), features, saved[1], bias,
                      ctx->saved_data["loss"].toStringRef());
    return {grad_features, grad_weight, bias.has_value() ? grad_bias : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// The backward op has no derivative (first derivatives only): its outputs get a node that raises
// when differentiated, so a second derivative fails loudly instead of silently missing terms.
class LastLayerFlatnessBackward : public torch::autograd::Function<LastLayerFlatnessBackward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_per_sample, const at::Tensor& grad_block,
                               const at::Tensor& features, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, c10::string_view loss) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_features, grad_weight, grad_bias] = call_backward(grad_per_sample, grad_block, features, weight, bias, loss);
    return {grad_features, grad_weight, grad_bias};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "relflat_ext.ops.last_layer_flatness_backward is not differentiable (first derivatives "
                "only): its inputs must not need a gradient (detach them, or call it under torch.no_grad())");
  }
};

std::tuple<at::Tensor, at::Tensor> last_layer_flatness_autograd(const at::Tensor& features, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& bias,
                                                                c10::string_view loss, bool block_trace,
                                                                bool per_sample) {
  const variable_list out = LastLayerFlatness::apply(features, weight, bias, loss, block_trace, per_sample);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> last_layer_flatness_backward_autograd(
    const at::Tensor& grad_per_sample, const at::Tensor& grad_block, const at::Tensor& features,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::string_view loss) {
  const variable_list out = LastLayerFlatnessBackward::apply(grad_per_sample, grad_block, features, weight, bias, loss);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(relflat, Autograd, m) {
  m.impl("last_layer_flatness", &last_layer_flatness_autograd);
  m.impl("last_layer_flatness_backward", &last_layer_flatness_backward_autograd);
}

}  // namespace relflat
