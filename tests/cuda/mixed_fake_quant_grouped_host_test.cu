// Host-side check of the grouped mixed fake-quant kernels' geometry and indexing
// (csrc/cuda/mixed_fake_quant_grouped.cuh), run by .ci/compile_cuda.sh without a GPU. For groups
// of tensors (odd sizes, empty tensors, C = 0, per tensor and per channel) it checks that
//   - every block of the 1-D grid finds its tensor, and gets exactly the coordinates of one block
//     of that tensor's own launch grid (each of those exactly once);
//   - the partial rows of all blocks are distinct, and per channel lie in their channel's segment;
//   - every dscales segment finds its tensor and a channel in range;
//   - running the per-thread forward code of every block and thread, with each tensor's probs row
//     and scales slice, gives each tensor's element-by-element result bit for bit.
// What only a GPU does (block reduction, the sum kernel, the descriptor copy) is tested by
// tests/test_grouped.py on a GPU.
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/mixed_fake_quant_grouped.cuh"

using namespace qdarts;
using namespace qdarts::gpu;

namespace {

int failures = 0;
int checks = 0;

void fail(const char* what, int64_t a, int64_t b) {
  if (++failures <= 20) {
    std::printf("FAIL %s (%lld, %lld)\n", what, static_cast<long long>(a), static_cast<long long>(b));
  }
}

void check_group(const std::vector<ChannelView>& views, bool reduces, std::mt19937& rng) {
  ++checks;
  const int n = static_cast<int>(views.size());
  constexpr int K = 3;
  std::vector<GroupedTensor> tensors(n);
  std::vector<std::vector<float>> xs(n), ys(n);
  std::vector<float> probs(n * K), scales;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (int i = 0; i < n; ++i) {
    tensors[i].view = views[i];
    tensors[i].scale_offset = static_cast<int64_t>(scales.size());
    const int64_t channels = views[i].per_channel ? views[i].channels : 1;
    for (int64_t s = 0; s < K * channels; ++s) scales.push_back(0.02f + 0.5f * uniform(rng));
    for (int k = 0; k < K; ++k) probs[i * K + k] = 0.1f + uniform(rng);
    xs[i].resize(views[i].numel());
    ys[i].assign(views[i].numel(), NAN);
    for (float& v : xs[i]) v = 2.0f * normal(rng);
    tensors[i].x = xs[i].data();
    tensors[i].out = ys[i].data();
  }
  for (int i = 0; i < n; ++i) tensors[i].scales = scales.data() + tensors[i].scale_offset;
  int64_t segments = 0;
  const int64_t blocks = plan_grouped_tensors(tensors.data(), n, reduces, &segments);

  MixedQuantizer quantizer{K, {2, 4, 8}, kGridSigned, probs.data(), nullptr};
  const GroupedQuantizerArgs args = make_grouped_quantizer_args(quantizer);
  std::vector<std::vector<int>> block_visits(n);
  for (int i = 0; i < n; ++i) block_visits[i].assign(tensors[i].blocks, 0);
  std::vector<int> row_visits(blocks, 0);
  for (int64_t b = 0; b < blocks; ++b) {
    const int i = find_tensor(tensors.data(), n, b, &GroupedTensor::block_start);
    const GroupedTensor& t = tensors[i];
    const int64_t local = b - t.block_start;
    if (local < 0 || local >= t.blocks) {
      fail("block outside its tensor's range", b, i);
      continue;
    }
    const dim3 own = element_grid(t.view, reduces ? kReduceBlocks : kElementwiseBlocks);
    const ThreadCoords c = grouped_coords(t, local, 0);
    if (c.grid_x != own.x || c.grid_y != own.y || c.block_x >= c.grid_x || c.block_y >= c.grid_y) {
      fail("coordinates differ from the tensor's own grid", b, i);
      continue;
    }
    ++block_visits[i][c.block_x * c.grid_y + c.block_y];
    const int64_t row = t.partial_row + block_row(c);
    if (row < 0 || row >= blocks) {
      fail("partial row out of range", b, row);
      continue;
    }
    ++row_visits[row];
    // per channel, the sum kernel adds rows [partial_row + c * splits, + splits) for channel c
    const int64_t segment_first = t.partial_row + c.block_x * t.splits;
    if (t.view.per_channel && (row < segment_first || row >= segment_first + t.splits)) {
      fail("partial row outside its channel's segment", b, row);
    }
    const QuantizerArgs q = tensor_quantizer_args<K>(args, t, i);
    for (int64_t thread = 0; thread < kThreads; ++thread) {
      const ThreadCoords tc = grouped_coords(t, local, thread);
      const float* x = static_cast<const float*>(t.x);
      float* y = static_cast<float*>(t.out);
      if (t.view.per_channel) {
        mixed_fake_quant_forward_thread<float, K, 1, true>(x, y, q, t.view, tc);
      } else {
        mixed_fake_quant_forward_thread<float, K, 1, false>(x, y, q, t.view, tc);
      }
    }
  }
  for (int i = 0; i < n; ++i)
    for (int v : block_visits[i])
      if (v != 1) fail("a block of a tensor's own grid is not visited exactly once", i, v);
  for (int64_t r = 0; r < blocks; ++r)
    if (row_visits[r] != 1) fail("a partial row is not written exactly once", r, row_visits[r]);
  int64_t expected_segments = 0;
  for (const ChannelView& v : views) expected_segments += v.per_channel ? v.channels : 1;
  if (segments != expected_segments) fail("segment count", segments, expected_segments);
  for (int64_t s = 0; s < segments; ++s) {
    const int i = find_tensor(tensors.data(), n, s, &GroupedTensor::segment_start);
    const int64_t channel = s - tensors[i].segment_start;
    if (channel < 0 || channel >= (views[i].per_channel ? views[i].channels : 1)) fail("segment's channel", s, i);
  }
  // each element: the single tensor's quantizer (its probs row, its scales slice)
  for (int i = 0; i < n; ++i) {
    QuantizerArgs single{};
    single.grid = make_grid_levels(quantizer);
    single.probs = probs.data() + i * K;
    single.scales = scales.data() + tensors[i].scale_offset;
    single.scale_stride = views[i].per_channel ? views[i].channels : 1;
    for (int64_t e = 0; e < views[i].numel(); ++e) {
      const int64_t channel = views[i].per_channel ? (e / views[i].inner) % views[i].channels : 0;
      const float want = mixed_quantize<K>(xs[i][e], load_quantizers<K>(single, channel));
      if (!(ys[i][e] == want)) fail("y differs from the single tensor's", i, e);
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  for (bool reduces : {false, true}) {
    check_group({{1, 1, 1000, false}}, reduces, rng);
    check_group({{1, 1, 7, false}, {1, 1, 0, false}, {1, 1, 70001, false}, {1, 1, 1, false}, {1, 1, 0, false}},
                reduces, rng);
    check_group({{1, 1, 0, false}, {1, 1, 4103, false}}, reduces, rng);
    check_group({{1, 16, 27, true}, {0, 3, 5, true}, {4, 5, 9, true}, {33, 6, 1, true}, {2, 0, 3, true},
                 {1, 64, 4608, true}},
                reduces, rng);
    check_group({{1, 1, 1, true}, {3, 2, 1, true}}, reduces, rng);
  }
  if (failures == 0) std::printf("mixed_fake_quant_grouped_host_test: %d groups, geometry and indexing hold\n", checks);
  return failures == 0 ? 0 : 1;
}
