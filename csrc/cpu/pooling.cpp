// C++ CPU kernels of 2-D max and average pooling (schemas in csrc/ops.cpp), fp32 NCHW, floor mode:
//
//   max_pool2d_forward/backward: y[n,c,oh,ow] = max over the window's in-bounds taps (i, j), scanned
//     row by row, of x[n,c, oh SH - PH + i DH, ow SW - PW + j DW]; dx[n,c,a] = sum of g[n,c,oh,ow]
//     over the outputs whose max is x[n,c,a]. The backward recomputes where each window's max is
//     instead of reading saved int64 indices (qdarts_kernels.nn.InputKeepingMaxPool2d keeps only the
//     input). PyTorch's rules: the max is the first tap holding the largest value (a later equal
//     value does not replace it), a NaN replaces it (a later NaN too), a window of -inf takes its
//     first in-bounds tap; the gradients are added in output order.
//   avg_pool2d_forward/backward: y = (sum of the window's in-bounds taps, row by row from 0) / d and
//     dx[n,c,a] = sum, in output order, of g[n,c,oh,ow] / d over the windows holding a, where d is
//     the number of in-bounds taps, or with count_include_pad the window's size clipped to the
//     padded input, as PyTorch's.
//
// Values and gradients are PyTorch's bit for bit. Why: PyTorch's CPU kernels scan each window with
// bounds checks per output (and the max pool writes an int64 index per output): a 3x3 max pool over
// [64, 4, 32, 32] took 2-3 ms on the 2-core VM of bench/results, an average pool 1 ms, where these
// take a fraction of that; both are candidates of every DARTS edge.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/cpu_common.h"
#include "cpu/output_cache.h"

namespace qdarts {
namespace cpu {
namespace {

struct PoolGeometry {
  int64_t h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
};

struct PoolJob {
  PoolGeometry geometry;
  const float* x;
  const float* grad;
  float* y;
  float* dx;
  const int64_t* divisors;  // average pool: d of output (oh, ow) at oh * Wo + ow
};

// The average pool's divisor of each output, PyTorch's rule (count_include_pad: the window clipped
// to the padded input; otherwise the in-bounds taps).
std::vector<int64_t> avg_divisors(const PoolGeometry& g, bool count_include_pad) {
  std::vector<int64_t> out(g.ho * g.wo);
  for (int64_t oh = 0; oh < g.ho; ++oh) {
    for (int64_t ow = 0; ow < g.wo; ++ow) {
      const int64_t ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
      const int64_t ih1 = std::min(ih0 + g.kh, g.h + g.ph), iw1 = std::min(iw0 + g.kw, g.w + g.pw);
      const int64_t padded = (ih1 - ih0) * (iw1 - iw0);
      const int64_t inside =
          (std::min(ih1, g.h) - std::max<int64_t>(ih0, 0)) * (std::min(iw1, g.w) - std::max<int64_t>(iw0, 0));
      out[oh * g.wo + ow] = count_include_pad ? padded : inside;
    }
  }
  return out;
}

// The flat input index (within the plane) of the max of output (oh, ow), scanned as PyTorch does
// (the backward's windows where no tap beat -inf);
// -1 where the window has no tap in bounds (possible with dilation: its taps can straddle the
// input; PyTorch's forward gives -inf there, and no gradient flows).
inline int64_t argmax_input(const PoolGeometry& g, const float* x, int64_t oh, int64_t ow) {
  int64_t ih0 = oh * g.sh - g.ph, iw0 = ow * g.sw - g.pw;
  const int64_t ih1 = std::min(ih0 + (g.kh - 1) * g.dh + 1, g.h), iw1 = std::min(iw0 + (g.kw - 1) * g.dw + 1, g.w);
  if (ih0 < 0) ih0 += ceil_div(-ih0, g.dh) * g.dh;  // the first tap in bounds
  if (iw0 < 0) iw0 += ceil_div(-iw0, g.dw) * g.dw;
  if (ih0 >= ih1 || iw0 >= iw1) return -1;
  int64_t best_at = ih0 * g.w + iw0;
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t ih = ih0; ih < ih1; ih += g.dh) {
    for (int64_t iw = iw0; iw < iw1; iw += g.dw) {
      const float v = x[ih * g.w + iw];
      if (v > best || std::isnan(v)) {
        best = v;
        best_at = ih * g.w + iw;
      }
    }
  }
  return best_at;
}

#define QD_ISA_KERNELS "cpu/pooling_kernels.inc"
#include "cpu/foreach_isa.h"

// The geometry of a pool over an input of size [N, C, H, W] (`what` names it in errors).
PoolGeometry pool_geometry(c10::IntArrayRef size, const char* what, c10::IntArrayRef kernel_size,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  TORCH_CHECK(size.size() == 4, what, " must be 4-D [N, C, H, W], got ", size.size(), "-D");
  TORCH_CHECK(size[1] > 0 && size[2] > 0 && size[3] > 0, what, " must have non-zero channels, height and width (",
              "only the batch may be empty), got ", size);
  check_int_pair(kernel_size, "kernel_size", 1);
  check_int_pair(stride, "stride", 1);
  check_int_pair(padding, "padding", 0);
  check_int_pair(dilation, "dilation", 1);
  // as PyTorch (without dilation every window then has a tap in bounds; with it, see argmax_input)
  TORCH_CHECK(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2,
              "padding must be at most half the kernel size, got padding ", padding, " for kernel_size ", kernel_size);
  PoolGeometry g{size[2], size[3], kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1],
                 dilation[0], dilation[1], 0, 0};
  const int64_t span_h = g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1, span_w = g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1;
  TORCH_CHECK(span_h >= 0 && span_w >= 0, "the (dilated) kernel ", kernel_size, " is larger than the padded input ",
              size.slice(2));
  g.ho = span_h / g.sh + 1;
  g.wo = span_w / g.sw + 1;
  return g;
}

at::Tensor max_pool2d_forward_cpu(const at::Tensor& x_in, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                  c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  check_float32_cpu(x_in, "x");
  const PoolGeometry g = pool_geometry(x_in.sizes(), "x", kernel_size, stride, padding, dilation);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = empty_output({x.size(0), x.size(1), g.ho, g.wo}, c10::ScalarType::Float);
  const PoolJob job{g, x.data_ptr<float>(), nullptr, y.data_ptr<float>(), nullptr, nullptr};
  at::parallel_for(0, x.size(0) * x.size(1), plane_grain(g.ho * g.wo * g.kh * g.kw), [&](int64_t begin, int64_t end) {
    QD_ISA_DISPATCH(max_forward_planes, job, begin, end);
  });
  return y;
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, c10::IntArrayRef kernel_size,
                                   c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  check_float32_cpu(x_in, "x");
  check_float32_cpu(grad_in, "grad");
  const PoolGeometry g = pool_geometry(x_in.sizes(), "x", kernel_size, stride, padding, dilation);
  TORCH_CHECK(grad_in.sizes() == c10::IntArrayRef({x_in.size(0), x_in.size(1), g.ho, g.wo}),
              "grad must have the output's shape [", x_in.size(0), ", ", x_in.size(1), ", ", g.ho, ", ", g.wo,
              "], got ", grad_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor dx = empty_output(x.sizes(), c10::ScalarType::Float);
  const PoolJob job{g, x.data_ptr<float>(), grad.data_ptr<float>(), nullptr, dx.data_ptr<float>(), nullptr};
  at::parallel_for(0, x.size(0) * x.size(1), plane_grain(g.ho * g.wo * g.kh * g.kw), [&](int64_t begin, int64_t end) {
    QD_ISA_DISPATCH(max_backward_planes, job, begin, end);
  });
  return dx;
}

at::Tensor avg_pool2d_forward_cpu(const at::Tensor& x_in, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                  c10::IntArrayRef padding, bool count_include_pad) {
  check_float32_cpu(x_in, "x");
  const PoolGeometry g = pool_geometry(x_in.sizes(), "x", kernel_size, stride, padding, {1, 1});
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = empty_output({x.size(0), x.size(1), g.ho, g.wo}, c10::ScalarType::Float);
  const std::vector<int64_t> divisors = avg_divisors(g, count_include_pad);
  const PoolJob job{g, x.data_ptr<float>(), nullptr, y.data_ptr<float>(), nullptr, divisors.data()};
  at::parallel_for(0, x.size(0) * x.size(1), plane_grain(g.ho * g.wo * g.kh * g.kw), [&](int64_t begin, int64_t end) {
    QD_ISA_DISPATCH(avg_forward_planes, job, begin, end);
  });
  return y;
}

at::Tensor avg_pool2d_backward_cpu(const at::Tensor& grad_in, c10::IntArrayRef input_size, c10::IntArrayRef kernel_size,
                                   c10::IntArrayRef stride, c10::IntArrayRef padding, bool count_include_pad) {
  check_float32_cpu(grad_in, "grad");
  const PoolGeometry g = pool_geometry(input_size, "input_size", kernel_size, stride, padding, {1, 1});
  TORCH_CHECK(grad_in.sizes() == c10::IntArrayRef({input_size[0], input_size[1], g.ho, g.wo}),
              "grad must have the output's shape [", input_size[0], ", ", input_size[1], ", ", g.ho, ", ", g.wo,
              "], got ", grad_in.sizes());
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor dx = empty_output(input_size, c10::ScalarType::Float);
  const std::vector<int64_t> divisors = avg_divisors(g, count_include_pad);
  const PoolJob job{g, nullptr, grad.data_ptr<float>(), nullptr, dx.data_ptr<float>(), divisors.data()};
  const int64_t grain = plane_grain(g.ho * g.wo * g.kh * g.kw);
  at::parallel_for(0, input_size[0] * input_size[1], grain, [&](int64_t begin, int64_t end) {
    QD_ISA_DISPATCH(avg_backward_planes, job, begin, end);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(qdarts_C, CPU, m) {
  m.impl("max_pool2d_forward", &max_pool2d_forward_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
  m.impl("avg_pool2d_forward", &avg_pool2d_forward_cpu);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward_cpu);
}

}  // namespace cpu
}  // namespace qdarts
