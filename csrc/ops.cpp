// Every op's schema, declared once. One implementation per device is registered elsewhere:
// csrc/cpu/*.cpp for CPU, csrc/cuda/register.cpp for CUDA (only when built with QDARTS_WITH_CUDA).
// The Python layer (qdarts_kernels/ops.py) wraps these in autograd-aware custom ops; these ops are
// the raw kernels and take already-validated, contiguous arguments (they re-check cheaply anyway).
//
// Conventions shared by every implementation:
//   grid  0 = signed, 1 = unsigned, 2 = midrise, 3 = relu (see csrc/quant_math.h)
//   axis  -1 for per-tensor scales ([K]); else the channel dim of x for per-channel scales ([K, C])
//   probs, scales, weights: float32; x, grad, outputs: float32 / float16 / bfloat16
//   a gradient that was not requested is returned as a 0-element tensor.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
// What this build was made from, as JSON: written by setup.py into a generated file (see
// qdarts_kernels/_build_record.py), so that a stale build can be told from a current one.
extern const char qdarts_build_record[];

// Importing qdarts_kernels._C from Python runs the static TORCH_LIBRARY registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace qdarts {

std::string build_record() { return qdarts_build_record; }

bool has_cuda_kernels() {
#ifdef QDARTS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(qdarts_C, m) {
  m.def(
      "mixed_fake_quant_forward(Tensor x, Tensor probs, Tensor scales, int[] bits, int grid, int axis)"
      " -> Tensor");
  m.def(
      "mixed_fake_quant_backward(Tensor grad, Tensor x, Tensor probs, Tensor scales, int[] bits, int grid,"
      " int axis, bool need_dx, bool need_dprobs, bool need_dscales) -> (Tensor, Tensor, Tensor)");
  m.def("mixed_op_sum_forward(Tensor[] outputs, Tensor weights) -> Tensor");
  m.def(
      "mixed_op_sum_backward(Tensor grad, Tensor[] outputs, Tensor weights, bool need_doutputs,"
      " bool need_dweights) -> (Tensor[], Tensor)");
  // mixed_op_sum_forward with its autograd in C++ (csrc/autograd.cpp): weights of any float dtype,
  // d weights in that dtype; first derivatives only. The eager path of the public op on the cpu backend.
  m.def("mixed_op_sum(Tensor[] outputs, Tensor weights) -> Tensor");
  // N tensors with one bit set and grid (probs [N, K], scales[i] [K] or [K, C_i], axes[i] the
  // normalised axis of xs[i] or all -1); dscales comes back as one flat tensor, the concatenation
  // of every scales[i]'s gradient. Implemented for CUDA only (the CPU backend loops in Python).
  m.def(
      "mixed_fake_quant_grouped_forward(Tensor[] xs, Tensor probs, Tensor[] scales, int[] bits, int grid,"
      " int[] axes) -> Tensor[]");
  m.def(
      "mixed_fake_quant_grouped_backward(Tensor[] grads, Tensor[] xs, Tensor probs, Tensor[] scales, int[] bits,"
      " int grid, int[] axes, bool need_dx, bool need_dprobs, bool need_dscales) -> (Tensor[], Tensor, Tensor)");
  // A depthwise 2-D convolution (weight [C, 1, KH, KW], groups = C), fp32, no bias; for the few
  // channels of a DARTS supernet's separable and dilated convs. Implemented for CPU only (on a GPU,
  // PyTorch's kernels and the Triton weight gradient of qdarts_kernels.triton.depthwise_conv).
  m.def("depthwise_conv2d_forward(Tensor x, Tensor weight, int[] stride, int[] padding, int[] dilation) -> Tensor");
  m.def(
      "depthwise_conv2d_backward(Tensor grad, Tensor x, Tensor weight, int[] stride, int[] padding, int[] dilation,"
      " bool need_dx, bool need_dweight) -> (Tensor, Tensor)");
  // 2-D max and average pooling, fp32, floor mode; the max pool's backward recomputes each
  // window's max (no indices), the average pool's needs only the input's size. CPU only.
  m.def("max_pool2d_forward(Tensor x, int[] kernel_size, int[] stride, int[] padding, int[] dilation) -> Tensor");
  m.def(
      "max_pool2d_backward(Tensor grad, Tensor x, int[] kernel_size, int[] stride, int[] padding, int[] dilation)"
      " -> Tensor");
  m.def(
      "avg_pool2d_forward(Tensor x, int[] kernel_size, int[] stride, int[] padding, bool count_include_pad)"
      " -> Tensor");
  m.def(
      "avg_pool2d_backward(Tensor grad, int[] input_size, int[] kernel_size, int[] stride, int[] padding,"
      " bool count_include_pad) -> Tensor");
  // Training batch normalisation without affine parameters, fp32, x as [N, C, S]: the output and
  // invstd [C]; the running statistics (fp32 [C], both or neither) are updated in place. The
  // backward needs only the output and invstd. CPU only (on a GPU, qdarts_kernels.triton.batch_norm).
  m.def(
      "batch_norm_train_forward(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum,"
      " float eps) -> (Tensor, Tensor)");
  m.def("batch_norm_train_backward(Tensor grad, Tensor out, Tensor invstd) -> Tensor");
  m.def("has_cuda_kernels() -> bool", &has_cuda_kernels);
  m.def("build_record() -> str", &build_record);
}

}  // namespace qdarts
