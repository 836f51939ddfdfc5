// Host-side run of the mixed fake-quant kernels' per-thread code (csrc/cuda/mixed_fake_quant.cuh):
// every thread of the grid the launcher would use runs on the CPU, and the result is compared with
// the element-by-element application of the same quantizer maths:
//   - y and dx bit for bit (each element's value may not depend on how threads are laid out);
//   - the per-thread dprobs / dscales sums, added up per channel as the partials are, within a
//     tight tolerance of sums taken element by element in double.
// This exercises the vectorised groups, the tail, dtype conversions, per-channel parameters and the
// gradient flags. It cannot check what only a GPU does (block reduction, finishing kernel, launch);
// tests/test_backends.py and tests/test_cuda_backend.py do that on a GPU. Run by .ci/compile_cuda.sh.
#include <cmath>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

#include "cuda/mixed_fake_quant.cuh"

using namespace qdarts;
using namespace qdarts::gpu;

namespace {

int failures = 0;
int checks = 0;

template <typename T>
const char* dtype_name() {
  if (sizeof(T) == 4) return "float32";
  return std::is_same<T, __half>::value ? "float16" : "bfloat16";
}

void report(const char* what, const char* dtype, int k, int vec, const ChannelView& view, int64_t index, double got,
            double want) {
  if (++failures <= 20) {
    std::printf("FAIL %s: %s K=%d vec=%d outer=%lld C=%lld inner=%lld per_channel=%d at %lld: got %.9g want %.9g\n",
                what, dtype, k, vec, static_cast<long long>(view.outer), static_cast<long long>(view.channels),
                static_cast<long long>(view.inner), static_cast<int>(view.per_channel),
                static_cast<long long>(index), got, want);
  }
}

bool same_value(float a, float b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

template <typename T, int K, int VEC, bool PER_CHANNEL, bool NEED_DX, bool NEED_DPROBS, bool NEED_DSCALES>
void check_case(const ChannelView& view, int grid, const int (&bits)[K], std::mt19937& rng) {
  ++checks;
  const int64_t n = view.numel();
  const int64_t channels = PER_CHANNEL ? view.channels : 1;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<T> x(n), g(n), y(n), dx(n);
  for (int64_t e = 0; e < n; ++e) {
    x[e] = from_float<T>(2.0f * normal(rng));
    g[e] = from_float<T>(normal(rng));
  }
  if (n > 5) {  // special values
    x[1] = from_float<T>(INFINITY);
    x[2] = from_float<T>(-INFINITY);
    x[3] = from_float<T>(NAN);
    x[4] = from_float<T>(-0.0f);
    x[5] = from_float<T>(-0.01f);
  }
  std::vector<float> probs(K), scales(K * channels);
  for (float& p : probs) p = 0.1f + uniform(rng);
  for (float& s : scales) s = 0.02f + 0.5f * uniform(rng);
  MixedQuantizer quantizer{K, {}, grid, probs.data(), scales.data()};
  for (int k = 0; k < K; ++k) quantizer.bits[k] = bits[k];
  const QuantizerArgs args = make_quantizer_args(quantizer, view);
  auto channel_of = [&](int64_t e) { return PER_CHANNEL ? (e / view.inner) % view.channels : 0; };

  const dim3 forward_grid = element_grid(view, kElementwiseBlocks);
  for (int64_t bx = 0; bx < forward_grid.x; ++bx)
    for (int64_t by = 0; by < forward_grid.y; ++by)
      for (int64_t thread = 0; thread < kThreads; ++thread)
        mixed_fake_quant_forward_thread<T, K, VEC, PER_CHANNEL>(
            x.data(), y.data(), args, view, ThreadCoords{bx, by, forward_grid.x, forward_grid.y, thread});

  const bool reduces = NEED_DPROBS || NEED_DSCALES;
  const dim3 backward_grid = element_grid(view, reduces ? kReduceBlocks : kElementwiseBlocks);
  std::vector<double> dprob_sum(K, 0.0), dscale_sum(K * channels, 0.0);
  for (int64_t bx = 0; bx < backward_grid.x; ++bx) {
    for (int64_t by = 0; by < backward_grid.y; ++by) {
      for (int64_t thread = 0; thread < kThreads; ++thread) {
        float dprob[K] = {}, dscale[K] = {};
        mixed_fake_quant_backward_thread<T, K, VEC, PER_CHANNEL, NEED_DX, NEED_DPROBS, NEED_DSCALES>(
            g.data(), x.data(), dx.data(), args, view,
            ThreadCoords{bx, by, backward_grid.x, backward_grid.y, thread}, dprob, dscale);
        for (int k = 0; k < K; ++k) {
          dprob_sum[k] += dprob[k];
          dscale_sum[k * channels + (PER_CHANNEL ? bx : 0)] += probs[k] * static_cast<double>(dscale[k]);
        }
      }
    }
  }

  std::vector<double> dprob_want(K, 0.0), dscale_want(K * channels, 0.0), magnitude(K, 1.0);
  for (int64_t e = 0; e < n; ++e) {
    const Quantizers<K> q = load_quantizers<K>(args, channel_of(e));
    const float xe = to_float(x[e]);
    const float want_y = to_float(from_float<T>(mixed_quantize<K>(xe, q)));
    if (!same_value(to_float(y[e]), want_y)) report("y", dtype_name<T>(), K, VEC, view, e, to_float(y[e]), want_y);
    float level_sum[K] = {}, dscale[K] = {};
    const float d = mixed_quantize_backward<K, NEED_DX, NEED_DPROBS, NEED_DSCALES>(xe, to_float(g[e]), q, level_sum,
                                                                                    dscale);
    const float want_dx = to_float(from_float<T>(d));
    if (NEED_DX && !same_value(to_float(dx[e]), want_dx)) {
      report("dx", dtype_name<T>(), K, VEC, view, e, to_float(dx[e]), want_dx);
    }
    float dprob[K];
    for (int k = 0; k < K; ++k) dprob[k] = q.scale[k] * level_sum[k];
    for (int k = 0; k < K; ++k) {
      dprob_want[k] += dprob[k];
      dscale_want[k * channels + channel_of(e)] += probs[k] * static_cast<double>(dscale[k]);
      // Scale of the tolerance; the NaN element's terms are left out of it.
      if (std::isfinite(dprob[k]) && std::isfinite(dscale[k])) {
        magnitude[k] += std::fabs(dprob[k]) + std::fabs(dscale[k]);
      }
    }
  }
  // The NaN element makes dprobs NaN for every k; dscales of the other channels stay finite.
  for (int k = 0; k < K; ++k) {
    const double tol = 1e-5 * magnitude[k];
    if (NEED_DPROBS && !(std::fabs(dprob_sum[k] - dprob_want[k]) <= tol ||
                         (std::isnan(dprob_sum[k]) && std::isnan(dprob_want[k])))) {
      report("dprobs", dtype_name<T>(), K, VEC, view, k, dprob_sum[k], dprob_want[k]);
    }
    for (int64_t c = 0; c < channels; ++c) {
      const double got = dscale_sum[k * channels + c], want = dscale_want[k * channels + c];
      if (NEED_DSCALES && !(std::fabs(got - want) <= tol || (std::isnan(got) && std::isnan(want)))) {
        report("dscales", dtype_name<T>(), K, VEC, view, k * channels + c, got, want);
      }
    }
  }
}

// Every gradient-flag combination the launcher instantiates, for one dtype / K / width / layout.
template <typename T, int K, int VEC, bool PER_CHANNEL>
void check_flags(const ChannelView& view, int grid, const int (&bits)[K], std::mt19937& rng) {
  check_case<T, K, VEC, PER_CHANNEL, true, true, true>(view, grid, bits, rng);
  check_case<T, K, VEC, PER_CHANNEL, true, false, false>(view, grid, bits, rng);
  check_case<T, K, VEC, PER_CHANNEL, false, true, false>(view, grid, bits, rng);
  check_case<T, K, VEC, PER_CHANNEL, false, false, true>(view, grid, bits, rng);
}

template <typename T>
void check_dtype(std::mt19937& rng) {
  constexpr int kVec = vector_width<T>();
  const int bits3[3] = {2, 4, 8};
  const int bits1[1] = {5};
  const int bits4[4] = {1, 3, 8, 16};
  // Per tensor: sizes with and without a tail, and one that needs several grid-stride steps.
  for (int64_t n : {1, 7, 8, 9, 1000, 4103}) {
    const ChannelView view{1, 1, n, false};
    check_flags<T, 3, 1, false>(view, kGridSigned, bits3, rng);
    check_flags<T, 3, kVec, false>(view, kGridSigned, bits3, rng);
  }
  check_flags<T, 1, kVec, false>(ChannelView{1, 1, 70001, false}, kGridUnsigned, bits1, rng);
  check_flags<T, 4, kVec, false>(ChannelView{1, 1, 2049, false}, kGridMidrise, bits4, rng);
  // Per channel: inner = 1, odd inner, and vectorisable rows.
  check_flags<T, 3, 1, true>(ChannelView{33, 6, 1, true}, kGridMidrise, bits3, rng);
  check_flags<T, 3, 1, true>(ChannelView{4, 5, 9, true}, kGridSigned, bits3, rng);
  check_flags<T, 3, kVec, true>(ChannelView{3, 4, 16, true}, kGridUnsigned, bits3, rng);
  check_flags<T, 1, kVec, true>(ChannelView{1, 7, 2304, true}, kGridSigned, bits1, rng);
  check_flags<T, 4, 1, true>(ChannelView{2, 3, 1001, true}, kGridMidrise, bits4, rng);
  check_flags<T, 3, kVec, false>(ChannelView{1, 1, 4103, false}, kGridRelu, bits3, rng);
  check_flags<T, 4, 1, true>(ChannelView{3, 5, 77, true}, kGridRelu, bits4, rng);
}

bool same_bits(float a, float b) { return same_value(a, b) && std::signbit(a) == std::signbit(b); }

// The quantizer as DESIGN section 4 defines it, written directly (round, then clamp; the relu grid
// as torch.relu then the unsigned grid, in = 0 where x <= 0; level 0 as +0.0, as PyTorch's integer
// levels give it): what quant_math.h's rearranged quantize() must equal.
QuantResult quantize_by_definition(float x, float inv_s, int grid, int bits) {
  const GridRange g = grid_range(grid, bits);
  const float relu_x = x < 0.0f ? 0.0f : x;  // torch.relu: -0.0 and NaN stay
  const float floored = grid == kGridRelu ? relu_x : x;
  const float v = floored * inv_s + g.zero_point;
  const float r = std::nearbyint(v);
  const float q = r < g.qmin ? g.qmin : (r > g.qmax ? g.qmax : r);
  const bool in = g.qmin <= r && r <= g.qmax && (grid != kGridRelu || x > 0.0f);
  return {(q - g.zero_point) + 0.0f, in, floored * inv_s};
}

// quantize() against the definition on every grid and bit-width: the values around each level's
// rounding ties (exact at power-of-two scales), both ends of the range, the floor of the relu grid,
// the special values and random ones; (q - z) bit for bit (its sign included), in, and x * inv_s
// wherever in.
void check_quantize_against_the_definition(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int grid : {kGridSigned, kGridUnsigned, kGridMidrise, kGridRelu}) {
    for (int bits : {1, 2, 3, 4, 8, 15, 16}) {
      const GridRange g = grid_range(grid, bits);
      const QuantLevels levels = quant_levels(g);
      for (float inv_s : {4.0f, 1.0f, 0.25f, 1.0f / 3.0f, 1e-3f}) {
        std::vector<float> xs = {-0.0f, 0.0f, -1e-45f, 1e-45f, -0.1f, -0.3f, -0.5f, -1e-30f, 0.2f, 7.9f, 100.0f,
                                 -100.0f, 1e30f, -1e30f, INFINITY, -INFINITY, NAN};
        for (float m : {g.qmin - 2.0f, g.qmin - 1.0f, g.qmin, g.qmin + 1.0f, 0.0f, 1.0f, g.qmax - 1.0f, g.qmax,
                        g.qmax + 1.0f, g.qmax + 2.0f}) {
          const float tie = (m + 0.5f - g.zero_point) / inv_s;
          xs.insert(xs.end(), {tie, std::nextafter(tie, INFINITY), std::nextafter(tie, -INFINITY), -tie,
                               (m - g.zero_point) / inv_s});
        }
        for (int i = 0; i < 64; ++i) xs.push_back(normal(rng) * (g.qmax - g.qmin + 4.0f) / inv_s);
        for (float x : xs) {
          ++checks;
          const QuantResult want = quantize_by_definition(x, inv_s, grid, bits);
          const QuantResult got = quantize(floored_input(x, g.x_floor), x > g.x_floor, inv_s, levels);
          if (!same_bits(got.q_minus_z, want.q_minus_z) || got.in_range != want.in_range ||
              (want.in_range && got.scaled != want.scaled)) {
            if (++failures <= 20) {
              std::printf("FAIL quantize grid=%d bits=%d inv_s=%g x=%.9g: got (%g, %d, %g) want (%g, %d, %g)\n",
                          grid, bits, inv_s, x, got.q_minus_z, got.in_range, got.scaled, want.q_minus_z,
                          want.in_range, want.scaled);
            }
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  check_quantize_against_the_definition(rng);
  check_dtype<float>(rng);
  check_dtype<__half>(rng);
  check_dtype<__nv_bfloat16>(rng);
  if (failures == 0) std::printf("mixed_fake_quant_host_test: %d cases, per-thread kernel code matches\n", checks);
  return failures == 0 ? 0 : 1;
}
