// mixed_op_sum with its autograd in C++: the eager path of the cpu backend (qdarts_kernels/ops.py).
//
// Why C++: the kernels of a large mixed_op_sum stream tens of MiB through the caches, and the
// Python that runs between them (a torch.autograd.Function's forward and backward, the checks and
// adapters around the raw ops) then runs from cold caches. Measured on the 2-core VM of
// bench/results (K=8, 1M fp32 elements per output, forward+backward): the Python glue took
// 0.3-0.45 ms around 2.6 ms of kernels, 20-55 us at 16 elements. Here the backward runs without
// Python and without the GIL: the autograd engine calls MixedOpSum::backward directly.
//
// The maths and the choices are those of the Python autograd (ops._MixedOpSumFunction): the K
// outputs are kept for backward only when the weights need a gradient (the backward reads them
// for d weights only; otherwise the raw backward gets grad K times as stand-ins of their shape),
// only the gradients that are needed are computed, weights reach the kernels as contiguous fp32 and
// d weights goes back in the weights' dtype, and a backward with create_graph=True records the
// gradients as the outputs of a node that refuses to be differentiated (the kernels compute first
// derivatives only, so only a second derivative, when asked for, is an error: _functorch.first_order).
// Arguments are validated in Python before this op is called; the raw ops re-check them.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

namespace qdarts {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor mixed_op_sum_forward(at::TensorList outputs, const at::Tensor& weights) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qdarts_C::mixed_op_sum_forward", "")
                             .typed<at::Tensor(at::TensorList, const at::Tensor&)>();
  return op.call(outputs, weights);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_op_sum_backward(const at::Tensor& grad, at::TensorList outputs,
                                                                     const at::Tensor& weights, bool need_doutputs,
                                                                     bool need_dweights) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qdarts_C::mixed_op_sum_backward", "")
                             .typed<std::tuple<std::vector<at::Tensor>, at::Tensor>(
                                 const at::Tensor&, at::TensorList, const at::Tensor&, bool, bool)>();
  return op.call(grad, outputs, weights, need_doutputs, need_dweights);
}

// Tensors that are already as wanted pass as they are, without an aten::to / contiguous call that
// would return its input (which the dispatcher's schema checks refuse below autograd).
at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() != dtype) {
    return t.to(t.options().dtype(dtype), /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
  }
  return t.is_contiguous() ? t : t.contiguous();
}

at::Tensor kernel_weights(const at::Tensor& weights) { return contiguous_as(weights, at::kFloat); }

// The backward's kernels: d outputs (K of them, undefined unless need_doutputs), then d weights
// (undefined unless need_dweights).
variable_list mixed_op_sum_gradients(const at::Tensor& grad, at::TensorList outputs, const at::Tensor& weights,
                                     bool need_doutputs, bool need_dweights) {
  const int64_t k = weights.size(0);  // one weight per output
  variable_list result(k + 1);
  auto [doutputs, dweights] =
      mixed_op_sum_backward(grad, outputs, kernel_weights(weights), need_doutputs, need_dweights);
  if (need_doutputs) std::move(doutputs.begin(), doutputs.end(), result.begin());
  if (need_dweights) result[k] = contiguous_as(dweights, weights.scalar_type());
  return result;
}

// The gradients of a backward run with create_graph=True, as a node of the recorded graph: their
// values are those of a plain backward, and differentiating them raises (the message of the Python
// autograd's _functorch._FirstOrderBackward). A custom node's outputs must be defined tensors, so it
// returns only the gradients asked for; apply_first_order puts them back in their places.
struct MixedOpSumGradients : public torch::autograd::Function<MixedOpSumGradients> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad, at::TensorList outputs,
                               const at::Tensor& weights, bool need_doutputs, bool need_dweights) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->saved_data["cuda"] = grad.device().type() == at::kCUDA;
    variable_list asked;
    for (at::Tensor& g : mixed_op_sum_gradients(grad, outputs, weights, need_doutputs, need_dweights)) {
      if (g.defined()) asked.push_back(std::move(g));
    }
    return asked;
  }

  static variable_list apply_first_order(const at::Tensor& grad, at::TensorList outputs, const at::Tensor& weights,
                                         bool need_doutputs, bool need_dweights) {
    variable_list asked = apply(grad, outputs, weights, need_doutputs, need_dweights);
    const int64_t k = weights.size(0);
    variable_list result(k + 1);
    if (need_doutputs) std::move(asked.begin(), asked.begin() + k, result.begin());
    if (need_dweights) result[k] = std::move(asked.back());
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, "mixed_op_sum: backend '", ctx->saved_data["cuda"].toBool() ? "cuda" : "cpu",
                "' has no second derivative (a gradient of its gradient); use backend='reference' for "
                "higher-order gradients");
  }
};

struct MixedOpSum : public torch::autograd::Function<MixedOpSum> {
  static at::Tensor forward(AutogradContext* ctx, at::TensorList outputs, const at::Tensor& weights) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<at::Tensor> kept{weights};
    if (weights.requires_grad()) kept.insert(kept.end(), outputs.begin(), outputs.end());
    ctx->save_for_backward(kept);
    return mixed_op_sum_forward(outputs, kernel_weights(weights));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_out = grads[0];
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& weights = saved[0];
    const int64_t k = weights.size(0);  // one weight per output
    bool need_doutputs = false;
    for (int64_t i = 0; i < k; ++i) need_doutputs = need_doutputs || ctx->needs_input_grad(i);
    const bool need_dweights = ctx->needs_input_grad(k);
    if (!need_doutputs && !need_dweights) return variable_list(k + 1);

    const at::Tensor grad = contiguous_as(grad_out, grad_out.scalar_type());
    const std::vector<at::Tensor> outputs =
        saved.size() > 1 ? std::vector<at::Tensor>(saved.begin() + 1, saved.end()) : std::vector<at::Tensor>(k, grad);
    if (at::GradMode::is_enabled()) {  // create_graph=True
      return MixedOpSumGradients::apply_first_order(grad, outputs, weights, need_doutputs, need_dweights);
    }
    return mixed_op_sum_gradients(grad, outputs, weights, need_doutputs, need_dweights);
  }
};

at::Tensor mixed_op_sum_autograd(at::TensorList outputs, const at::Tensor& weights) {
  return MixedOpSum::apply(outputs, weights);
}

// Below autograd (inference mode, or a caller that has excluded it): the forward alone.
at::Tensor mixed_op_sum_no_autograd(at::TensorList outputs, const at::Tensor& weights) {
  return mixed_op_sum_forward(outputs, kernel_weights(weights));
}

}  // namespace

TORCH_LIBRARY_IMPL(qdarts_C, Autograd, m) { m.impl("mixed_op_sum", &mixed_op_sum_autograd); }

TORCH_LIBRARY_IMPL(qdarts_C, CompositeExplicitAutograd, m) { m.impl("mixed_op_sum", &mixed_op_sum_no_autograd); }

}  // namespace qdarts
