// Argument checks of the qdarts_C ops, shared by every device's glue (CPU kernels, CUDA glue).
//
// Only metadata is looked at here (dtypes, shapes, devices, the int arguments), so these checks are
// device-agnostic and never synchronise with a device. The Python layer validates first and raises
// ValueError/TypeError; these checks repeat the essentials so that a direct torch.ops.qdarts_C call
// with bad arguments fails with a clear message naming the argument instead of reading out of
// bounds. Checks on scale *values* belong to the device code (free on CPU, a sync on a GPU).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "quant_math.h"

namespace qdarts {

constexpr int64_t kMinBitsArg = 1;
constexpr int64_t kMaxBitsArg = 16;
constexpr int64_t kMaxBitWidths = 4;  // K of mixed_fake_quant; equal to kMaxBits in quant_math.h

// x viewed as [outer, channels, inner] with the per-channel axis in the middle; per tensor it is
// [1, 1, numel] (one "channel").
struct ChannelLayout {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

inline bool is_kernel_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16;
}

inline void check_kernel_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " is an undefined tensor");
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
}

// An int[] argument of two values (height, width), each >= min.
inline void check_int_pair(c10::IntArrayRef v, const char* name, int64_t min) {
  TORCH_CHECK(v.size() == 2, name, " must have 2 values (height, width), got ", v.size());
  TORCH_CHECK(v[0] >= min && v[1] >= min, name, " must be >= ", min, ", got ", v);
}

inline void check_float32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " is an undefined tensor");
  TORCH_CHECK(t.scalar_type() == c10::ScalarType::Float, name, " must be float32, got ", t.scalar_type());
}

inline void check_float32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.scalar_type() == c10::ScalarType::Float && t.device().is_cpu(), name,
              " must be a float32 CPU tensor");
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device(),
              "; they must share a device");
}

// Checks the arguments shared by mixed_fake_quant_forward/backward and returns x's channel layout.
inline ChannelLayout check_mixed_fake_quant_args(const at::Tensor& x, const at::Tensor& probs,
                                                 const at::Tensor& scales, c10::IntArrayRef bits, int64_t grid,
                                                 int64_t axis) {
  check_kernel_dtype(x, "x");
  check_float32(probs, "probs");
  check_float32(scales, "scales");
  check_same_device(probs, "probs", x, "x");
  check_same_device(scales, "scales", x, "x");
  const int64_t k = static_cast<int64_t>(bits.size());
  TORCH_CHECK(k >= 1 && k <= kMaxBitWidths, "bits must hold 1..", kMaxBitWidths, " bit-widths, got ", k);
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(bits[i] >= kMinBitsArg && bits[i] <= kMaxBitsArg, "bits must be in [", kMinBitsArg, ", ",
                kMaxBitsArg, "], got bits[", i, "] = ", bits[i]);
  }
  TORCH_CHECK(grid >= 0 && grid < kNumGrids, "grid must be 0 (signed), 1 (unsigned), 2 (midrise) or 3 (relu), got ",
              grid);
  TORCH_CHECK(probs.dim() == 1 && probs.size(0) == k, "probs must have shape [", k,
              "] (one probability per bit-width), got ", probs.sizes());
  if (axis == -1) {
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == k, "scales must have shape [", k,
                "] for per-tensor quantization (axis=-1), got ", scales.sizes());
    return {1, 1, x.numel()};
  }
  TORCH_CHECK(axis >= 0 && axis < x.dim(), "axis must be -1 (per tensor) or a dimension of x in [0, ", x.dim(),
              "), got ", axis);
  const int64_t channels = x.size(axis);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == k && scales.size(1) == channels, "scales must have shape [",
              k, ", ", channels, "] for per-channel quantization along axis ", axis, ", got ", scales.sizes());
  int64_t outer = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= x.size(d);
  int64_t inner = 1;
  for (int64_t d = axis + 1; d < x.dim(); ++d) inner *= x.size(d);
  return {outer, channels, inner};
}

// The incoming gradient must match the tensor it is the gradient of.
inline void check_grad_like(const at::Tensor& grad, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(grad.defined(), "grad is an undefined tensor");
  TORCH_CHECK(grad.sizes() == like.sizes(), "grad has shape ", grad.sizes(), " but ", like_name, " has ",
              like.sizes());
  TORCH_CHECK(grad.scalar_type() == like.scalar_type(), "grad has dtype ", grad.scalar_type(), " but ", like_name,
              " has ", like.scalar_type());
  check_same_device(grad, "grad", like, like_name);
}

// Checks mixed_op_sum's arguments; returns K, the number of outputs.
inline int64_t check_mixed_op_sum_args(at::TensorList outputs, const at::Tensor& weights) {
  const int64_t k = static_cast<int64_t>(outputs.size());
  TORCH_CHECK(k >= 1, "outputs must hold at least one tensor");
  check_kernel_dtype(outputs[0], "outputs[0]");
  for (int64_t i = 1; i < k; ++i) {
    const at::Tensor& o = outputs[i];
    TORCH_CHECK(o.defined(), "outputs[", i, "] is an undefined tensor");
    TORCH_CHECK(o.sizes() == outputs[0].sizes(), "outputs[", i, "] has shape ", o.sizes(), " but outputs[0] has ",
                outputs[0].sizes());
    TORCH_CHECK(o.scalar_type() == outputs[0].scalar_type(), "outputs[", i, "] has dtype ", o.scalar_type(),
                " but outputs[0] has ", outputs[0].scalar_type());
    TORCH_CHECK(o.device() == outputs[0].device(), "outputs[", i, "] is on ", o.device(), " but outputs[0] is on ",
                outputs[0].device());
  }
  check_float32(weights, "weights");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == k, "weights must have shape [", k,
              "] (one per output), got ", weights.sizes());
  check_same_device(weights, "weights", outputs[0], "outputs[0]");
  return k;
}

}  // namespace qdarts
