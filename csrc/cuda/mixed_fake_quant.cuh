// Per-thread work of the mixed fake-quant kernels (mixed_fake_quant.cu): the quantizer parameters
// of one channel, the maths of one element, and one thread's share of a launch. Host-and-device
// code (no shared memory, no warp operations), so that tests/cuda/mixed_fake_quant_host_test.cu can run
// every thread of a grid on the CPU and compare with a direct computation.
#pragma once

#include "cuda/common.cuh"
#include "quant_math.h"

namespace qdarts {
namespace gpu {

// The quantizer levels of each bit-width and the grid's floor (made on the host).
struct GridLevels {
  QuantLevels levels[kMaxBits];
  float x_floor;
};

inline GridLevels make_grid_levels(const MixedQuantizer& quantizer) {
  GridLevels g{};
  for (int k = 0; k < quantizer.num_bits; ++k) {
    g.levels[k] = quant_levels(grid_range(quantizer.grid, quantizer.bits[k]));
  }
  g.x_floor = grid_range(quantizer.grid, quantizer.bits[0]).x_floor;
  return g;
}

// Kernel argument: the grid's levels and the device parameters.
struct QuantizerArgs {
  GridLevels grid;
  const float* probs;   // [K]
  const float* scales;  // [K, scale_stride]
  int64_t scale_stride; // C per channel, 1 per tensor
};

inline QuantizerArgs make_quantizer_args(const MixedQuantizer& quantizer, const ChannelView& view) {
  QuantizerArgs args{};
  args.grid = make_grid_levels(quantizer);
  args.probs = quantizer.probs;
  args.scales = quantizer.scales;
  args.scale_stride = view.per_channel ? view.channels : 1;
  return args;
}

// The K quantizers of one channel (or of the whole tensor), held in registers.
template <int K>
struct Quantizers {
  float scale[K];
  float inv_scale[K];
  float prob[K];
  QuantLevels levels[K];
  float x_floor;
};

template <int K>
QD_HOST_DEVICE Quantizers<K> load_quantizers(const QuantizerArgs& args, int64_t channel) {
  Quantizers<K> q;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    q.scale[k] = args.scales[k * args.scale_stride + channel];
    // Correctly rounded (nvcc's default -prec-div=true), like PyTorch's inv_scale = 1 / scale.
    q.inv_scale[k] = 1.0f / q.scale[k];
    q.prob[k] = args.probs[k];
    q.levels[k] = args.grid.levels[k];
  }
  q.x_floor = args.grid.x_floor;
  return q;
}

// The same operations in the same order as the reference: y = p_0 * ((q_0 - z) * s_0), then
// y = y + p_k * ((q_k - z) * s_k), so that y is the reference's bit for bit.
template <int K>
QD_HOST_DEVICE float mixed_quantize(float x, const Quantizers<K>& q) {
  const float x_floored = floored_input(x, q.x_floor);
  const bool above_floor = x > q.x_floor;
  float y = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const QuantResult r = quantize(x_floored, above_floor, q.inv_scale[k], q.levels[k]);
    const float term = q.prob[k] * (r.q_minus_z * q.scale[k]);
    y = k == 0 ? term : y + term;
  }
  return y;
}

// Returns dx = g * sum_k p_k in_k (bit for bit the reference's: each p_k * in_k is exact, so the FMA
// rounds as the reference's addition does) and adds this element's share of the reduced gradients:
//   level_sum[k] += g * (q_k - z)                                (dprob_k = s_k * its sum)
//   dscale[k]    += g * ((q_k - z) - (in_k ? x * inv_s_k : 0))   (times p_k later, once per sum)
template <int K, bool NEED_DX, bool NEED_DPROBS, bool NEED_DSCALES>
QD_HOST_DEVICE float mixed_quantize_backward(float x, float g, const Quantizers<K>& q, float (&level_sum)[K],
                                             float (&dscale)[K]) {
  const float x_floored = floored_input(x, q.x_floor);
  const bool above_floor = x > q.x_floor;
  float pass = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const QuantResult r = quantize(x_floored, above_floor, q.inv_scale[k], q.levels[k]);
    // a multiplication, as the reference's p_k * in_k: a NaN or infinite p_k gives NaN out of range too
    if constexpr (NEED_DX) pass = fused_multiply_add(q.prob[k], r.in_range ? 1.0f : 0.0f, pass);
    if constexpr (NEED_DPROBS) level_sum[k] = fused_multiply_add(g, r.q_minus_z, level_sum[k]);
    // A select, not in_k * x * inv_s: an out-of-range x = +-inf must add g * (q - z), not NaN.
    if constexpr (NEED_DSCALES) {
      dscale[k] = fused_multiply_add(g, r.q_minus_z - (r.in_range ? r.scaled : 0.0f), dscale[k]);
    }
  }
  return g * pass;
}

// Groups of elements a thread loads before it stores any, per tensor (per channel: one).
constexpr int kGroupsPerStep = 2;

// One thread's share of the forward launch over `view`: y = mixed quantization of x.
#pragma nv_exec_check_disable
template <typename T, int K, int VEC, bool PER_CHANNEL>
QD_HOST_DEVICE void mixed_fake_quant_forward_thread(const T* __restrict__ x, T* __restrict__ y,
                                                    const QuantizerArgs& args, const ChannelView& view,
                                                    const ThreadCoords& t) {
  const Quantizers<K> q = load_quantizers<K>(args, PER_CHANNEL ? t.block_x : 0);
  auto body = [&](auto width, const auto& groups) {
    constexpr int N = decltype(width)::value;
    constexpr int M = std::decay_t<decltype(groups)>::count;
    Pack<T, N> xs[M];
#pragma unroll
    for (int m = 0; m < M; ++m) xs[m] = load_pack<T, N>(x, groups.at[m]);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      Pack<T, N> ys;
#pragma unroll
      for (int j = 0; j < N; ++j) ys.v[j] = from_float<T>(mixed_quantize<K>(to_float(xs[m].v[j]), q));
      store_pack<T, N>(y, groups.at[m], ys);
    }
  };
  for_each_element<VEC, PER_CHANNEL, kGroupsPerStep>(view, t, body);
}

// One thread's share of the backward launch: writes dx (when NEED_DX) and adds the thread's sums
// of g * Q_k to dprob and of g * ((q_k - z) - (in_k ? x * inv_s_k : 0)) to dscale. A thread's
// elements share their scales (one channel, or the tensor), so s_k multiplies its sum once.
#pragma nv_exec_check_disable
template <typename T, int K, int VEC, bool PER_CHANNEL, bool NEED_DX, bool NEED_DPROBS, bool NEED_DSCALES>
QD_HOST_DEVICE void mixed_fake_quant_backward_thread(const T* __restrict__ grad, const T* __restrict__ x,
                                                     T* __restrict__ dx, const QuantizerArgs& args,
                                                     const ChannelView& view, const ThreadCoords& t,
                                                     float (&dprob)[K], float (&dscale)[K]) {
  const Quantizers<K> q = load_quantizers<K>(args, PER_CHANNEL ? t.block_x : 0);
  float level_sum[K];
#pragma unroll
  for (int k = 0; k < K; ++k) level_sum[k] = 0.0f;
  auto body = [&](auto width, const auto& groups) {
    constexpr int N = decltype(width)::value;
    constexpr int M = std::decay_t<decltype(groups)>::count;
    Pack<T, N> gs[M], xs[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      gs[m] = load_pack<T, N>(grad, groups.at[m]);
      xs[m] = load_pack<T, N>(x, groups.at[m]);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      [[maybe_unused]] Pack<T, N> dxs;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float d = mixed_quantize_backward<K, NEED_DX, NEED_DPROBS, NEED_DSCALES>(
            to_float(xs[m].v[j]), to_float(gs[m].v[j]), q, level_sum, dscale);
        if constexpr (NEED_DX) dxs.v[j] = from_float<T>(d);
      }
      if constexpr (NEED_DX) store_pack<T, N>(dx, groups.at[m], dxs);
    }
  };
  for_each_element<VEC, PER_CHANNEL, kGroupsPerStep>(view, t, body);
  if constexpr (NEED_DPROBS) {
#pragma unroll
    for (int k = 0; k < K; ++k) dprob[k] += q.scale[k] * level_sum[k];
  }
}

}  // namespace gpu
}  // namespace qdarts
