// CUDA implementations of the qdarts_C ops (schemas in csrc/ops.cpp): argument checks, device
// guard, output and scratch allocation through torch's caching allocator, and the launches of the
// kernels in csrc/cuda/*.cu (declared in csrc/cuda/kernels.h) on the current stream.
//
// Kernels read parameters (probs, scales, weights) on the device: nothing here synchronises with
// the host, so a call is only launches.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
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
  TORCH_CHECK(grid >= 0 && grid < kNumGrids, "grid must be 0 (signed), 1 (unsigned), 2 (midrise) or 3 (relu), got ",
              grid);
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
    // gridDim.x is at most 2^31 - 1. It holds the channels, and in the backward's second pass (one
    // launch, launch_sum_partials) the K dprobs and the K * channels dscales together: K * (channels + 1).
    TORCH_CHECK(k * (channels + 1) <= std::numeric_limits<int32_t>::max(), "x has ", channels,
                " channels along axis ", axis, "; with ", k,
                " bit-widths the CUDA kernels support at most (2^31 - 1) / ", k, " - 1");
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

// The checked arguments of a grouped call: per-tensor descriptors (data pointers, views, dscales
// offsets) on the host, the contiguous tensors they point into, and the shared quantizer.
struct GroupedArgs {
  std::vector<at::Tensor> xs;
  std::vector<at::Tensor> scales;
  at::Tensor probs;
  int64_t scales_numel;
  std::vector<gpu::GroupedTensor> tensors;
  gpu::DType dtype;
  gpu::MixedQuantizer quantizer;
  bool per_channel;
  bool vectorize;
};

GroupedArgs check_grouped(at::TensorList xs, const at::Tensor& probs, at::TensorList scales, at::IntArrayRef bits,
                          int64_t grid, at::IntArrayRef axes) {
  const int64_t n = static_cast<int64_t>(xs.size());
  TORCH_CHECK(n >= 1 && n <= std::numeric_limits<int32_t>::max(), "xs must hold at least one tensor, got ", n);
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == n && static_cast<int64_t>(axes.size()) == n,
              "scales and axes must hold one entry per x (", n, "), got ", scales.size(), " and ", axes.size());
  const int64_t k = static_cast<int64_t>(bits.size());
  TORCH_CHECK(probs.dim() == 2 && probs.size(0) == n && probs.size(1) == k, "probs must have shape [", n, ", ", k,
              "], got ", probs.sizes());
  GroupedArgs args;
  args.probs = probs.contiguous();
  args.per_channel = axes[0] != -1;
  int64_t scale_offset = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK((axes[i] != -1) == args.per_channel, "axes must be all -1 (per tensor) or all >= 0, got ", axes);
    TORCH_CHECK(xs[i].scalar_type() == xs[0].scalar_type() && xs[i].device() == xs[0].device(), "xs[", i,
                "] has dtype ", xs[i].scalar_type(), " on ", xs[i].device(), " but xs[0] has ", xs[0].scalar_type(),
                " on ", xs[0].device());
    // the single op's checks, on row i of probs
    MixedFakeQuantArgs one = check_mixed_fake_quant(xs[i], args.probs[i], scales[i], bits, grid, axes[i]);
    args.dtype = one.dtype;
    args.quantizer = one.quantizer;
    gpu::GroupedTensor t{};
    t.x = one.x.const_data_ptr();
    t.scales = one.scales.const_data_ptr<float>();
    t.view = one.view;
    t.scale_offset = scale_offset;
    scale_offset += one.scales.numel();
    args.tensors.push_back(t);
    args.xs.push_back(one.x);
    args.scales.push_back(one.scales);
  }
  args.scales_numel = scale_offset;
  args.quantizer.probs = args.probs.data_ptr<float>();
  args.quantizer.scales = nullptr;  // per tensor, in the descriptors
  return args;
}

// 16-byte accesses need every pointer aligned and, per channel, every row a multiple of the vector.
bool can_vectorize_grouped(const GroupedArgs& args) {
  const int64_t width = 16 / static_cast<int64_t>(args.xs[0].element_size());
  for (const gpu::GroupedTensor& t : args.tensors) {
    for (const void* p : {t.x, static_cast<const void*>(t.out), t.grad}) {
      if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
    }
    if (args.per_channel && t.view.inner % width != 0) return false;
  }
  return true;
}

// The grouped kernels put the blocks of all their tensors on one 1-D grid, whose size CUDA caps at
// 2^31 - 1; each tensor alone passes check_grouped, but not necessarily their sum (per channel, a
// tensor of more than 65536 channels takes one block per channel).
void check_grid_size(int64_t count, const char* what) {
  TORCH_CHECK(count <= std::numeric_limits<int32_t>::max(), "the grouped call needs ", count, " ", what,
              " in one launch, more than CUDA's grid allows (2^31 - 1): quantize these tensors in several "
              "calls, or one by one with mixed_fake_quant");
}

// The descriptors on the device: one asynchronous copy from pinned memory (no host sync; the
// caching host allocator keeps the pinned block until the copy has run). Refused during a CUDA-graph
// capture, where the copy would be replayed from a block handed out again: the public op calls the
// single-tensor kernels there (qdarts_kernels.ops._grouped_pair); this guards direct calls of the op.
at::Tensor descriptors_on_device(const std::vector<gpu::GroupedTensor>& tensors, const at::Device& device) {
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "the grouped CUDA kernels cannot be captured into a CUDA graph (their descriptor table is copied from "
              "host memory); call qdarts_kernels.mixed_fake_quant_grouped, which runs one kernel per tensor while a "
              "capture is under way");
  const int64_t bytes = static_cast<int64_t>(tensors.size() * sizeof(gpu::GroupedTensor));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), tensors.data(), static_cast<size_t>(bytes));
  return host.to(device, /*non_blocking=*/true);
}

std::vector<at::Tensor> mixed_fake_quant_grouped_forward_cuda(at::TensorList xs, const at::Tensor& probs,
                                                              at::TensorList scales, at::IntArrayRef bits,
                                                              int64_t grid, at::IntArrayRef axes) {
  GroupedArgs args = check_grouped(xs, probs, scales, bits, grid, axes);
  const c10::cuda::CUDAGuard device_guard(args.xs[0].device());
  std::vector<at::Tensor> ys;
  for (size_t i = 0; i < args.xs.size(); ++i) {
    ys.push_back(at::empty_like(args.xs[i], at::MemoryFormat::Contiguous));
    args.tensors[i].out = ys.back().mutable_data_ptr();
  }
  int64_t segments = 0;
  const int n = static_cast<int>(args.tensors.size());
  const int64_t blocks = gpu::plan_mixed_fake_quant_grouped(args.tensors.data(), n, false, &segments);
  if (blocks == 0) return ys;
  check_grid_size(blocks, "blocks");
  const at::Tensor device_tensors = descriptors_on_device(args.tensors, args.xs[0].device());
  gpu::launch_mixed_fake_quant_grouped_forward(
      static_cast<const gpu::GroupedTensor*>(device_tensors.const_data_ptr()), n, blocks, args.dtype,
      args.quantizer, args.per_channel, can_vectorize_grouped(args), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ys;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> mixed_fake_quant_grouped_backward_cuda(
    at::TensorList grads, at::TensorList xs, const at::Tensor& probs, at::TensorList scales, at::IntArrayRef bits,
    int64_t grid, at::IntArrayRef axes, bool need_dx, bool need_dprobs, bool need_dscales) {
  GroupedArgs args = check_grouped(xs, probs, scales, bits, grid, axes);
  TORCH_CHECK(grads.size() == xs.size(), "grads must hold one tensor per x (", xs.size(), "), got ", grads.size());
  const c10::cuda::CUDAGuard device_guard(args.xs[0].device());
  const at::TensorOptions f32 = args.xs[0].options().dtype(at::kFloat);
  std::vector<at::Tensor> gs;
  std::vector<at::Tensor> dxs;
  for (size_t i = 0; i < args.xs.size(); ++i) {
    const at::Tensor& x = args.xs[i];
    check_same_device(grads[i], x, "grad", "x");
    TORCH_CHECK(grads[i].sizes() == x.sizes() && grads[i].scalar_type() == x.scalar_type(), "grads[", i,
                "] must have the shape and dtype of xs[", i, "] (", x.sizes(), ", ", x.scalar_type(), "), got ",
                grads[i].sizes(), ", ", grads[i].scalar_type());
    gs.push_back(grads[i].contiguous());
    args.tensors[i].grad = gs.back().const_data_ptr();
    if (need_dx) {
      dxs.push_back(at::empty_like(x, at::MemoryFormat::Contiguous));
      args.tensors[i].out = dxs.back().mutable_data_ptr();
    }
  }
  const int n = static_cast<int>(args.tensors.size());
  const int k = args.quantizer.num_bits;
  at::Tensor dprobs = need_dprobs ? at::empty({n, k}, f32) : at::empty({0}, f32);
  at::Tensor dscales = need_dscales ? at::empty({args.scales_numel}, f32) : at::empty({0}, f32);
  if (!(need_dx || need_dprobs || need_dscales)) return {dxs, dprobs, dscales};
  int64_t segments = 0;
  const int64_t blocks =
      gpu::plan_mixed_fake_quant_grouped(args.tensors.data(), n, need_dprobs || need_dscales, &segments);
  check_grid_size(blocks, "blocks");
  check_grid_size(n + segments, "reduction segments");
  at::Tensor partials =
      at::empty({gpu::mixed_fake_quant_grouped_partials_size(k, blocks, need_dprobs, need_dscales)}, f32);
  const at::Tensor device_tensors = descriptors_on_device(args.tensors, args.xs[0].device());
  gpu::launch_mixed_fake_quant_grouped_backward(
      static_cast<const gpu::GroupedTensor*>(device_tensors.const_data_ptr()), n, blocks, segments, need_dx,
      need_dprobs ? dprobs.mutable_data_ptr<float>() : nullptr,
      need_dscales ? dscales.mutable_data_ptr<float>() : nullptr, partials.mutable_data_ptr<float>(), args.dtype,
      args.quantizer, args.per_channel, can_vectorize_grouped(args), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dxs, dprobs, dscales};
}

}  // namespace

TORCH_LIBRARY_IMPL(qdarts_C, CUDA, m) {
  m.impl("mixed_fake_quant_forward", &mixed_fake_quant_forward_cuda);
  m.impl("mixed_fake_quant_backward", &mixed_fake_quant_backward_cuda);
  m.impl("mixed_op_sum_forward", &mixed_op_sum_forward_cuda);
  m.impl("mixed_op_sum_backward", &mixed_op_sum_backward_cuda);
  m.impl("mixed_fake_quant_grouped_forward", &mixed_fake_quant_grouped_forward_cuda);
  m.impl("mixed_fake_quant_grouped_backward", &mixed_fake_quant_grouped_backward_cuda);
}

}  // namespace qdarts
