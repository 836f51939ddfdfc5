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
// Small planes go by blocks of planes (by_plane_blocks), the planes the vector dimension.
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

// The in-bounds taps of every output's window, in PyTorch's order (row by row): the flat input
// positions (within the plane) of output o = oh Wo + ow at position[begin[o]] .. position[begin[o + 1] - 1]
// (none where a dilated window straddles the input). For the plane-block kernels.
struct WindowTaps {
  std::vector<int64_t> begin;
  std::vector<int32_t> position;
};

WindowTaps window_taps(const PoolGeometry& g) {
  WindowTaps taps;
  taps.begin.reserve(g.ho * g.wo + 1);
  taps.begin.push_back(0);
  for (int64_t oh = 0; oh < g.ho; ++oh) {
    for (int64_t ow = 0; ow < g.wo; ++ow) {
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.sh - g.ph + i * g.dh;
        if (ih < 0 || ih >= g.h) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t iw = ow * g.sw - g.pw + j * g.dw;
          if (iw >= 0 && iw < g.w) taps.position.push_back(static_cast<int32_t>(ih * g.w + iw));
        }
      }
      taps.begin.push_back(static_cast<int64_t>(taps.position.size()));
    }
  }
  return taps;
}

// Small planes go by blocks of this many planes, the planes the vector dimension (the kernels'
// plane-block part), where there are at least kPlaneBlock / 4 planes and the input plane has at most
// kPlaneBlockLargestPlane positions at stride 1, kPlaneBlockLargestStridedPlane at other strides: on
// such planes the per-plane kernels' padding, row ends and (at other strides) positions computed and
// dropped or split by phase cost more than the transposes. Measured on the 2-core VM of bench/results
// (fp32, one thread, 3x3 pad 1; forward / backward in us, per plane -> by blocks), max pool:
// [128,16,2,2] stride 1 58 / 95 -> 14 / 19, [128,8,8,8] stride 1 130 / 281 -> 77 / 156, stride 2
// 133 / 183 -> 37 / 78, [64,16,12,12] stride 1 231 / 557 -> 229 / 572 (the largest stride-1 plane
// taken: 16x16 was slower by blocks), stride 2 1584 / 1611 -> 134 / 220, [64,16,32,32] stride 2
// 1904 / 2839 -> 1016 / 2245; average pool: [128,16,2,2] stride 1 100 / 85 -> 11 / 12, [128,8,8,8]
// stride 1 135 / 136 -> 59 / 71, [64,16,32,32] stride 2 1964 / 2087 -> 927 / 997.
constexpr int64_t kPlaneBlock = 64;
constexpr int64_t kPlaneBlockLargestPlane = 144, kPlaneBlockLargestStridedPlane = 1024;

bool by_plane_blocks(const PoolGeometry& g, int64_t planes) {
  const int64_t largest = g.sh == 1 && g.sw == 1 ? kPlaneBlockLargestPlane : kPlaneBlockLargestStridedPlane;
  return planes >= kPlaneBlock / 4 && g.h * g.w <= largest;
}

struct PoolJob {
  PoolGeometry geometry;
  const float* x;
  const float* grad;
  float* y;
  float* dx;
  const int64_t* divisors;  // average pool: d of output (oh, ow) at oh * Wo + ow
  int64_t planes;           // N C
  const WindowTaps* windows;  // plane blocks only
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

// Runs a pool's kernels over its planes: by plane blocks (blocks(job, b_begin, b_end)) or plane by plane
// (planes(job, p_begin, p_end)), each given the job; the windows' taps are worked out for the blocks.
template <class Blocks, class Planes>
void run_pool(PoolJob job, const Blocks& blocks, const Planes& planes) {
  const PoolGeometry& g = job.geometry;
  const int64_t grain = plane_grain(g.ho * g.wo * g.kh * g.kw);
  if (by_plane_blocks(g, job.planes)) {
    const WindowTaps windows = window_taps(g);
    job.windows = &windows;
    at::parallel_for(0, ceil_div(job.planes, kPlaneBlock), ceil_div(grain, kPlaneBlock),
                     [&](int64_t begin, int64_t end) { blocks(job, begin, end); });
  } else {
    at::parallel_for(0, job.planes, grain, [&](int64_t begin, int64_t end) { planes(job, begin, end); });
  }
}

at::Tensor max_pool2d_forward_cpu(const at::Tensor& x_in, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                  c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  check_float32_cpu(x_in, "x");
  const PoolGeometry g = pool_geometry(x_in.sizes(), "x", kernel_size, stride, padding, dilation);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = empty_output({x.size(0), x.size(1), g.ho, g.wo}, c10::ScalarType::Float);
  run_pool(PoolJob{g, x.data_ptr<float>(), nullptr, y.data_ptr<float>(), nullptr, nullptr, x.size(0) * x.size(1),
                   nullptr},
           [](const PoolJob& job, int64_t b, int64_t e) { QD_ISA_DISPATCH(max_forward_plane_blocks, job, b, e); },
           [](const PoolJob& job, int64_t b, int64_t e) { QD_ISA_DISPATCH(max_forward_planes, job, b, e); });
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
  run_pool(PoolJob{g, x.data_ptr<float>(), grad.data_ptr<float>(), nullptr, dx.data_ptr<float>(), nullptr,
                   x.size(0) * x.size(1), nullptr},
           [](const PoolJob& job, int64_t b, int64_t e) { QD_ISA_DISPATCH(max_backward_plane_blocks, job, b, e); },
           [](const PoolJob& job, int64_t b, int64_t e) { QD_ISA_DISPATCH(max_backward_planes, job, b, e); });
  return dx;
}

at::Tensor avg_pool2d_forward_cpu(const at::Tensor& x_in, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                  c10::IntArrayRef padding, bool count_include_pad) {
  check_float32_cpu(x_in, "x");
  const PoolGeometry g = pool_geometry(x_in.sizes(), "x", kernel_size, stride, padding, {1, 1});
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = empty_output({x.size(0), x.size(1), g.ho, g.wo}, c10::ScalarType::Float);
  const std::vector<int64_t> divisors = avg_divisors(g, count_include_pad);
  run_pool(PoolJob{g, x.data_ptr<float>(), nullptr, y.data_ptr<float>(), nullptr, divisors.data(),
                   x.size(0) * x.size(1), nullptr},
           [](const PoolJob& job, int64_t b, int64_t e) { QD_ISA_DISPATCH(avg_forward_plane_blocks, job, b, e); },
           [](const PoolJob& job, int64_t b, int64_t e) { QD_ISA_DISPATCH(avg_forward_planes, job, b, e); });
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
  run_pool(PoolJob{g, nullptr, grad.data_ptr<float>(), nullptr, dx.data_ptr<float>(), divisors.data(),
                   input_size[0] * input_size[1], nullptr},
           [](const PoolJob& job, int64_t b, int64_t e) { QD_ISA_DISPATCH(avg_backward_plane_blocks, job, b, e); },
           [](const PoolJob& job, int64_t b, int64_t e) { QD_ISA_DISPATCH(avg_backward_planes, job, b, e); });
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
