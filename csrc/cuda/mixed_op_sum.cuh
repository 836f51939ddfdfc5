// Per-thread work of the mixed_op_sum kernels (mixed_op_sum.cu). Host-and-device code (no shared
// memory, no warp operations), so that tests/cuda/mixed_op_sum_host_test.cu can run every thread
// of a grid on the CPU and compare with a direct computation.
//
// K is a runtime value up to a compile-time bound MAX_K (4, 8, 16, 32 or 64): the loops over k unroll
// to that bound with a guard, so per-k accumulators stay in registers. Forward accumulation is
// fp32 in the reference's order (y = w_0 o_0, y = y + w_1 o_1, ...); with --fmad=false it matches
// the reference bit for bit.
#pragma once

#include "cuda/common.cuh"

namespace qdarts {
namespace gpu {

// Loads of this many candidates are issued together before their values are used, so several
// memory requests per thread are in flight.
constexpr int kLoadBatch = 4;

template <typename T>
struct InputPointers {
  const T* p[kMaxOpSumInputs];
};
template <typename T>
struct OutputPointers {
  T* p[kMaxOpSumInputs];
};

// Calls f(k, pack) for k = 0, 1, ..., count - 1 in order, pack being the N elements of inputs[k] at
// offset; the loads of each batch of kLoadBatch inputs are issued before any of them is used.
#pragma nv_exec_check_disable
template <typename T, int MAX_K, int N, typename F>
QD_HOST_DEVICE void for_each_input_pack(const InputPointers<T>& inputs, int count, int64_t offset, F&& f) {
#pragma unroll
  for (int kb = 0; kb < MAX_K; kb += kLoadBatch) {
    Pack<T, N> o[kLoadBatch];
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      if (kb + b < count) o[b] = load_pack<T, N>(inputs.p[kb + b], offset);
    }
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      if (kb + b < count) f(kb + b, o[b]);
    }
  }
}

// One thread's share of the forward launch: y = sum_k w_k * inputs[k] on this thread's elements.
#pragma nv_exec_check_disable
template <typename T, int MAX_K, int VEC>
QD_HOST_DEVICE void mixed_op_sum_forward_thread(InputPointers<T> inputs, int count,
                                                const float* __restrict__ weights, T* __restrict__ y,
                                                int64_t numel, const ThreadCoords& t) {
  float w[MAX_K];
#pragma unroll
  for (int k = 0; k < MAX_K; ++k) w[k] = k < count ? weights[k] : 0.0f;
  auto body = [&](auto width, const GroupOffsets<1>& group) {
    constexpr int N = decltype(width)::value;
    const int64_t offset = group.at[0];
    float acc[N];
    for_each_input_pack<T, MAX_K, N>(inputs, count, offset, [&](int k, const Pack<T, N>& o) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float term = w[k] * to_float(o.v[j]);
        acc[j] = k == 0 ? term : acc[j] + term;
      }
    });
    Pack<T, N> ys;
#pragma unroll
    for (int j = 0; j < N; ++j) ys.v[j] = from_float<T>(acc[j]);
    store_pack<T, N>(y, offset, ys);
  };
  // one group a step: the K inputs' loads already keep K accesses in flight
  for_each_flat<VEC, 1>(numel, t, body);
}

// One thread's share of the backward launch: writes d inputs[k] = w_k * g (when NEED_DINPUTS) and
// adds the thread's sums of g * inputs[k] to dw[k] (when NEED_DWEIGHTS).
#pragma nv_exec_check_disable
template <typename T, int MAX_K, int VEC, bool NEED_DINPUTS, bool NEED_DWEIGHTS>
QD_HOST_DEVICE void mixed_op_sum_backward_thread(const T* __restrict__ grad, InputPointers<T> inputs,
                                                 OutputPointers<T> dinputs, int count,
                                                 const float* __restrict__ weights, int64_t numel,
                                                 const ThreadCoords& t, float (&dw)[MAX_K]) {
  float w[MAX_K];
#pragma unroll
  for (int k = 0; k < MAX_K; ++k) w[k] = NEED_DINPUTS && k < count ? weights[k] : 0.0f;
  auto body = [&](auto width, const GroupOffsets<1>& group) {
    constexpr int N = decltype(width)::value;
    const int64_t offset = group.at[0];
    const Pack<T, N> gs = load_pack<T, N>(grad, offset);
    float g[N];
#pragma unroll
    for (int j = 0; j < N; ++j) g[j] = to_float(gs.v[j]);
    // The inputs' loads before the stores of d inputs, which might alias them as far as the compiler
    // knows: so they are issued with g's, not one memory round trip after it.
    if constexpr (NEED_DWEIGHTS) {
      for_each_input_pack<T, MAX_K, N>(inputs, count, offset, [&](int k, const Pack<T, N>& o) {
#pragma unroll
        for (int j = 0; j < N; ++j) dw[k] += g[j] * to_float(o.v[j]);
      });
    }
    if constexpr (NEED_DINPUTS) {
#pragma unroll
      for (int k = 0; k < MAX_K; ++k) {
        if (k < count) {
          Pack<T, N> d;
#pragma unroll
          for (int j = 0; j < N; ++j) d.v[j] = from_float<T>(w[k] * g[j]);
          store_pack<T, N>(dinputs.p[k], offset, d);
        }
      }
    }
  };
  for_each_flat<VEC, 1>(numel, t, body);
}

}  // namespace gpu
}  // namespace qdarts
