// C++ CPU kernels of training batch normalisation without affine parameters (schemas in
// csrc/ops.cpp), fp32, x viewed as [N, C, S] (S the product of the sizes after C), per channel c over
// its M = N S elements:
//
//   batch_norm_train_forward(x, running_mean?, running_var?, momentum, eps) -> (y, invstd)
//     mean = sum x / M,  var = sum (x - mean)^2 / M,  invstd = 1 / sqrt(var + eps)   (fp64)
//     y = (x - mean) * invstd                                                        (fp32)
//     running_mean <- (1 - momentum) running_mean + momentum mean                   (in place)
//     running_var  <- (1 - momentum) running_var  + momentum var M / (M - 1)
//   batch_norm_train_backward(grad, y, invstd) -> dx = invstd (g - sum g / M - y sum (g y) / M)
//
// The maths of qdarts_kernels.triton.batch_norm, which OutputKeepingBatchNorm2d takes on a GPU; it
// takes these on CPU. Why: PyTorch's CPU batch norm forward spent 4-5x its backward's time on the
// supernet's few-channel planes (a [64, 4, 32, 32] batch on the 2-core VM of bench/results: about
// 250 us against 50 us), and every candidate op of a DARTS edge ends in one: some 1900 calls per
// CIFAR-size search step, a seventh of the step's time.
//
// Sums per channel (the forward's sum of x, then the sums of d = x - m and d^2 about the rounded
// mean m: the corrected two-pass formula, so a mean far from zero does not cancel the variance away;
// the backward's sums of g and g y) run over the channel's planes image by image, each plane's whole
// lane groups in fp32 lanes (lane: the position in the plane mod kLanes, cpu_common.h) moved into
// fp64 before any lane holds more than 16 terms, the rest of each plane added one by one in fp64.
// The lanes thus span planes: a 4x4 plane costs one vector add per pass, not a reduction of its own
// (per-plane reductions had made 2x2 to 4x4 planes slower than PyTorch's). The order depends on the
// shape alone: the same bits for any thread count (threads take whole channels) and instruction set.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/cpu_common.h"
#include "cpu/output_cache.h"

namespace qdarts {
namespace cpu {
namespace {

struct BatchNormJob {
  int64_t images, channels, plane;  // N, C and S
  const float* x;                   // forward: the input; backward: the output y
  const float* grad;
  float* out;                       // forward: y; backward: dx
  double* sums;                     // per channel, two: forward mean and variance, backward sum g and sum g y
  const float* shift;               // per channel: forward the mean, backward sum g / M
  const float* slope;               // per channel: backward sum (g y) / M
  const float* invstd;
};

// at::parallel_for's grain over channels of `per_channel` elements: about 64k elements per chunk.
inline int64_t channel_grain(int64_t per_channel) {
  return std::max<int64_t>(1, ceil_div(int64_t{1} << 16, per_channel));
}

#define QD_ISA_KERNELS "cpu/batch_norm_kernels.inc"
#include "cpu/foreach_isa.h"

// N, C and S of a tensor of at least 2 dimensions, viewed as [N, C, S].
std::tuple<int64_t, int64_t, int64_t> ncs(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2, name, " must have at least 2 dimensions [N, C, ...], got ", t.dim(), "-D");
  TORCH_CHECK(t.numel() > 0, name, " must not be empty, got shape ", t.sizes());
  return {t.size(0), t.size(1), t.numel() / (t.size(0) * t.size(1))};
}

void check_channel_vector(const at::Tensor& t, const char* name, int64_t channels) {
  check_float32_cpu(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, name, " must have shape [", channels, "], got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> batch_norm_train_forward_cpu(const at::Tensor& x_in,
                                                                const std::optional<at::Tensor>& running_mean,
                                                                const std::optional<at::Tensor>& running_var,
                                                                double momentum, double eps) {
  check_float32_cpu(x_in, "x");
  const auto [n, c, s] = ncs(x_in, "x");
  const bool update = running_mean.has_value() && running_mean->defined();
  TORCH_CHECK(update == (running_var.has_value() && running_var->defined()),
              "running_mean and running_var must be given together (or neither)");
  if (update) {
    for (const auto& [t, name] : {std::pair{&*running_mean, "running_mean"}, std::pair{&*running_var, "running_var"}}) {
      check_channel_vector(*t, name, c);
      TORCH_CHECK(t->is_contiguous(), name, " must be contiguous (it is updated in place)");
    }
    TORCH_CHECK(n * s > 1, "the running variance needs more than 1 value per channel, got input size ", x_in.sizes());
  }
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = empty_output(x.sizes(), c10::ScalarType::Float);
  at::Tensor invstd = at::empty({c}, x.options());
  std::vector<double> statistics(2 * c);
  std::vector<float> mean_f(c);
  BatchNormJob job{n, c, s, x.data_ptr<float>(), nullptr, y.data_ptr<float>(), statistics.data(), mean_f.data(),
                   nullptr, invstd.data_ptr<float>()};
  at::parallel_for(0, c, channel_grain(n * s), [&](int64_t begin, int64_t end) {
    QD_ISA_DISPATCH(channel_statistics, job, begin, end);
  });
  float* inv = invstd.data_ptr<float>();
  const double count = static_cast<double>(n) * static_cast<double>(s);
  for (int64_t ch = 0; ch < c; ++ch) {
    const double mean = statistics[2 * ch], var = statistics[2 * ch + 1];
    mean_f[ch] = static_cast<float>(mean);
    inv[ch] = static_cast<float>(1.0 / std::sqrt(var + eps));
    if (update) {
      float* rm = running_mean->data_ptr<float>() + ch;
      float* rv = running_var->data_ptr<float>() + ch;
      *rm = static_cast<float>((1.0 - momentum) * *rm + momentum * mean);
      *rv = static_cast<float>((1.0 - momentum) * *rv + momentum * var * count / (count - 1.0));
    }
  }
  at::parallel_for(0, n * c, plane_grain(s), [&](int64_t begin, int64_t end) {
    QD_ISA_DISPATCH(normalize_planes, job, begin, end);
  });
  return {y, invstd};
}

at::Tensor batch_norm_train_backward_cpu(const at::Tensor& grad_in, const at::Tensor& out_in,
                                         const at::Tensor& invstd_in) {
  check_float32_cpu(out_in, "out");
  check_float32_cpu(grad_in, "grad");
  const auto [n, c, s] = ncs(out_in, "out");
  TORCH_CHECK(grad_in.sizes() == out_in.sizes(), "grad has shape ", grad_in.sizes(), " but out has ", out_in.sizes());
  check_channel_vector(invstd_in, "invstd", c);
  const at::Tensor out = out_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor invstd = invstd_in.contiguous();
  at::Tensor dx = empty_output(out.sizes(), c10::ScalarType::Float);
  std::vector<double> sums(2 * c);
  std::vector<float> shift(c), slope(c);
  BatchNormJob job{n, c, s, out.data_ptr<float>(), grad.data_ptr<float>(), dx.data_ptr<float>(), sums.data(),
                   shift.data(), slope.data(), invstd.data_ptr<float>()};
  at::parallel_for(0, c, channel_grain(n * s), [&](int64_t begin, int64_t end) {
    QD_ISA_DISPATCH(channel_grad_sums, job, begin, end);
  });
  const double count = static_cast<double>(n) * static_cast<double>(s);
  for (int64_t ch = 0; ch < c; ++ch) {
    shift[ch] = static_cast<float>(sums[2 * ch] / count);
    slope[ch] = static_cast<float>(sums[2 * ch + 1] / count);
  }
  at::parallel_for(0, n * c, plane_grain(2 * s), [&](int64_t begin, int64_t end) {
    QD_ISA_DISPATCH(grad_input_planes, job, begin, end);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(qdarts_C, CPU, m) {
  m.impl("batch_norm_train_forward", &batch_norm_train_forward_cpu);
  m.impl("batch_norm_train_backward", &batch_norm_train_backward_cpu);
}

}  // namespace cpu
}  // namespace qdarts
