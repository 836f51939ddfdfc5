// CUDA implementations of the qdarts_C ops (schemas in csrc/ops.cpp): argument checks, device
// guard, output and scratch allocation through torch's caching allocator, and the launches of the
// kernels in csrc/cuda/*.cu (declared in csrc/cuda/kernels.h) on the current stream.
//
// Kernels read parameters (probs, scales, weights) on the device: nothing here synchronises with
// the host, so a call is only launches.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "cuda/kernels.h"
#include "quant_math.h"

namespace qdarts {
namespace {

gpu::DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return gpu::DType::kFloat32;
    case at::kHalf:
      return gpu::DType::kFloat16;
    case at::kBFloat16:
      return gpu::DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16 for the CUDA kernels, got ", t.scalar_type());
}

void check_on_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernels, got a tensor on ", t.device());
}

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name, const char* x_name) {
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but ", x_name, " is on ", x.device(),
              "; they must share a device");
}

void check_float32_param(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_same_device(t, x, name, "x");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32 for the CUDA kernels, got ", t.scalar_type());
}

// The checked arguments of a mixed_fake_quant call; the tensors are contiguous.
struct MixedFakeQuantArgs {
  at::Tensor x;
  at::Tensor probs;
  at::Tensor scales;
  gpu::DType dtype;
  gpu::MixedQuantizer quantizer;
  gpu::ChannelView view;
};

MixedFakeQuantArgs check_mixed_fake_quant(const at::Tensor& x, const at::Tensor& probs, const at::Tensor& scales,
                                          at::IntArrayRef bits, int64_t grid, int64_t axis) {
  check_on_cuda(x, "x");
  MixedFakeQuantArgs args;
  args.dtype = kernel_dtype(x, "x");
  check_float32_param(probs, x, "probs");
  check_float32_param(scales, x, "scales");
  const int64_t k = static_cast<int64_t>(bits.size());
  TORCH_CHECK(k >= 1 && k <= kMaxBits, "bits must hold 1..", kMaxBits, " bit-widths, got ", k);
  TORCH_CHECK(grid == kGridSigned || grid == kGridUnsigned || grid == kGridMidrise,
              "grid must be 0 (signed), 1 (unsigned) or 2 (midrise), got ", grid);
  args.quantizer.num_bits = static_cast<int>(k);
  args.quantizer.grid = static_cast<int>(grid);
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(bits[i] >= 1 && bits[i] <= 16, "bits must be in [1, 16], got ", bits[i]);
    args.quantizer.bits[i] = static_cast<int>(bits[i]);
  }
  TORCH_CHECK(probs.dim() == 1 && probs.size(0) == k, "probs must have shape [", k, "], got ", probs.sizes());

  if (axis == -1) {
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == k,
                "scales must have shape [", k, "] for per-tensor quantization (axis -1), got ", scales.sizes());
    args.view = {1, 1, x.numel(), false};
  } else {
    TORCH_CHECK(axis >= 0 && axis < x.dim(), "axis must be -1 or in [0, ", x.dim(), ") for x of shape ", x.sizes(),
                ", got ", axis);
    const int64_t channels = x.size(axis);
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == k && scales.size(1) == channels, "scales must have shape [",
                k, ", ", channels, "] for per-channel quantization along axis ", axis, ", got ", scales.sizes());
    // The grids put channels (and, reducing dscales, K * channels) in gridDim.x, at most 2^31 - 1.
    TORCH_CHECK(channels * k <= std::numeric_limits<int32_t>::max(), "x has ", channels, " channels along axis ",
                axis, "; with ", k, " bit-widths the CUDA kernels support at most (2^31 - 1) / ", k);
    int64_t outer = 1;
    for (int64_t d = 0; d < axis; ++d) outer *= x.size(d);
    int64_t inner = 1;
    for (int64_t d = axis + 1; d < x.dim(); ++d) inner *= x.size(d);
    args.view = {outer, channels, inner, true};
  }
  args.x = x.contiguous();
  args.probs = probs.contiguous();
  args.scales = scales.contiguous();
  args.quantizer.probs = args.probs.data_ptr<float>();
  args.quantizer.scales = args.scales.data_ptr<float>();
  return args;
}

at::Tensor mixed_fake_quant_forward_cuda(const at::Tensor& x, const at::Tensor& probs, const at::Tensor& scales,
                                         at::IntArrayRef bits, int64_t grid, int64_t axis) {
  MixedFakeQuantArgs args = check_mixed_fake_quant(x, probs, scales, bits, grid, axis);
  const c10::cuda::CUDAGuard device_guard(args.x.device());
  at::Tensor y = at::empty_like(args.x, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return y;
  gpu::launch_mixed_fake_quant_forward(args.x.const_data_ptr(), y.mutable_data_ptr(), args.dtype, args.quantizer,
                                       args.view, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_fake_quant_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& probs, const at::Tensor& scales,
    at::IntArrayRef bits, int64_t grid, int64_t axis, bool need_dx, bool need_dprobs, bool need_dscales) {
  MixedFakeQuantArgs args = check_mixed_fake_quant(x, probs, scales, bits, grid, axis);
  check_same_device(grad, x, "grad", "x");
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad must have the shape of x ", x.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "grad must have the dtype of x (", x.scalar_type(), "), got ",
              grad.scalar_type());
  const at::Tensor g = grad.contiguous();
  const c10::cuda::CUDAGuard device_guard(args.x.device());
  const at::TensorOptions f32 = args.x.options().dtype(at::kFloat);

  at::Tensor dx = need_dx ? at::empty_like(args.x, at::MemoryFormat::Contiguous) : args.x.new_empty({0});
  at::Tensor dprobs = need_dprobs ? at::empty({args.quantizer.num_bits}, f32) : at::empty({0}, f32);
  at::Tensor dscales = need_dscales ? at::empty(args.scales.sizes(), f32) : at::empty({0}, f32);
  if (args.x.numel() == 0) {
    // Sums over no elements.
    dprobs.zero_();
    dscales.zero_();
    return {dx, dprobs, dscales};
  }
  const int64_t partials_size =
      gpu::mixed_fake_quant_backward_partials_size(args.quantizer, args.view, need_dprobs, need_dscales);
  at::Tensor partials = at::empty({partials_size}, f32);
  gpu::launch_mixed_fake_quant_backward(
      g.const_data_ptr(), args.x.const_data_ptr(), need_dx ? dx.mutable_data_ptr() : nullptr,
      need_dprobs ? dprobs.mutable_data_ptr<float>() : nullptr,
      need_dscales ? dscales.mutable_data_ptr<float>() : nullptr, partials.mutable_data_ptr<float>(), args.dtype,
      args.quantizer, args.view, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dprobs, dscales};
}

// The checked arguments of a mixed_op_sum call; the tensors are contiguous.
struct MixedOpSumArgs {
  std::vector<at::Tensor> outputs;
  at::Tensor weights;
  gpu::DType dtype;
  gpu::OpSumInputs inputs;
};

MixedOpSumArgs check_mixed_op_sum(at::TensorList outputs, const at::Tensor& weights) {
  const int64_t k = static_cast<int64_t>(outputs.size());
  TORCH_CHECK(k >= 1 && k <= gpu::kMaxOpSumInputs, "outputs must hold 1..", gpu::kMaxOpSumInputs,
              " tensors for the CUDA kernels, got ", k);
  const at::Tensor& first = outputs[0];
  check_on_cuda(first, "outputs[0]");
  MixedOpSumArgs args;
  args.dtype = kernel_dtype(first, "outputs[0]");
  for (int64_t i = 1; i < k; ++i) {
    const at::Tensor& o = outputs[i];
    TORCH_CHECK(o.sizes() == first.sizes(), "outputs[", i, "] has shape ", o.sizes(), " but outputs[0] has ",
                first.sizes());
    TORCH_CHECK(o.scalar_type() == first.scalar_type(), "outputs[", i, "] has dtype ", o.scalar_type(),
                " but outputs[0] has ", first.scalar_type());
    TORCH_CHECK(o.device() == first.device(), "outputs[", i, "] is on ", o.device(), " but outputs[0] is on ",
                first.device());
  }
  check_same_device(weights, first, "weights", "outputs[0]");
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "weights must be float32 for the CUDA kernels, got ",
              weights.scalar_type());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == k, "weights must have shape [", k, "], got ",
              weights.sizes());
  args.weights = weights.contiguous();
  args.inputs.count = static_cast<int>(k);
  for (int64_t i = 0; i < k; ++i) {
    args.outputs.push_back(outputs[i].contiguous());
    args.inputs.tensors[i] = args.outputs.back().const_data_ptr();
  }
  return args;
}

at::Tensor mixed_op_sum_forward_cuda(at::TensorList outputs, const at::Tensor& weights) {
  MixedOpSumArgs args = check_mixed_op_sum(outputs, weights);
  const at::Tensor& first = args.outputs[0];
  const c10::cuda::CUDAGuard device_guard(first.device());
  at::Tensor y = at::empty_like(first, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return y;
  gpu::launch_mixed_op_sum_forward(args.inputs, args.weights.const_data_ptr<float>(), y.mutable_data_ptr(),
                                   y.numel(), args.dtype, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_op_sum_backward_cuda(const at::Tensor& grad,
                                                                           at::TensorList outputs,
                                                                           const at::Tensor& weights,
                                                                           bool need_doutputs, bool need_dweights) {
  MixedOpSumArgs args = check_mixed_op_sum(outputs, weights);
  const at::Tensor& first = args.outputs[0];
  check_same_device(grad, first, "grad", "outputs[0]");
  TORCH_CHECK(grad.sizes() == first.sizes(), "grad must have the shape of the outputs ", first.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == first.scalar_type(), "grad must have the dtype of the outputs (",
              first.scalar_type(), "), got ", grad.scalar_type());
  const at::Tensor g = grad.contiguous();
  const c10::cuda::CUDAGuard device_guard(first.device());
  const at::TensorOptions f32 = first.options().dtype(at::kFloat);
  const int count = args.inputs.count;

  std::vector<at::Tensor> doutputs;
  void* doutput_ptrs[gpu::kMaxOpSumInputs] = {};
  if (need_doutputs) {
    for (int k = 0; k < count; ++k) {
      doutputs.push_back(at::empty_like(first, at::MemoryFormat::Contiguous));
      doutput_ptrs[k] = doutputs.back().mutable_data_ptr();
    }
  }
  at::Tensor dweights = need_dweights ? at::empty({count}, f32) : at::empty({0}, f32);
  const int64_t numel = first.numel();
  if (numel == 0) {
    dweights.zero_();
    return {doutputs, dweights};
  }
  at::Tensor partials = at::empty({gpu::mixed_op_sum_backward_partials_size(count, numel, need_dweights)}, f32);
  gpu::launch_mixed_op_sum_backward(g.const_data_ptr(), args.inputs, args.weights.const_data_ptr<float>(),
                                    need_doutputs ? doutput_ptrs : nullptr,
                                    need_dweights ? dweights.mutable_data_ptr<float>() : nullptr,
                                    partials.mutable_data_ptr<float>(), numel, args.dtype,
                                    c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {doutputs, dweights};
}

}  // namespace

TORCH_LIBRARY_IMPL(qdarts_C, CUDA, m) {
  m.impl("mixed_fake_quant_forward", &mixed_fake_quant_forward_cuda);
  m.impl("mixed_fake_quant_backward", &mixed_fake_quant_backward_cuda);
  m.impl("mixed_op_sum_forward", &mixed_op_sum_forward_cuda);
  m.impl("mixed_op_sum_backward", &mixed_op_sum_backward_cuda);
}

}  // namespace qdarts
