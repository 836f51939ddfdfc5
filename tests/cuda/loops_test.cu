// Host-side check of the launch geometry and element loops of csrc/cuda/common.cuh, the part of the
// CUDA kernels that decides which thread touches which element and where its partial sums go.
// Run by .ci/compile_cuda.sh (no GPU needed): for each shape it executes the loop of every thread
// of the grid a launcher would use and checks that
//   - every element is visited exactly once, in groups of the requested width that are aligned;
//   - per channel, a block only visits elements of its own channel (block_x);
//   - the partial row of each block is the one launch_sum_partials adds for its channel (or for the
//     whole tensor), so every reduced gradient sums each block exactly once;
//   - the second pass's blocks over two groups of outputs give each output of each group to exactly
//     one block.
// Exit status 0 when every case passes.
#include <cstdio>
#include <vector>

#include "cuda/common.cuh"

using namespace qdarts::gpu;

namespace {

int failures = 0;

void fail(const char* what, const ChannelView& view, int vec, int64_t cap, int64_t detail) {
  if (++failures <= 20) {
    std::printf("FAIL %s: outer=%lld channels=%lld inner=%lld per_channel=%d vec=%d cap=%lld (%lld)\n", what,
                static_cast<long long>(view.outer), static_cast<long long>(view.channels),
                static_cast<long long>(view.inner), static_cast<int>(view.per_channel), vec,
                static_cast<long long>(cap), static_cast<long long>(detail));
  }
}

template <int VEC, bool PER_CHANNEL, int M>
void check_case(const ChannelView& view, int64_t cap) {
  const dim3 grid = element_grid(view, cap);
  const int64_t n = view.numel();
  std::vector<int> visits(n, 0);
  const int64_t blocks = grid_blocks(grid);
  if (PER_CHANNEL ? (grid.x != view.channels || (grid.y > 1 && blocks > cap)) : blocks > cap) {
    fail("grid larger than its cap", view, VEC, cap, blocks);
  }
  std::vector<int> row_owner(blocks, 0);
  for (int64_t bx = 0; bx < grid.x; ++bx) {
    for (int64_t by = 0; by < grid.y; ++by) {
      for (int64_t thread = 0; thread < kThreads; ++thread) {
        const ThreadCoords t{bx, by, grid.x, grid.y, thread};
        auto body = [&](auto width, const auto& groups) {
          constexpr int N = decltype(width)::value;
          for (int64_t offset : groups.at) {
            if (offset % N != 0) fail("misaligned group", view, VEC, cap, offset);
            for (int j = 0; j < N; ++j) {
              const int64_t e = offset + j;
              if (e < 0 || e >= n) {
                fail("element out of range", view, VEC, cap, e);
                continue;
              }
              ++visits[e];
              if (PER_CHANNEL && (e / view.inner) % view.channels != bx) {
                fail("element of another channel", view, VEC, cap, e);
              }
            }
          }
        };
        for_each_element<VEC, PER_CHANNEL, M>(view, t, body);
      }
      // The rows launch_sum_partials adds: per channel, segment bx of length splits; per tensor, one
      // segment of all blocks.
      const int64_t row = block_row(ThreadCoords{bx, by, grid.x, grid.y, 0});
      const int64_t expected = PER_CHANNEL ? segment_row(bx, grid.y, by) : segment_row(0, blocks, bx);
      if (row != expected || row < 0 || row >= blocks) {
        fail("partial row outside its segment", view, VEC, cap, row);
      } else {
        ++row_owner[row];
      }
    }
  }
  for (int64_t e = 0; e < n; ++e) {
    if (visits[e] != 1) fail("element not visited exactly once", view, VEC, cap, e);
  }
  for (int64_t r = 0; r < blocks; ++r) {
    if (row_owner[r] != 1) fail("partial row not owned by exactly one block", view, VEC, cap, r);
  }
}

template <int VEC>
void check_view(const ChannelView& view) {
  // The caps of the launchers, and tiny ones that force many grid-stride steps per thread.
  for (int64_t cap : {kElementwiseBlocks, kReduceBlocks, int64_t{3}, int64_t{1}}) {
    if (view.per_channel) {
      if (view.inner % VEC == 0) check_case<VEC, true, 1>(view, cap);
    } else {
      check_case<VEC, false, 1>(view, cap);
      check_case<VEC, false, 2>(view, cap);  // two groups a step (mixed_fake_quant)
      check_case<VEC, false, 3>(view, cap);
    }
  }
}

void check_all_widths(const ChannelView& view) {
  check_view<1>(view);
  check_view<4>(view);
  check_view<8>(view);
}

// columns_of_output: the blocks of a launch over `first` then `second` cover each output of each group
// exactly once, with its index in its group.
void check_output_groups() {
  std::vector<float> first_out(12), second_out(40);
  const PartialColumns groups[][2] = {
      {{0, 3, 1, 10, nullptr, first_out.data()}, {3, 3, 1, 10, nullptr, second_out.data()}},  // per tensor
      {{0, 3, 1, 10, nullptr, first_out.data()}, {3, 4, 10, 2, nullptr, second_out.data()}},  // per channel
      {{0, 4, 1, 7, nullptr, first_out.data()}, PartialColumns{}},                            // one group
      {PartialColumns{}, {0, 2, 20, 3, nullptr, second_out.data()}},
  };
  for (const auto& g : groups) {
    std::vector<int> first_hits(partial_outputs(g[0]), 0), second_hits(partial_outputs(g[1]), 0);
    for (int64_t block = 0; block < partial_outputs(g[0]) + partial_outputs(g[1]); ++block) {
      int64_t o = block;
      const PartialColumns c = columns_of_output(g[0], g[1], o);
      std::vector<int>& hits = c.out == g[0].out ? first_hits : second_hits;
      if (o < 0 || o >= static_cast<int64_t>(hits.size())) {
        if (++failures <= 20) std::printf("FAIL output %lld of block %lld out of its group\n", (long long)o,
                                          (long long)block);
        continue;
      }
      ++hits[o];
    }
    for (const std::vector<int>* hits : {&first_hits, &second_hits})
      for (int h : *hits)
        if (h != 1 && ++failures <= 20) std::printf("FAIL a second-pass output taken %d times\n", h);
  }
}

}  // namespace

int main() {
  check_output_groups();
  int cases = 0;
  // Per tensor: empty-tail and tail sizes around the group widths and the block size.
  for (int64_t n : {1, 3, 7, 8, 9, 255, 256, 257, 2047, 2048, 2049, 100003, 1 << 20}) {
    check_all_widths(ChannelView{1, 1, n, false});
    ++cases;
  }
  // Per channel: inner = 1 (channel last), odd inner, rows shorter and longer than a grid sweep,
  // many channels (more than the reduce cap, so one block per channel).
  const ChannelView per_channel[] = {
      {1, 1, 1, true},      {7, 5, 1, true},      {3, 4, 9, true},       {1, 64, 144, true},
      {2, 3, 8, true},      {5, 7, 16, true},     {1, 3, 70000, true},   {300, 3, 1, true},
      {33, 17, 64, true},   {2, 5000, 8, true},   {4, 6, 1027, true},    {256, 16, 8, true},
  };
  for (const ChannelView& view : per_channel) {
    check_all_widths(view);
    ++cases;
  }
  if (failures == 0) std::printf("loops_test: %d shapes, all element loops and partial rows correct\n", cases);
  return failures == 0 ? 0 : 1;
}
