// Per-block work of the grouped mixed fake-quant kernels (mixed_fake_quant_grouped.cu): find the
// tensor of a block of the 1-D grid and the block's coordinates inside that tensor's own launch
// grid, so that the single-tensor per-thread code (mixed_fake_quant.cuh) runs unchanged.
// Host-and-device code, so that a host test can run it for every block of a grid.
#pragma once

#include "cuda/common.cuh"
#include "cuda/mixed_fake_quant.cuh"

namespace qdarts {
namespace gpu {

// Largest i < n with tensors[i].*key <= value (the field is non-decreasing in i): the tensor a
// block or a segment belongs to. Tensors with no blocks share their block_start with the next
// one, so the largest such i is the one that owns `value`.
QD_HOST_DEVICE int find_tensor(const GroupedTensor* tensors, int n, int64_t value, int64_t GroupedTensor::*key) {
  int lo = 0;
  int hi = n - 1;
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;  // not (lo + hi + 1) / 2, which overflows past 2^30 tensors
    if (tensors[mid].*key <= value) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The coordinates block `local` of a tensor would have in that tensor's own launch
// (element_grid: (C, splits) per channel, (blocks) per tensor).
QD_HOST_DEVICE ThreadCoords grouped_coords(const GroupedTensor& t, int64_t local, int64_t thread) {
  if (t.view.per_channel) return {local / t.splits, local % t.splits, t.view.channels, t.splits, thread};
  return {local, 0, t.blocks, 1, thread};
}

// plan_mixed_fake_quant_grouped (kernels.h), inline here so that the host test can run it.
inline int64_t plan_grouped_tensors(GroupedTensor* tensors, int n, bool reduces, int64_t* segments) {
  int64_t blocks = 0;
  int64_t channels = 0;
  for (int i = 0; i < n; ++i) {
    GroupedTensor& t = tensors[i];
    t.block_start = blocks;
    t.blocks = 0;
    t.splits = 0;
    // a tensor with no elements gets no blocks (and element_grid would divide by C = 0)
    if (t.view.numel() > 0) {
      const dim3 grid = element_grid(t.view, reduces ? kReduceBlocks : kElementwiseBlocks);
      t.blocks = grid_blocks(grid);
      t.splits = t.view.per_channel ? static_cast<int64_t>(grid.y) : t.blocks;
    }
    t.partial_row = blocks;  // one partials row per block
    t.segment_start = channels;
    blocks += t.blocks;
    channels += t.view.per_channel ? t.view.channels : 1;
  }
  *segments = channels;
  return blocks;
}

// Kernel argument shared by all tensors: the grid's levels and the [N, K] probs.
struct GroupedQuantizerArgs {
  GridLevels grid;
  const float* probs;
};

inline GroupedQuantizerArgs make_grouped_quantizer_args(const MixedQuantizer& quantizer) {
  GroupedQuantizerArgs args{};
  args.grid = make_grid_levels(quantizer);
  args.probs = quantizer.probs;
  return args;
}

// The single-tensor kernel argument of tensor i.
template <int K>
QD_HOST_DEVICE QuantizerArgs tensor_quantizer_args(const GroupedQuantizerArgs& args, const GroupedTensor& t,
                                                   int i) {
  QuantizerArgs q{};
  q.grid = args.grid;
  q.probs = args.probs + static_cast<int64_t>(i) * K;
  q.scales = t.scales;
  q.scale_stride = t.view.per_channel ? t.view.channels : 1;
  return q;
}

}  // namespace gpu
}  // namespace qdarts
