// C++ CPU kernels of depthwise_conv2d_forward / depthwise_conv2d_backward (schemas in csrc/ops.cpp):
// a 2-D convolution with one filter per channel (groups = in channels = out channels), fp32, NCHW,
// no bias, any kernel size, stride, padding and dilation.
//
//   y[n,c,oh,ow]  = sum_{i,j} w[c,0,i,j] x[n,c, oh SH - PH + i DH, ow SW - PW + j DW]
//   dx[n,c,ih,iw] = sum of w[c,0,i,j] g[n,c,oh,ow] over the (oh, ow, i, j) whose tap reads x[n,c,ih,iw]
//   dw[c,0,i,j]   = sum_{n,oh,ow} g[n,c,oh,ow] x[n,c, oh SH - PH + i DH, ow SW - PW + j DW]
//
// (x outside its bounds is the zero padding.) Why: PyTorch runs these through oneDNN, whose
// primitive set-up and layout reorders dominate on the few channels of a DARTS supernet's
// separable and dilated convs (partial channels: 4 channels of 32x32 at CIFAR size, batch 64).
// Measured on the 2-core VM of bench/results (torch 2.13): a 3x3 depthwise conv over
// [64, 4, 32, 32] took 0.26-4.1 ms forward and 1.2-11.6 ms forward+backward, where the data are
// 1 MiB; such convs and their backward were half of a CPU search step's time.
//
// Each (image, channel) plane is one unit of work; planes are independent. The forward builds a row
// of y tap by tap in the order (i, j); the backward takes g row by row, adding w[c,i,j] g into the
// rows of dx (in the order oh, i, j) and g x into kLanes fixed lanes per tap, summed into fp64 per
// row. Each plane's fp64 tap sums go to its own slot, and the slots of a channel are added in image
// order on one thread: the same bits for any number of threads and any instruction set. Small planes
// (by_image_blocks) go by blocks of kImageBlock images of one channel instead, the images the
// innermost (vector) dimension (the kernels' file says how the sums keep the per-plane bits); dw then
// has one slot per block.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/cpu_common.h"
#include "cpu/output_cache.h"

namespace qdarts {
namespace cpu {
namespace {

struct DepthwiseGeometry {
  int64_t images, channels, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
};

// The output columns [lo, hi) whose tap j reads inside the input row, and the input column the
// first of them reads (lo * SW - PW + j * DW).
struct ColumnRange {
  int64_t lo, hi, first_input;
};

struct DepthwiseJob {
  DepthwiseGeometry geometry;
  const ColumnRange* columns;  // [KW]
  const float* x;
  const float* weight;
  const float* grad;
  float* y;
  float* dx;
  double* plane_partials;  // [images * channels, KH * KW]
};

std::vector<ColumnRange> column_ranges(const DepthwiseGeometry& g) {
  std::vector<ColumnRange> out;
  for (int64_t j = 0; j < g.kw; ++j) {
    const int64_t offset = j * g.dw - g.pw;  // input column of output column 0
    // 0 <= ow * SW + offset < W
    int64_t lo = offset >= 0 ? 0 : ceil_div(-offset, g.sw);
    int64_t hi = offset > g.w - 1 ? 0 : (g.w - 1 - offset) / g.sw + 1;
    lo = std::min(lo, g.wo);
    hi = std::max(lo, std::min(hi, g.wo));
    out.push_back({lo, hi, lo * g.sw + offset});
  }
  return out;
}

// Small planes go by blocks of this many images of one channel (the kernels' by-image-blocks part).
constexpr int64_t kImageBlock = 64;
// The largest plane (positions) that goes by image blocks at stride 1 and at other strides, and the
// largest padded one (its buffers).
constexpr int64_t kImageBlockPlane = 64, kImageBlockStridedPlane = 256, kImageBlockPaddedPlane = 1024;

// Whether the convolution goes by image blocks rather than by planes: planes so small that the
// per-plane kernels spend their time on row ends, padding and set-up (the digits supernet's 8x8 to 2x2
// maps), or strided ones up to 16x16 (the per-plane kernels' column phases are short rows), and enough
// images to fill a block's vectors. Measured on the 2-core VM of bench/results (fp32, one thread; forward
// / forward+backward, per plane -> by blocks): [128,16,4,4] 5x5 dilation 2 stride 2: 378 -> 48 us /
// 823 -> 209 us; [128,8,8,8] 5x5 stride 2: 434 -> 84 / 1459 -> 237; [128,8,8,8] 3x3 stride 1: 125 -> 130
// / 340 -> 224; [64,16,16,16] 5x5 stride 2: 668 -> 273 / 1612 -> 867. Not taken: stride 1 on 16x16
// (3x3: 53 -> 110 / 138 -> 212: the transposes cost more than the row ends they save) and 32x32
// planes (strided 3x3: 239 -> 295 forward).
bool by_image_blocks(const DepthwiseGeometry& g) {
  const int64_t largest = g.sh == 1 && g.sw == 1 ? kImageBlockPlane : kImageBlockStridedPlane;
  return g.images >= kImageBlock / 4 && g.h * g.w <= largest &&
         (g.h + 2 * g.ph) * (g.w + 2 * g.pw) <= kImageBlockPaddedPlane;
}

#define QD_ISA_KERNELS "cpu/depthwise_conv_kernels.inc"
#include "cpu/foreach_isa.h"

DepthwiseGeometry check_args(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  TORCH_CHECK(x.defined() && x.scalar_type() == c10::ScalarType::Float, "x must be a float32 tensor");
  TORCH_CHECK(weight.defined() && weight.scalar_type() == c10::ScalarType::Float,
              "weight must be a float32 tensor");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "x and weight must be CPU tensors");
  TORCH_CHECK(x.dim() == 4, "x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, "x must have non-zero channels, height and width ",
              "(only the batch may be empty, as in PyTorch), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1,
              "weight must be [C, 1, KH, KW] with C = x.size(1) = ", x.size(1), " (one filter per channel), got ",
              weight.sizes());
  TORCH_CHECK(weight.size(2) > 0 && weight.size(3) > 0, "weight's kernel size must be positive, got ",
              weight.sizes());
  check_int_pair(stride, "stride", 1);
  check_int_pair(padding, "padding", 0);
  check_int_pair(dilation, "dilation", 1);
  DepthwiseGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(2), weight.size(3),
                      stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], 0, 0};
  g.ho = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.wo = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1 >= 0 && g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1 >= 0,
              "the (dilated) kernel ", weight.sizes().slice(2), " is larger than the padded input ",
              x.sizes().slice(2));
  return g;
}

at::Tensor depthwise_conv2d_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, c10::IntArrayRef stride,
                                        c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const DepthwiseGeometry g = check_args(x_in, weight_in, stride, padding, dilation);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor y = empty_output({g.images, g.channels, g.ho, g.wo}, c10::ScalarType::Float);
  const std::vector<ColumnRange> columns = column_ranges(g);
  const DepthwiseJob job{g, columns.data(), x.data_ptr<float>(), weight.data_ptr<float>(), nullptr,
                         y.data_ptr<float>(), nullptr, nullptr};
  if (by_image_blocks(g)) {
    at::parallel_for(0, ceil_div(g.images, kImageBlock) * g.channels, 1, [&](int64_t begin, int64_t end) {
      QD_ISA_DISPATCH(forward_image_blocks, job, begin, end);
    });
    return y;
  }
  at::parallel_for(0, g.images * g.channels, plane_grain(g.ho * g.wo * g.kh * g.kw), [&](int64_t begin, int64_t end) {
    QD_ISA_DISPATCH(forward_planes, job, begin, end);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> depthwise_conv2d_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                 const at::Tensor& weight_in, c10::IntArrayRef stride,
                                                                 c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                                                 bool need_dx, bool need_dweight) {
  const DepthwiseGeometry g = check_args(x_in, weight_in, stride, padding, dilation);
  TORCH_CHECK(grad_in.defined() && grad_in.scalar_type() == c10::ScalarType::Float && grad_in.device().is_cpu(),
              "grad must be a float32 CPU tensor");
  TORCH_CHECK(grad_in.sizes() == c10::IntArrayRef({g.images, g.channels, g.ho, g.wo}), "grad must have the output's "
              "shape [", g.images, ", ", g.channels, ", ", g.ho, ", ", g.wo, "], got ", grad_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const int64_t taps = g.kh * g.kw;
  const bool blocks = by_image_blocks(g);
  // dw's partial sums: one row of taps per plane, or per image block of a channel (rows of images or
  // blocks, then channels)
  const int64_t rows = blocks ? ceil_div(g.images, kImageBlock) : g.images;
  at::Tensor dx = need_dx ? empty_output(x.sizes(), c10::ScalarType::Float) : at::empty({0}, x.options());
  at::Tensor dweight = need_dweight ? at::empty(weight.sizes(), weight.options()) : at::empty({0}, weight.options());
  std::vector<double> partials(need_dweight ? rows * g.channels * taps : 0);
  const std::vector<ColumnRange> columns = column_ranges(g);
  const DepthwiseJob job{g, columns.data(), x.data_ptr<float>(), weight.data_ptr<float>(), grad.data_ptr<float>(),
                         nullptr, need_dx ? dx.data_ptr<float>() : nullptr, blocks ? nullptr : partials.data()};
  if ((need_dx || need_dweight) && blocks) {
    at::parallel_for(0, rows * g.channels, 1, [&](int64_t begin, int64_t end) {
      QD_ISA_DISPATCH(backward_image_blocks, job, partials.data(), need_dx, need_dweight, begin, end);
    });
  } else if (need_dx || need_dweight) {
    at::parallel_for(0, rows * g.channels, plane_grain(g.ho * g.wo * g.kh * g.kw), [&](int64_t begin, int64_t end) {
      QD_ISA_DISPATCH(backward_planes, job, need_dx, need_dweight, begin, end);
    });
  }
  if (need_dweight) {
    // each channel's partial sums added in order on one thread: the same bits for any thread count
    float* dw = dweight.data_ptr<float>();
    for (int64_t c = 0; c < g.channels; ++c) {
      for (int64_t t = 0; t < taps; ++t) {
        double total = 0.0;
        for (int64_t r = 0; r < rows; ++r) total += partials[(r * g.channels + c) * taps + t];
        dw[c * taps + t] = static_cast<float>(total);
      }
    }
  }
  return {dx, dweight};
}

}  // namespace

TORCH_LIBRARY_IMPL(qdarts_C, CPU, m) {
  m.impl("depthwise_conv2d_forward", &depthwise_conv2d_forward_cpu);
  m.impl("depthwise_conv2d_backward", &depthwise_conv2d_backward_cpu);
}

}  // namespace cpu
}  // namespace qdarts
