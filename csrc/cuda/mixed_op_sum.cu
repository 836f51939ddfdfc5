// The DARTS mixed-op sum on CUDA: y = sum_k w_k * o_k over K candidate outputs, forward and backward.
//
// The K pointers travel in a by-value struct. K is a runtime value up to a compile-time bound
// (4, 8, 16 or 32): the loops over k unroll to that bound with a guard, so per-k accumulators stay
// in registers. Forward accumulation is fp32 in the reference's order (y = w_0 o_0, y = y + w_1 o_1,
// ...) and compiled with --fmad=false, so it matches the reference bit for bit.
#include "cuda/common.cuh"

namespace qdarts {
namespace gpu {
namespace {

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

template <typename T, int MAX_K, int VEC>
__global__ void __launch_bounds__(kThreads)
    mixed_op_sum_forward_kernel(InputPointers<T> inputs, int count, const float* __restrict__ weights,
                                T* __restrict__ y, int64_t numel) {
  float w[MAX_K];
#pragma unroll
  for (int k = 0; k < MAX_K; ++k) w[k] = k < count ? weights[k] : 0.0f;
  auto body = [&](auto width, int64_t offset) {
    constexpr int N = decltype(width)::value;
    float acc[N];
#pragma unroll
    for (int kb = 0; kb < MAX_K; kb += kLoadBatch) {
      Pack<T, N> o[kLoadBatch];
#pragma unroll
      for (int b = 0; b < kLoadBatch; ++b) {
        if (kb + b < count) o[b] = load_pack<T, N>(inputs.p[kb + b], offset);
      }
#pragma unroll
      for (int b = 0; b < kLoadBatch; ++b) {
        if (kb + b < count) {
#pragma unroll
          for (int j = 0; j < N; ++j) {
            const float term = w[kb + b] * to_float(o[b].v[j]);
            acc[j] = kb + b == 0 ? term : acc[j] + term;
          }
        }
      }
    }
    Pack<T, N> ys;
#pragma unroll
    for (int j = 0; j < N; ++j) ys.v[j] = from_float<T>(acc[j]);
    store_pack<T, N>(y, offset, ys);
  };
  for_each_flat<VEC>(numel, this_thread(), body);
}

template <typename T, int MAX_K, int VEC, bool NEED_DINPUTS, bool NEED_DWEIGHTS>
__global__ void __launch_bounds__(kThreads)
    mixed_op_sum_backward_kernel(const T* __restrict__ grad, InputPointers<T> inputs, OutputPointers<T> dinputs,
                                 int count, const float* __restrict__ weights, float* __restrict__ partials,
                                 int64_t numel) {
  float w[MAX_K];
  float dw[MAX_K];
#pragma unroll
  for (int k = 0; k < MAX_K; ++k) {
    w[k] = NEED_DINPUTS && k < count ? weights[k] : 0.0f;
    dw[k] = 0.0f;
  }
  auto body = [&](auto width, int64_t offset) {
    constexpr int N = decltype(width)::value;
    const Pack<T, N> gs = load_pack<T, N>(grad, offset);
    float g[N];
#pragma unroll
    for (int j = 0; j < N; ++j) g[j] = to_float(gs.v[j]);
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
    if constexpr (NEED_DWEIGHTS) {
#pragma unroll
      for (int kb = 0; kb < MAX_K; kb += kLoadBatch) {
        Pack<T, N> o[kLoadBatch];
#pragma unroll
        for (int b = 0; b < kLoadBatch; ++b) {
          if (kb + b < count) o[b] = load_pack<T, N>(inputs.p[kb + b], offset);
        }
#pragma unroll
        for (int b = 0; b < kLoadBatch; ++b) {
          if (kb + b < count) {
#pragma unroll
            for (int j = 0; j < N; ++j) dw[kb + b] += g[j] * to_float(o[b].v[j]);
          }
        }
      }
    }
  };
  for_each_flat<VEC>(numel, this_thread(), body);
  if constexpr (NEED_DWEIGHTS) block_sum<MAX_K>(dw, partials + block_row(this_thread()) * MAX_K);
}

// The compile-time bound used for `count` candidates.
int max_k_for(int count) {
  for (int bound = kLoadBatch; bound < kMaxOpSumInputs; bound *= 2) {
    if (count <= bound) return bound;
  }
  return kMaxOpSumInputs;
}

template <typename F>
void dispatch_max_k(int count, F&& f) {
  static_assert(kMaxOpSumInputs == 32, "update the bounds below with kMaxOpSumInputs");
  dispatch_int<4, 8, 16, 32>(max_k_for(count), f);
}

// True when every one of the `count` pointers (none when `pointers` is null) is 16-byte aligned.
bool all_aligned(const void* const* pointers, int count) {
  for (int k = 0; pointers != nullptr && k < count; ++k) {
    if (!is_vector_aligned(pointers[k])) return false;
  }
  return true;
}

template <typename T>
InputPointers<T> typed_inputs(const OpSumInputs& inputs) {
  InputPointers<T> typed{};
  for (int k = 0; k < inputs.count; ++k) typed.p[k] = static_cast<const T*>(inputs.tensors[k]);
  return typed;
}

}  // namespace

void launch_mixed_op_sum_forward(const OpSumInputs& inputs, const float* weights, void* y, int64_t numel,
                                 DType dtype, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(flat_blocks(numel, kElementwiseBlocks)));
  const bool aligned = is_vector_aligned(y) && all_aligned(inputs.tensors, inputs.count);
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    dispatch_max_k(inputs.count, [&](auto max_k) {
      constexpr int MAX_K = decltype(max_k)::value;
      dispatch_bool(aligned, [&](auto vec) {
        constexpr int VEC = decltype(vec)::value ? vector_width<T>() : 1;
        mixed_op_sum_forward_kernel<T, MAX_K, VEC><<<grid, kThreads, 0, stream>>>(
            typed_inputs<T>(inputs), inputs.count, weights, static_cast<T*>(y), numel);
      });
    });
  });
}

int64_t mixed_op_sum_backward_partials_size(int count, int64_t numel, bool need_dweights) {
  if (!need_dweights) return 0;
  return flat_blocks(numel, kReduceBlocks) * max_k_for(count);
}

void launch_mixed_op_sum_backward(const void* grad, const OpSumInputs& inputs, const float* weights,
                                  void* const* dinputs, float* dweights, float* partials, int64_t numel,
                                  DType dtype, cudaStream_t stream) {
  const bool need_dinputs = dinputs != nullptr;
  const bool need_dweights = dweights != nullptr;
  if (!(need_dinputs || need_dweights)) return;
  const int64_t blocks = flat_blocks(numel, need_dweights ? kReduceBlocks : kElementwiseBlocks);
  const bool aligned = is_vector_aligned(grad) && all_aligned(inputs.tensors, inputs.count) &&
                       all_aligned(dinputs, inputs.count);
  dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    OutputPointers<T> typed_dinputs{};
    for (int k = 0; need_dinputs && k < inputs.count; ++k) typed_dinputs.p[k] = static_cast<T*>(dinputs[k]);
    dispatch_max_k(inputs.count, [&](auto max_k) {
      constexpr int MAX_K = decltype(max_k)::value;
      dispatch_bool(aligned, [&](auto vec) {
        constexpr int VEC = decltype(vec)::value ? vector_width<T>() : 1;
        dispatch_bool(need_dinputs, [&](auto dinputs_flag) {
          dispatch_bool(need_dweights, [&](auto dweights_flag) {
            constexpr bool DIN = decltype(dinputs_flag)::value;
            constexpr bool DW = decltype(dweights_flag)::value;
            if constexpr (DIN || DW) {
              mixed_op_sum_backward_kernel<T, MAX_K, VEC, DIN, DW>
                  <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
                      static_cast<const T*>(grad), typed_inputs<T>(inputs), typed_dinputs, inputs.count, weights,
                      partials, numel);
            }
          });
        });
      });
    });
  });
  if (need_dweights) {
    launch_sum_partials(partials, max_k_for(inputs.count), 0, inputs.count, 1, blocks, nullptr, dweights, stream);
  }
}

}  // namespace gpu
}  // namespace qdarts
