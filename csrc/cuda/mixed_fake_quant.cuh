// Per-thread work of the mixed fake-quant kernels (mixed_fake_quant.cu): the quantizer parameters
// of one channel, the maths of one element, and one thread's share of a launch. Host-and-device
// code (no shared memory, no warp operations), so that tests/cuda/mixed_fake_quant_host_test.cu can run
// every thread of a grid on the CPU and compare with a direct computation.
#pragma once

#include "cuda/common.cuh"
#include "quant_math.h"

namespace qdarts {
namespace gpu {

// Kernel argument: the per-bit grid ranges (computed on the host) and the device parameters.
struct QuantizerArgs {
  GridRange ranges[kMaxBits];
  const float* probs;   // [K]
  const float* scales;  // [K, scale_stride]
  int64_t scale_stride; // C per channel, 1 per tensor
};

inline QuantizerArgs make_quantizer_args(const MixedQuantizer& quantizer, const ChannelView& view) {
  QuantizerArgs args{};
  for (int k = 0; k < quantizer.num_bits; ++k) args.ranges[k] = grid_range(quantizer.grid, quantizer.bits[k]);
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
  GridRange range[K];
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
    q.range[k] = args.ranges[k];
  }
  return q;
}

template <int K>
QD_HOST_DEVICE float mixed_quantize(float x, const Quantizers<K>& q) {
  float y = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const QuantResult r = quantize(x, q.inv_scale[k], q.range[k]);
    const float term = q.prob[k] * (r.q_minus_z * q.scale[k]);
    y = k == 0 ? term : y + term;
  }
  return y;
}

// Returns dx = g * sum_k p_k in_k and adds this element's share of the reduced gradients:
//   dprob[k]  += g * Q_k
//   dscale[k] += g * ((q_k - z) - (in_k ? x * inv_s_k : 0))    (times p_k later, once per sum)
template <int K, bool NEED_DX, bool NEED_DPROBS, bool NEED_DSCALES>
QD_HOST_DEVICE float mixed_quantize_backward(float x, float g, const Quantizers<K>& q,
                                                         float (&dprob)[K], float (&dscale)[K]) {
  float pass = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const QuantResult r = quantize(x, q.inv_scale[k], q.range[k]);
    if constexpr (NEED_DX) pass = pass + q.prob[k] * r.in_range;
    if constexpr (NEED_DPROBS) dprob[k] += g * (r.q_minus_z * q.scale[k]);
    // A select, not in_k * x * inv_s: an out-of-range x = +-inf must add g * (q - z), not NaN.
    if constexpr (NEED_DSCALES) dscale[k] += g * (r.q_minus_z - (r.in_range != 0.0f ? x * q.inv_scale[k] : 0.0f));
  }
  return g * pass;
}

// One thread's share of the forward launch over `view`: y = mixed quantization of x.
#pragma nv_exec_check_disable
template <typename T, int K, int VEC, bool PER_CHANNEL>
QD_HOST_DEVICE void mixed_fake_quant_forward_thread(const T* __restrict__ x, T* __restrict__ y,
                                                    const QuantizerArgs& args, const ChannelView& view,
                                                    const ThreadCoords& t) {
  const Quantizers<K> q = load_quantizers<K>(args, PER_CHANNEL ? t.block_x : 0);
  auto body = [&](auto width, int64_t offset) {
    constexpr int N = decltype(width)::value;
    const Pack<T, N> xs = load_pack<T, N>(x, offset);
    Pack<T, N> ys;
#pragma unroll
    for (int j = 0; j < N; ++j) ys.v[j] = from_float<T>(mixed_quantize<K>(to_float(xs.v[j]), q));
    store_pack<T, N>(y, offset, ys);
  };
  for_each_element<VEC, PER_CHANNEL>(view, t, body);
}

// One thread's share of the backward launch: writes dx (when NEED_DX) and adds the thread's sums
// of g * Q_k to dprob and of g * ((q_k - z) - (in_k ? x * inv_s_k : 0)) to dscale.
#pragma nv_exec_check_disable
template <typename T, int K, int VEC, bool PER_CHANNEL, bool NEED_DX, bool NEED_DPROBS, bool NEED_DSCALES>
QD_HOST_DEVICE void mixed_fake_quant_backward_thread(const T* __restrict__ grad, const T* __restrict__ x,
                                                     T* __restrict__ dx, const QuantizerArgs& args,
                                                     const ChannelView& view, const ThreadCoords& t,
                                                     float (&dprob)[K], float (&dscale)[K]) {
  const Quantizers<K> q = load_quantizers<K>(args, PER_CHANNEL ? t.block_x : 0);
  auto body = [&](auto width, int64_t offset) {
    constexpr int N = decltype(width)::value;
    const Pack<T, N> gs = load_pack<T, N>(grad, offset);
    const Pack<T, N> xs = load_pack<T, N>(x, offset);
    [[maybe_unused]] Pack<T, N> dxs;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float d = mixed_quantize_backward<K, NEED_DX, NEED_DPROBS, NEED_DSCALES>(
          to_float(xs.v[j]), to_float(gs.v[j]), q, dprob, dscale);
      if constexpr (NEED_DX) dxs.v[j] = from_float<T>(d);
    }
    if constexpr (NEED_DX) store_pack<T, N>(dx, offset, dxs);
  };
  for_each_element<VEC, PER_CHANNEL>(view, t, body);
}

}  // namespace gpu
}  // namespace qdarts
