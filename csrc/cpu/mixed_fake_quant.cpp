// C++ CPU kernels of mixed_fake_quant_forward / mixed_fake_quant_backward (schemas in csrc/ops.cpp).
//
//   y  = sum_k p_k * Q_k,   Q_k = (q_k - z_k) * s_k          (csrc/quant_math.h, DESIGN section 4)
//   dx = g * sum_k p_k * in_k
//   dp_k = sum g * Q_k = sum_c s_kc * A_kc,                  A_kc = sum_{x in channel c} g * (q_k - z_k)
//   ds_kc = sum g * p_k * ((q_k - z_k) - in_k * x / s_kc) = p_k * D_kc,
//                                                            D_kc = sum_{x in c} g * ((q_k - z_k) - [in_k] t_k)
// with t_k = x * (1/s_kc), and [in_k] t_k a select (so x = +-inf outside the range gives q - z, not
// NaN). The backward pass reads x and g once, writes dx, and sums A and D in the same pass; only
// what is requested is computed (the loop is a template on K, on dx, and on the sums). A and D are
// summed together when either dprobs or dscales is requested: the second sum costs little next to
// the quantizers, and fewer template instances keep the build short.
//
// The loops themselves are in mixed_fake_quant_kernels.inc, compiled once per instruction set
// (cpu/simd.h); large outputs come from the output cache (output_cache.h) and are written with
// non-temporal stores.
//
// x is viewed as [outer, C, inner] (per tensor: [1, 1, numel]), and every tile covers one channel
// or a window of channels, in one of two layouts:
//  * span path (per tensor, or inner >= kMinSpanInner): a tile holds rows x[o, c, i0:i1] of one
//    channel c, so its scales are K numbers held in registers and its sums are kLanes lane sums in
//    registers (simd.h), moved into fp64 after each run.
//  * table path (per channel with short inner, e.g. the last axis): a tile holds a *block* per row:
//    the window of channels [c0, c0 + cw) of that row, or, when a whole row is shorter than a run,
//    `merge` consecutive rows; position j of a block is element j of it. Blocks are at most
//    kMaxBlock elements (contiguous, so the hardware prefetcher streams them) and are cut into runs.
//    The scales are read from per-position tables and the sums are kept per position (a
//    RunAccumulator, cpu_common.h); every position belongs to one channel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/cpu_common.h"
#include "cpu/output_cache.h"
#include "quant_math.h"

namespace qdarts {
namespace cpu {
namespace {

// Below this many elements per channel row, the table path (a run crosses channels).
constexpr int64_t kMinSpanInner = 16;
// Longest block of the table path, and so the most positions of a tile.
constexpr int64_t kMaxBlock = 1024;
// Least number of blocks in a table-path tile: a tile's partial sums are 2K per channel of its
// window, so a tile must hold many rows of each channel for them to stay small next to the data.
constexpr int64_t kMinTableTileBlocks = 64;
// Row stride of the per-position tables and sums: a little more than kMaxBlock, so that the rows
// are not a multiple of 4 KiB apart and do not compete for the same L1 cache sets.
constexpr int64_t kRowStride = kMaxBlock + 32;

// How the tiles cover x; depends only on the shape.
struct TilePlan {
  int64_t outer, channels, inner;
  bool table;              // table path or span path
  int64_t rows_per_tile;   // outer rows per tile
  int64_t row_tiles;       // tiles along outer per group
  int64_t groups;          // span: channels; table: channel windows
  int64_t pieces;          // span: pieces of a row longer than a tile (else 1); table: 1
  int64_t piece_len;       // span: elements of a row piece
  int64_t window;          // table: channels per window; span: 1 (a tile's partial sums per row)
  int64_t merge;           // table: rows per block when the window is the whole row; else 1
  int64_t n_tiles;         // groups * row_tiles * pieces; tiles of one group are consecutive
};

// `layout` must have at least one element.
TilePlan make_plan(const ChannelLayout& layout) {
  TilePlan p{};
  p.outer = layout.outer;
  p.channels = layout.channels;
  p.inner = layout.inner;
  if (p.channels == 1) {  // one scale for everything: one long row
    p.inner *= p.outer;
    p.outer = 1;
  }
  p.table = p.inner < kMinSpanInner && p.channels > 1;
  p.pieces = 1;
  p.window = 1;
  p.merge = 1;
  if (!p.table) {
    if (p.inner >= kTileElements) {
      p.pieces = ceil_div(p.inner, kTileElements);
      p.piece_len = kTileElements;
      p.rows_per_tile = 1;
    } else {
      p.piece_len = p.inner;
      p.rows_per_tile = std::max<int64_t>(1, kTileElements / p.inner);
    }
    p.groups = p.channels;
  } else {
    const int64_t row_len = p.channels * p.inner;
    if (row_len <= kMaxBlock) {
      p.window = p.channels;
      p.merge = std::max<int64_t>(1, kRunLength / row_len);
    } else {
      p.window = kMaxBlock / p.inner;  // < channels
    }
    const int64_t block = p.merge * p.window * p.inner;
    p.rows_per_tile = std::max(kTileElements / block, kMinTableTileBlocks) * p.merge;
    p.groups = ceil_div(p.channels, p.window);
  }
  p.row_tiles = ceil_div(p.outer, p.rows_per_tile);
  p.n_tiles = p.groups * p.row_tiles * p.pieces;
  return p;
}

// One tile: which rows and channels it covers, its runs, and the channel of each position.
struct Tile {
  const TilePlan& plan;
  int64_t row_begin, row_end;
  int64_t inner_begin, inner_end;  // span path
  int64_t c0, cw;                  // channels [c0, c0 + cw)

  Tile(const TilePlan& p, int64_t t) : plan(p) {
    const int64_t per_group = p.row_tiles * p.pieces;
    const int64_t group = t / per_group;
    const int64_t rem = t % per_group;
    row_begin = (rem / p.pieces) * p.rows_per_tile;
    row_end = std::min(p.outer, row_begin + p.rows_per_tile);
    if (!p.table) {
      inner_begin = (rem % p.pieces) * p.piece_len;
      inner_end = std::min(p.inner, inner_begin + p.piece_len);
      c0 = group;
      cw = 1;
    } else {
      inner_begin = 0;
      inner_end = p.inner;
      c0 = group * p.window;
      cw = std::min(p.window, p.channels - c0);
    }
  }

  // Number of positions (the length of the tables and of the sums).
  int64_t positions() const {
    return plan.table ? plan.merge * cw * plan.inner : std::min(kRunLength, inner_end - inner_begin);
  }

  // Calls f(j, c) for each position j in order, c its channel relative to c0 (nested loops rather
  // than a division per position).
  template <typename F>
  void for_each_position(F&& f) const {
    if (!plan.table) {
      for (int64_t j = 0; j < positions(); ++j) f(j, 0);
      return;
    }
    int64_t j = 0;
    for (int64_t m = 0; m < plan.merge; ++m) {
      for (int64_t c = 0; c < cw; ++c) {
        for (int64_t i = 0; i < plan.inner; ++i) f(j++, c);
      }
    }
  }

  // Calls run(offset, length, position) for each run of the tile, in a fixed order; the run covers
  // elements [offset, offset + length) of x and positions [position, position + length).
  template <typename F>
  void for_each_run(F&& run) const {
    const TilePlan& p = plan;
    if (!p.table) {
      for (int64_t o = row_begin; o < row_end; ++o) {
        const int64_t base = (o * p.channels + c0) * p.inner;
        for (int64_t i = inner_begin; i < inner_end; i += kRunLength) {
          run(base + i, std::min(kRunLength, inner_end - i), int64_t{0});
        }
      }
      return;
    }
    const auto block = [&](int64_t offset, int64_t length) {
      for (int64_t j = 0; j < length; j += kRunLength) run(offset + j, std::min(kRunLength, length - j), j);
    };
    if (cw == p.channels) {  // whole rows, contiguous: `merge` rows per block
      const int64_t row_len = p.channels * p.inner;
      for (int64_t o = row_begin; o < row_end; o += p.merge) block(o * row_len, std::min(p.merge, row_end - o) * row_len);
    } else {
      for (int64_t o = row_begin; o < row_end; ++o) block((o * p.channels + c0) * p.inner, cw * p.inner);
    }
  }
};

// Everything a tile needs, fixed per call.
struct QuantJob {
  TilePlan plan;
  int k;
  bool relu;                // the relu grid (quant_math.h): quantize relu(x), in = 0 where x <= 0
  GridRange grid[kMaxBits];
  float probs[kMaxBits];
  const float* scales;      // [K, C]
  const float* inv_scales;  // [K, C], 1 / scales in fp32
  InRangeBounds in_bounds[kMaxBits];
  Dtype dtype;              // of x, grad, y and dx
  bool stream;              // non-temporal stores for y / dx
  const void* x;
  const void* grad;
  void* out;                // y (forward) or dx (backward)
  bool need_dx, need_sums;
  int64_t rows;             // partial sums per channel: A_k at row k, D_k at row K + k (0 rows if none)
  double* partials;         // [n_tiles, rows, window]
};

// Row k of `table` (stride kRowStride) gets, at each position of the tile, the value of
// `per_channel` ([K, C]) for that position's channel.
void fill_table(const QuantJob& job, const Tile& tile, const float* per_channel, float* table) {
  const int64_t channels = job.plan.channels;
  for (int k = 0; k < job.k; ++k) {
    const float* row = per_channel + k * channels + tile.c0;
    float* out = table + k * kRowStride;
    tile.for_each_position([&](int64_t j, int64_t c) { out[j] = row[c]; });
  }
}

// Calls f(std::integral_constant<int, K>, std::bool_constant<relu>) for the job's K and grid.
template <typename F>
void dispatch_k_relu(const QuantJob& job, F&& f) {
  const auto with_k = [&](auto relu) {
    switch (job.k) {
      case 1: f(std::integral_constant<int, 1>{}, relu); break;
      case 2: f(std::integral_constant<int, 2>{}, relu); break;
      case 3: f(std::integral_constant<int, 3>{}, relu); break;
      default: f(std::integral_constant<int, 4>{}, relu); break;
    }
  };
  if (job.relu) {
    with_k(std::true_type{});
  } else {
    with_k(std::false_type{});
  }
}

#define QD_ISA_KERNELS "cpu/mixed_fake_quant_kernels.inc"
#include "cpu/foreach_isa.h"

// The per-call part of a job: grids, probs, scales (checked > 0 and finite: reading them is free
// on CPU) and their reciprocals.
QuantJob make_job(const ChannelLayout& layout, const at::Tensor& probs, const at::Tensor& scales,
                  c10::IntArrayRef bits, int64_t grid, std::vector<float>& inv_scales) {
  QuantJob job{};
  if (layout.outer * layout.channels * layout.inner > 0) job.plan = make_plan(layout);  // else no tiles
  job.k = static_cast<int>(bits.size());
  job.relu = grid == kGridRelu;
  const float* p = probs.data_ptr<float>();
  const float* s = scales.data_ptr<float>();
  const int64_t channels = layout.channels;
  inv_scales.resize(job.k * channels);
  for (int k = 0; k < job.k; ++k) {
    job.grid[k] = grid_range(static_cast<int>(grid), static_cast<int>(bits[k]));
    job.in_bounds[k] = in_range_bounds(job.grid[k]);
    job.probs[k] = p[k];
    for (int64_t c = 0; c < channels; ++c) {
      const float v = s[k * channels + c];
      // at least the smallest normal float32: below it 1 / v overflows to inf, and inf times the
      // zeros that pad a run to whole vectors is NaN in the reductions
      const bool valid = std::isfinite(v) && v >= std::numeric_limits<float>::min();
      if (scales.dim() == 1) {
        TORCH_CHECK(valid, "scales must be finite and >= 2**-126, got scales[", k, "] = ", v);
      } else {
        TORCH_CHECK(valid, "scales must be finite and >= 2**-126, got scales[", k, ", ", c, "] = ", v);
      }
      inv_scales[k * channels + c] = 1.0f / v;
    }
  }
  job.scales = s;
  job.inv_scales = inv_scales.data();
  return job;
}

at::Tensor mixed_fake_quant_forward_cpu(const at::Tensor& x_in, const at::Tensor& probs_in,
                                        const at::Tensor& scales_in, c10::IntArrayRef bits, int64_t grid,
                                        int64_t axis) {
  const ChannelLayout layout = check_mixed_fake_quant_args(x_in, probs_in, scales_in, bits, grid, axis);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor probs = probs_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  at::Tensor y = empty_output_like(x);
  std::vector<float> inv_scales;
  QuantJob job = make_job(layout, probs, scales, bits, grid, inv_scales);
  if (x.numel() == 0) return y;
  job.dtype = dtype_of(x);
  job.x = x.data_ptr();
  job.out = y.data_ptr();
  job.stream = static_cast<int64_t>(y.nbytes()) >= kStreamingStoreBytes;
  at::parallel_for(0, job.plan.n_tiles, parallel_grain(x.numel(), job.plan.n_tiles),
                   [&](int64_t begin, int64_t end) { QD_ISA_DISPATCH(forward_tiles, job, begin, end); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_fake_quant_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& probs_in, const at::Tensor& scales_in,
    c10::IntArrayRef bits, int64_t grid, int64_t axis, bool need_dx, bool need_dprobs, bool need_dscales) {
  const ChannelLayout layout = check_mixed_fake_quant_args(x_in, probs_in, scales_in, bits, grid, axis);
  check_grad_like(grad_in, x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor probs = probs_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  std::vector<float> inv_scales;
  QuantJob job = make_job(layout, probs, scales, bits, grid, inv_scales);
  const int k = job.k;
  const int64_t channels = layout.channels;

  at::Tensor dx = need_dx ? empty_output_like(x) : at::empty({0}, x.options());
  at::Tensor dprobs = need_dprobs ? at::zeros({k}, probs.options()) : at::empty({0}, probs.options());
  at::Tensor dscales = need_dscales ? at::zeros(scales.sizes(), scales.options()) : at::empty({0}, scales.options());
  if (x.numel() == 0 || !(need_dx || need_dprobs || need_dscales)) return {dx, dprobs, dscales};

  job.dtype = dtype_of(x);
  job.x = x.data_ptr();
  job.grad = grad.data_ptr();
  job.out = need_dx ? dx.data_ptr() : nullptr;
  job.need_dx = need_dx;
  job.stream = need_dx && static_cast<int64_t>(dx.nbytes()) >= kStreamingStoreBytes;
  job.need_sums = need_dprobs || need_dscales;
  job.rows = job.need_sums ? 2 * k : 0;
  const TilePlan& plan = job.plan;
  std::vector<double> partials(plan.n_tiles * job.rows * plan.window, 0.0);
  job.partials = partials.data();

  at::parallel_for(0, plan.n_tiles, parallel_grain(x.numel(), plan.n_tiles),
                   [&](int64_t begin, int64_t end) { QD_ISA_DISPATCH(backward_tiles, job, begin, end); });

  if (job.rows == 0) return {dx, dprobs, dscales};
  // Sum each channel's tile partials in tile order (one thread: the same bits for any thread count).
  const int64_t tiles_per_group = plan.row_tiles * plan.pieces;
  std::vector<double> sums(job.rows * channels, 0.0);
  for (int64_t t = 0; t < plan.n_tiles; ++t) {
    const int64_t c0 = (t / tiles_per_group) * plan.window;
    const int64_t cw = std::min(plan.window, channels - c0);
    const double* slot = job.partials + t * job.rows * plan.window;
    for (int64_t r = 0; r < job.rows; ++r) {
      for (int64_t c = 0; c < cw; ++c) sums[r * channels + c0 + c] += slot[r * plan.window + c];
    }
  }
  const float* s = scales.data_ptr<float>();
  if (need_dprobs) {
    float* dp = dprobs.data_ptr<float>();
    for (int kk = 0; kk < k; ++kk) {
      double total = 0.0;
      for (int64_t c = 0; c < channels; ++c) {
        total += static_cast<double>(s[kk * channels + c]) * sums[kk * channels + c];
      }
      dp[kk] = static_cast<float>(total);
    }
  }
  if (need_dscales) {
    float* ds = dscales.data_ptr<float>();
    for (int kk = 0; kk < k; ++kk) {
      for (int64_t c = 0; c < channels; ++c) {
        ds[kk * channels + c] = static_cast<float>(static_cast<double>(job.probs[kk]) * sums[(k + kk) * channels + c]);
      }
    }
  }
  return {dx, dprobs, dscales};
}

}  // namespace

TORCH_LIBRARY_IMPL(qdarts_C, CPU, m) {
  m.impl("mixed_fake_quant_forward", &mixed_fake_quant_forward_cpu);
  m.impl("mixed_fake_quant_backward", &mixed_fake_quant_backward_cpu);
}

}  // namespace cpu
}  // namespace qdarts
